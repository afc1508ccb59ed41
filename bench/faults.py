"""Fault injection: kill each stage of the pipeline with SIGKILL at seeded moments, re-run, check what survived.

    python -m bench.faults [--kills 3] [--seed 0] [--stages ingest,validate,...] [--report docs/reliability.md]

On the embedded default shrunk to seconds (the tests' tiny params) in a temp git + DVC copy of the project:

1. a fault-free ``dvc repro``, then each stage forced once (``dvc repro -f -s STAGE``) to time it and to check that
   a fault-free re-run gives the same outputs (the ``dvc.lock`` hashes);
2. per stage, ``--kills`` moments drawn (seeded) early, mid-run and late (the last one close to the end: the
   output swap) of the stage's own duration: ``dvc repro -f -s STAGE`` in its own process group, SIGKILL to the
   whole group at that moment;
3. then ``python -m pipelines.sweep``, ``dvc repro``, the sweep again, as ``make repro`` re-runs it; the checks: it
   completes; every output's ``dvc.lock`` hash equals the fault-free run's (byte for byte, same machine); ``dvc status`` is clean; nothing half-written is
   left: no temporary of ours (``.NAME.HOST-PID.*.tmp``), no ``.NAME.old`` folder, no checkpoint weights
   without their ``model.json``.

4. two runs at once: a second ``dvc repro`` while one runs;
5. a full disk (``--no-disk`` skips it): the command of ingest, phase1 (its checkpoint), export and pack under a
   file size limit of half its largest output file (``RLIMIT_FSIZE``): one ``error:`` line, the previous outputs
   intact, nothing half-written, then ``dvc repro -f -s STAGE`` without the limit gives the fault-free outputs;
6. fuzzed inputs (``--no-fuzz`` skips it): ``tests/test_fuzz.py``, the cases each property tried and failed;
7. through the served deployment (``--no-prefect`` skips it; ``lpt-serve start`` on a free port): the serving
   process's group SIGKILLed during phase1 of a ``prefect deployment run lpt/full``, ``lpt-serve start`` again (the
   run must be marked crashed), the run again (it must complete with the fault-free outputs); a run with a params
   override cancelled (``prefect flow-run cancel``) during phase1 (``params.yaml`` and the outputs as they were);
   a run started while ``dvc repro -f`` runs in a shell (refused in one line, nothing written).

A kill that comes after the stage already finished is counted as not injected. ``--report`` writes the table
(docs/reliability.md). Run it on an idle machine: the moments are fractions of measured durations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.timing import write_figures  # noqa: E402
from lpt.utils import pid_alive  # noqa: E402

STAGES = ("ingest", "validate", "phase1", "phase2", "evaluate", "export", "pack")
"""The stages faults are injected into (``params`` is a constant stamp; ``pretrain`` is frozen)."""
MOMENTS = ((0.05, 0.3, "early"), (0.35, 0.65, "mid"), (0.75, 0.98, "late"))


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
            "HF_HUB_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)


def build_project(root: Path) -> Path:
    """A git + DVC copy of the project (dvc.yaml, lpt/, pipelines/, the tracked source folder, the frozen
    backbone) with the tests' tiny params: the whole pipeline in about a minute."""
    from tests.conftest import tiny_raw_params

    root.mkdir(parents=True)
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    if (REPO / ".dvc" / "plots").is_dir():
        shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    for package in ("lpt", "pipelines"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(), sort_keys=False))
    shutil.copytree(REPO / "data" / "source", root / "data" / "source")
    shutil.copytree(REPO / "models" / "pretrain", root / "models" / "pretrain")
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.name=faults", "-c", "user.email=faults@example.com", "commit", "-qm", "tiny"], root)
    return root


def lock_hashes(root: Path) -> dict[str, str]:
    """``stage:path -> md5`` of every output in ``dvc.lock``."""
    doc = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    return {f"{name}:{o['path']}": o.get("md5", "") for name, st in doc.get("stages", {}).items()
            for o in st.get("outs", [])}


def leftovers(root: Path) -> list[str]:
    """Half-written things of ours: temporaries, ``.old`` folders, checkpoint weights without their JSON."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in (".git", ".dvc"):
            continue
        name = path.name
        if name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old")):
            found.append(str(rel))
        if name == "model.safetensors" and not (path.parent / "model.json").is_file():
            found.append(f"{rel} (no model.json)")
    return sorted(found)


def status_clean(root: Path) -> bool:
    """``dvc status --json`` reports nothing changed (the frozen stage is not reported)."""
    proc = _run([sys.executable, "-m", "dvc", "status", "--json"], root)
    try:
        return proc.returncode == 0 and json.loads(proc.stdout or "{}") == {}
    except ValueError:
        return False


def kill_at(root: Path, stage: str, seconds: float) -> tuple[bool, float]:
    """``dvc repro -f -s STAGE`` killed (SIGKILL, its whole process group) after ``seconds``.

    Returns:
        ``(injected, elapsed)``: False when the stage had finished before the moment.
    """
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], cwd=root, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    start = time.perf_counter()
    try:
        proc.wait(timeout=seconds)
        return False, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True, time.perf_counter() - start


def two_runs_at_once(root: Path, stage: str, seconds: float, reference: dict[str, str]) -> dict[str, Any]:
    """A second ``dvc repro`` started while a first one runs ``stage``: the second must be refused (DVC's repo
    lock) in one error line, the first must finish, and the outputs must be the fault-free run's."""
    first = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], cwd=root, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(seconds)
    running = first.poll() is None
    second = _run([sys.executable, "-m", "dvc", "repro"], root)
    first_rc = first.wait()
    errors = [line for line in (second.stdout + second.stderr).splitlines() if line.startswith("ERROR")]
    hashes = lock_hashes(root)
    return {"scenario": f"`dvc repro` while `dvc repro -f -s {stage}` runs", "overlapped": running and first_rc == 0,
            "second_refused": second.returncode != 0, "second_error_lines": len(errors),
            "second_error": errors[0][:160] if errors else "", "first_completed": first_rc == 0,
            "identical": all(hashes.get(k) == v for k, v in reference.items()), "status_clean": status_clean(root),
            "leftovers": leftovers(root)}


# ------------------------------------------------------------------------------------------- a full disk
DISK_STAGES = ("ingest", "phase1", "export", "pack")
"""The stages that write large files: shards, the training checkpoint, the ONNX graphs, the pack's backbone graph."""


def _largest_output_file(root: Path, stage: str) -> int:
    from pipelines.dvc_stages import read_stages

    outs = next(s.outs for s in read_stages(root) if s.name == stage)
    sizes = [f.stat().st_size for out in outs for f in ([root / out] if (root / out).is_file() else
                                                          (root / out).rglob("*")) if f.is_file()]
    return max(sizes, default=0)


def full_disk(root: Path, stage: str, reference: dict[str, str]) -> dict[str, Any]:
    """The stage's command (``cmd`` of ``dvc.yaml``, as DVC runs it) under a file size limit of half its largest
    output file (``RLIMIT_FSIZE``, what ``ulimit -f`` sets): it must fail with one ``error:`` line naming the path,
    leave the previous outputs as ``dvc.lock`` names them and nothing half-written; then ``dvc repro -f -s STAGE``
    with no limit must succeed with the fault-free outputs."""
    from pipelines.dvc_stages import read_stages

    cmd = next(s.cmd for s in read_stages(root) if s.name == stage)
    limit = _largest_output_file(root, stage) // 2

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(cmd, shell=True, cwd=root, env=_env(), capture_output=True, text=True, preexec_fn=cap)
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    intact = lock_hashes(root) == reference and status_clean(root)
    left = leftovers(root)
    rerun = _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], root)
    return {"stage": stage, "limit_bytes": limit, "exit_code": proc.returncode, "error_lines": len(errors),
            "error": errors[0] if errors else "", "traceback": "Traceback" in text,
            "names_fault": bool(errors) and "cannot write " in errors[0] and "[EFBIG]" in errors[0],
            "previous_intact": intact, "leftovers": left, "rerun_ok": rerun.returncode == 0,
            "rerun_identical": lock_hashes(root) == reference and status_clean(root)}


# ------------------------------------------------------------------------------------------- fuzzed inputs
def fuzz_counts() -> dict[str, Any]:
    """Run the property-based tests (``tests/test_fuzz.py``, Hypothesis, derandomised) and read how many cases each
    property tried and how many failed (a failing case is a traceback or an error without the project's name)
    from Hypothesis' statistics (``--hypothesis-show-statistics``)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q", "-p", "no:cacheprovider",
                           "--hypothesis-show-statistics"], cwd=REPO, env=_env(), capture_output=True, text=True)
    props: dict[str, dict[str, int]] = {}
    name = None
    for line in proc.stdout.splitlines():
        if line.startswith("tests/test_fuzz.py::") and line.rstrip().endswith(":"):
            name = line.split("::", 1)[1].rstrip().rstrip(":")
        elif name and " passing, " in line and " failing" in line:
            words = line.replace(",", " ").split()
            passing, failing = int(words[words.index("passing") - 1]), int(words[words.index("failing") - 1])
            counts = props.setdefault(name, {"passing": 0, "failing": 0})
            counts["passing"] += passing
            counts["failing"] += failing
    return {"exit_code": proc.returncode, "properties": props}


def _fuzz_markdown(fuzz: dict[str, Any] | None) -> list[str]:
    if not fuzz:
        return []
    lines = ["", f"Fuzzed inputs (`tests/test_fuzz.py`, run by this command; pytest exit status {fuzz['exit_code']}):", "",
             "| property | cases tried | failing (a traceback, or an error without the project's name) |",
             "|---|---|---|"]
    for name, c in fuzz["properties"].items():
        lines.append(f"| `{name}` | {c['passing'] + c['failing']} | {c['failing']} |")
    return lines


# ---------------------------------------------------------------------------- through the served deployment
_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Served:
    """``lpt-serve`` (a Prefect server and the process serving ``lpt/full``) for the temp project, on a free port,
    and the few REST calls the checks need."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**_env(), "LPT_PREFECT_PORT": str(self.port), "PREFECT_API_URL": self.api,
                    "PREFECT_HOME": str(root / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_RUNNER_POLL_FREQUENCY": "2"}

    def lpt_serve(self, action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipelines.serve", action], cwd=self.root, env=self.env,
                              capture_output=True, text=True)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the loopback server we started
            return json.loads(resp.read() or b"null")

    def deployment_run(self, parameters: dict[str, Any]) -> str:
        """``prefect deployment run lpt/full`` with these parameters; the flow run's id."""
        args = [arg for key, value in parameters.items() for arg in ("--param", f"{key}={json.dumps(value)}")]
        proc = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "lpt/full", *args],
                              cwd=self.root, env=self.env, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if "UUID:" in line:
                return line.split("UUID:")[1].strip()
        raise RuntimeError(f"prefect deployment run failed:\n{proc.stdout}{proc.stderr}")

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/flow_runs/{run_id}")

    def task_state(self, run_id: str, name: str) -> str | None:
        runs = self._call("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}},
                                                         "task_runs": {"name": {"any_": [name]}}})
        return runs[-1]["state_type"] if runs else None

    def wait(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.25)
        return False

    def wait_final(self, run_id: str, timeout: float = 300) -> dict[str, Any]:
        self.wait(lambda: self.flow_run(run_id)["state_type"] in _FINAL, timeout)
        return self.flow_run(run_id)


def project_processes(root: Path) -> list[str]:
    """Live processes working in the project other than the Prefect server and the serving process: what a killed
    run left running (a ``dvc repro`` or a stage command)."""
    found = []
    for folder in Path("/proc").iterdir():
        if not folder.name.isdigit() or int(folder.name) == os.getpid():
            continue
        try:
            if os.readlink(folder / "cwd") != str(root):
                continue
            if not pid_alive(int(folder.name)):  # a zombie is dead
                continue
            cmd = (folder / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "prefect server start" not in cmd and "pipelines.serve" not in cmd:
            found.append(cmd[:120])
    return found


def _outcome(root: Path, reference: dict[str, str], params_before: bytes) -> dict[str, Any]:
    return {"identical": lock_hashes(root) == reference, "params_unchanged": (root / "params.yaml").read_bytes() == params_before,
            "status_clean": status_clean(root), "leftovers": leftovers(root), "orphans": project_processes(root)}


def _during(served: Served, run_id: str, stage: str, seconds: float) -> bool:
    """Wait until the run's task ``stage`` runs, then ``seconds`` more; False when it never ran."""
    if not served.wait(lambda: served.task_state(run_id, stage) == "RUNNING", 180):
        return False
    time.sleep(seconds)
    return served.flow_run(run_id)["state_type"] == "RUNNING"


def served_kill(served: Served, stage: str, seconds: float, reference: dict[str, str]) -> dict[str, Any]:
    """SIGKILL the serving process's group while a ``lpt/full`` run is in ``stage``; ``lpt-serve start`` again
    (it marks the run crashed); the run again: it must complete with the fault-free outputs."""
    root, params_before = served.root, (served.root / "params.yaml").read_bytes()
    run_id = served.deployment_run({"force": True})
    injected = _during(served, run_id, stage, seconds)
    serve_pid = int((root / ".prefect" / "serve.pid").read_text())
    os.killpg(serve_pid, signal.SIGKILL)
    time.sleep(3)
    orphans = project_processes(root)
    shown_before = served.flow_run(run_id)["state_type"]
    restart = served.lpt_serve("start")
    state = served.flow_run(run_id)
    rerun_id = served.deployment_run({})
    rerun = served.wait_final(rerun_id)
    return {"scenario": f"the serving process SIGKILLed during `{stage}`, `lpt-serve start`, the run again",
            "injected": injected, "state_before_restart": shown_before, "final_state": state["state_type"],
            "message": (state["state"] or {}).get("message") or "", "restart_ok": restart.returncode == 0,
            "orphans_after_kill": orphans, "rerun_state": rerun["state_type"], **_outcome(root, reference, params_before)}


def served_cancel(served: Served, stage: str, seconds: float, reference: dict[str, str]) -> dict[str, Any]:
    """``prefect flow-run cancel`` of a ``lpt/full`` run (with a params override) while it is in ``stage``."""
    root, params_before = served.root, (served.root / "params.yaml").read_bytes()
    run_id = served.deployment_run({"overrides": {"train.phase1.epochs": 2}})
    injected = _during(served, run_id, stage, seconds)
    subprocess.run([sys.executable, "-m", "prefect", "flow-run", "cancel", run_id], cwd=root, env=served.env,
                   capture_output=True, text=True)
    state = served.wait_final(run_id)
    time.sleep(1)
    return {"scenario": f"`prefect flow-run cancel` during `{stage}` (run with a params override)",
            "injected": injected, "final_state": state["state_type"],
            "message": (state["state"] or {}).get("message") or "", "rerun_state": "–",
            **_outcome(root, reference, params_before)}


def served_beside_dvc(served: Served, reference: dict[str, str]) -> dict[str, Any]:
    """``prefect deployment run lpt/full`` (with a params override) while a ``dvc repro -f`` runs in a shell: the run
    must be refused in one line before it writes anything; the ``dvc repro`` must finish with the usual outputs."""
    root, params_before = served.root, (served.root / "params.yaml").read_bytes()
    first = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "-f"], cwd=root, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(3)
    run_id = served.deployment_run({"overrides": {"train.phase1.epochs": 2}})
    state = served.wait_final(run_id)
    overlapped = first.poll() is None
    first_rc = first.wait()
    message = (state["state"] or {}).get("message") or ""
    return {"scenario": "`prefect deployment run lpt/full` (with a params override) while `dvc repro -f` runs",
            "injected": overlapped, "final_state": state["state_type"], "message": message,
            "first_completed": first_rc == 0, "rerun_state": "–", **_outcome(root, reference, params_before)}


@contextlib.contextmanager
def serving(root: Path) -> Iterator[Served]:
    served = Served(root)
    started = served.lpt_serve("start")
    if started.returncode != 0:
        raise SystemExit(f"error: lpt-serve start failed:\n{started.stdout[-2000:]}{started.stderr[-2000:]}")
    try:
        yield served
    finally:
        served.lpt_serve("stop")


def run(kills: int, seed: int, stages: tuple[str, ...], with_disk: bool = True,
        with_prefect: bool = True, with_fuzz: bool = True) -> dict[str, Any]:
    wall0 = time.perf_counter()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="lpt-faults-") as tmp:
        root = build_project(Path(tmp) / "project")
        first = _run([sys.executable, "-m", "dvc", "repro"], root)
        if first.returncode != 0:
            raise SystemExit(f"error: the fault-free dvc repro failed:\n{first.stdout[-2000:]}{first.stderr[-2000:]}")
        reference = lock_hashes(root)
        durations, deterministic = {}, {}
        for stage in stages:
            start = time.perf_counter()
            forced = _run([sys.executable, "-m", "dvc", "repro", "-f", "-s", stage], root)
            durations[stage] = time.perf_counter() - start
            deterministic[stage] = forced.returncode == 0 and lock_hashes(root) == reference
        rows = []
        for stage in stages:
            for k in range(kills):
                low, high, label = MOMENTS[k % len(MOMENTS)]
                at = durations[stage] * rng.uniform(low, high)
                injected, elapsed = kill_at(root, stage, at)
                swept = _run([sys.executable, "-m", "pipelines.sweep"], root)  # what `make repro` runs: sweep,
                rerun = _run([sys.executable, "-m", "dvc", "repro"], root)  # dvc repro,
                swept_after = _run([sys.executable, "-m", "pipelines.sweep"], root)  # sweep
                hashes = lock_hashes(root)
                diffs = sorted(k for k in reference if hashes.get(k) != reference[k])
                left = leftovers(root)
                rows.append({"stage": stage, "moment": label, "at_s": round(at, 2), "stage_s": round(durations[stage], 2),
                             "injected": injected, "recovered": rerun.returncode == 0,
                             "identical": not diffs, "differences": diffs, "status_clean": status_clean(root),
                             "leftovers": left,
                             "swept": swept.stdout.count("removed ") + swept_after.stdout.count("removed "),
                             "rerun_tail": "" if rerun.returncode == 0 else (rerun.stdout + rerun.stderr)[-800:]})
                if diffs or left or rerun.returncode != 0:  # start the next fault from a clean, reference state
                    _run([sys.executable, "-m", "dvc", "repro", "-f"], root)
        concurrent = [two_runs_at_once(root, "phase1", 0.3 * durations.get("phase1", 5.0), reference)]
        disk = [full_disk(root, stage, reference) for stage in DISK_STAGES if stage in stages] if with_disk else []
        fuzz = fuzz_counts() if with_fuzz else None
        served_rows = []
        if with_prefect:
            phase1_s = durations.get("phase1", 5.0)
            with serving(root) as served:
                served_rows.append(served_kill(served, "phase1", 0.4 * phase1_s, reference))
                served_rows.append(served_cancel(served, "phase1", 0.4 * phase1_s, reference))
                served_rows.append(served_beside_dvc(served, reference))
    return {"fuzz": fuzz, "disk": disk, "served": served_rows, "concurrent": concurrent, "kills_per_stage": kills, "seed": seed, "stage_seconds": durations, "fault_free_rerun_identical": deterministic,
            "rows": rows, "wall_s": round(time.perf_counter() - wall0, 1)}


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def summary_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per fault kind: where it was injected, how many, how many recovered with identical outputs and no
    leftovers (the issue's stage x fault-kind table, folded)."""
    kills = [r for r in res["rows"] if r["injected"]]
    rows = [{"kind": "SIGKILL at a seeded moment (early, mid, late)",
             "where": ", ".join(res["stage_seconds"]), "injected": len(kills),
             "recovered": sum(r["recovered"] for r in kills), "identical": sum(r["identical"] for r in kills),
             "leftovers": sum(len(r["leftovers"]) for r in kills)}]
    disk = res.get("disk", [])
    if disk:
        rows.append({"kind": "a full disk (file size limit, EFBIG)", "where": ", ".join(d["stage"] for d in disk),
                     "injected": len(disk), "recovered": sum(d["rerun_ok"] for d in disk),
                     "identical": sum(d["previous_intact"] and d["rerun_identical"] for d in disk),
                     "leftovers": sum(len(d["leftovers"]) for d in disk)})
    conc = res.get("concurrent", [])
    rows.append({"kind": "a second `dvc repro` while one runs", "where": "phase1", "injected": len(conc),
                 "recovered": sum(c["first_completed"] and c["second_refused"] for c in conc),
                 "identical": sum(c["identical"] for c in conc), "leftovers": sum(len(c["leftovers"]) for c in conc)})
    for r, want in zip(res.get("served", []), SERVED_EXPECTED):
        rows.append({"kind": r["scenario"], "where": "served `lpt/full`", "injected": int(r["injected"]),
                     "recovered": int(r["final_state"] == want and r["rerun_state"] in ("COMPLETED", "–")),
                     "identical": int(r["identical"] and r["params_unchanged"] and r["status_clean"]),
                     "leftovers": len(r["leftovers"]) + len(r["orphans"]) + len(r.get("orphans_after_kill", []))})
    return rows


def _disk_markdown(disk: list[dict[str, Any]]) -> list[str]:
    if not disk:
        return []
    lines = ["", "A full disk: each stage's command (as `dvc.yaml` has it) under a file size limit of half its largest "
             "output file (`RLIMIT_FSIZE`, what `ulimit -f` sets: writes fail with EFBIG), then `dvc repro -f -s STAGE` "
             "with no limit:", "",
             "| stage | limit | exit | `error:` lines | traceback | previous outputs intact | leftovers | "
             "next run succeeds, identical | the line |", "|---|---|---|---|---|---|---|---|---|"]
    for d in disk:
        lines.append(f"| {d['stage']} | {d['limit_bytes'] / 1024:.1f} KiB | {d['exit_code']} | {d['error_lines']} | "
                     f"{'YES' if d['traceback'] else 'no'} | {_yes(d['previous_intact'])} | {len(d['leftovers'])} | "
                     f"{_yes(d['rerun_ok'] and d['rerun_identical'])} | `{d['error'][:150]}` |")
    return lines


def _served_markdown(served: list[dict[str, Any]]) -> list[str]:
    if not served:
        return []
    lines = ["", "Through the served deployment (`lpt-serve start`, then `prefect deployment run lpt/full`; the "
             "outputs checked after the scenario's last step):", "",
             "| scenario | overlapped | run's final state | outputs identical | params.yaml unchanged | `dvc status` "
             "clean | leftovers | processes left running | re-run |", "|---|---|---|---|---|---|---|---|---|"]
    for r in served:
        lines.append(f"| {r['scenario']} | {_yes(r['injected'])} | {r['final_state']} | {_yes(r['identical'])} | "
                     f"{_yes(r['params_unchanged'])} | {_yes(r['status_clean'])} | {len(r['leftovers'])} | "
                     f"{len(r.get('orphans_after_kill', [])) + len(r['orphans'])} | {r['rerun_state']} |")
    lines += [""] + [f"- {r['scenario']}: the run's state message: `{' '.join(r['message'].split())[:220]}`"
                     for r in served]
    return lines


def report_markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    injected = [r for r in rows if r["injected"]]
    lines = ["## Killing every stage (`python -m bench.faults`)", "",
             "Generated by `python -m bench.faults --report docs/reliability.md` (the tests' tiny params in a temp "
             "git + DVC copy of the project; SIGKILL to the stage's whole process group at seeded moments of its "
             "measured duration, then `python -m pipelines.sweep`, `dvc repro`, the sweep again: what `make repro` runs). Same machine for every run: outputs are compared by "
             "their `dvc.lock` hashes.", "",
             f"Seed {res['seed']}, {res['kills_per_stage']} kills per stage; harness wall time {res['wall_s']:.0f} s "
             "(everything below, on 2 idle cores).", "",
             "| fault kind | where | injected | recovered | outputs identical | leftovers (files, processes) |",
             "|---|---|---|---|---|---|",
             *[f"| {r['kind']} | {r['where']} | {r['injected']} | {r['recovered']} | {r['identical']} | {r['leftovers']} |"
               for r in summary_rows(res)],
             "", "Per stage:", "", "| stage | stage s | fault-free re-run identical | injected | recovered | outputs identical | "
             "`dvc status` clean | leftovers |", "|---|---|---|---|---|---|---|---|"]
    for stage, seconds in res["stage_seconds"].items():
        mine = [r for r in rows if r["stage"] == stage and r["injected"]]
        lines.append(f"| {stage} | {seconds:.1f} | {'yes' if res['fault_free_rerun_identical'][stage] else 'NO'} | "
                     f"{len(mine)} | {sum(r['recovered'] for r in mine)} | {sum(r['identical'] for r in mine)} | "
                     f"{sum(r['status_clean'] for r in mine)} | {sum(len(r['leftovers']) for r in mine)} |")
    lines += ["", f"In all: {len(injected)} injected, {sum(r['recovered'] for r in injected)} recovered, "
              f"{sum(not r['identical'] for r in injected)} with different outputs, "
              f"{sum(len(r['leftovers']) for r in injected)} leftovers; temporaries of killed commands removed by "
              f"`pipelines.sweep`: {sum(r.get('swept', 0) for r in injected)}.",
              "",
              "Two runs at once (the second started at 30 % of the first's stage):", "",
              "| scenario | overlapped | second refused | its error lines | first completed | outputs identical | "
              "`dvc status` clean | leftovers |", "|---|---|---|---|---|---|---|---|"]
    for c in res.get("concurrent", []):
        lines.append(f"| {c['scenario']} | {_yes(c['overlapped'])} | {_yes(c['second_refused'])} | "
                     f"{c['second_error_lines']} | {_yes(c['first_completed'])} | {_yes(c['identical'])} | "
                     f"{_yes(c['status_clean'])} | {len(c['leftovers'])} |")
    if res.get("concurrent"):
        lines += ["", f"The second run's one line: `{res['concurrent'][0]['second_error']}`"]
    lines += _disk_markdown(res.get("disk", [])) + _served_markdown(res.get("served", []))
    lines += _fuzz_markdown(res.get("fuzz"))
    lines += ["",
              "Each kill (moment: early 5-30 %, mid 35-65 %, late 75-98 % of the stage's duration):", "",
              "| stage | moment | at s | injected | recovered | identical | swept | leftovers |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['moment']} | {r['at_s']} | {'yes' if r['injected'] else 'no (done)'} | "
                     f"{'yes' if r['recovered'] else 'NO'} | {'yes' if r['identical'] else 'NO: ' + ', '.join(r['differences'])} | "
                     f"{r.get('swept', 0)} | {', '.join(r['leftovers']) or '–'} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- bench.faults: begin -->", "<!-- bench.faults: end -->"


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between the page's ``bench.faults`` markers (appended with them when the page has none)."""
    page = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    if BEGIN in page and END in page:
        page = page[:page.index(BEGIN)] + block + page[page.index(END) + len(END):].lstrip("\n")
    else:
        page = page.rstrip() + ("\n\n" if page else "") + block
    path.write_text(page)


SERVED_EXPECTED = ("CRASHED", "CANCELLED", "FAILED")
"""The final state each served scenario must leave its run in: killed, cancelled, refused (in run order)."""


def _disk_ok(d: dict[str, Any]) -> bool:
    return (d["error_lines"] == 1 and not d["traceback"] and d["names_fault"] and d["previous_intact"]
            and not d["leftovers"] and d["rerun_ok"] and d["rerun_identical"])


def _served_ok(r: dict[str, Any], want: str) -> bool:
    return (r["final_state"] == want and r["injected"] and r["identical"] and r["params_unchanged"]
            and r["status_clean"] and not r["leftovers"] and not r["orphans"] and not r.get("orphans_after_kill")
            and r["rerun_state"] in ("COMPLETED", "–") and r.get("first_completed", True))


def failures(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of every table that miss the target (all recovered, identical, no leftovers, one error line)."""
    bad = [r for r in res["rows"] if r["injected"] and (not r["recovered"] or not r["identical"] or r["leftovers"])]
    bad += [c for c in res["concurrent"] if not (c["second_refused"] and c["first_completed"] and c["identical"])]
    bad += [d for d in res.get("disk", []) if not _disk_ok(d)]
    bad += [r for r, want in zip(res.get("served", []), SERVED_EXPECTED) if not _served_ok(r, want)]
    fuzz = res.get("fuzz")
    if fuzz and (fuzz["exit_code"] != 0 or not fuzz["properties"]
                 or any(c["failing"] for c in fuzz["properties"].values())):
        bad.append(fuzz)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3, help="kills per stage (early, mid, late, early, ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages")
    ap.add_argument("--report", type=Path, default=None, help="write the Markdown report here")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--no-disk", action="store_true", help="skip the full-disk scenarios")
    ap.add_argument("--no-prefect", action="store_true", help="skip the scenarios through the served deployment")
    ap.add_argument("--no-fuzz", action="store_true", help="skip the property-based tests of the inputs")
    args = ap.parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or args.kills < 1:
        print(f"error: --stages must name some of {', '.join(STAGES)} (got {unknown}); --kills >= 1", file=sys.stderr)
        return 2
    res = run(args.kills, args.seed, stages, with_disk=not args.no_disk, with_prefect=not args.no_prefect,
              with_fuzz=not args.no_fuzz)
    text = report_markdown(res)
    print(text)
    if args.report is not None:
        write_section(args.report, text)
    write_figures(args.json, res)
    return 1 if failures(res) else 0


if __name__ == "__main__":
    raise SystemExit(main())
