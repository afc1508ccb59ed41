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

A kill that comes after the stage already finished is counted as not injected. ``--report`` writes the table
(docs/reliability.md). Run it on an idle machine: the moments are fractions of measured durations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.timing import write_figures  # noqa: E402

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


def run(kills: int, seed: int, stages: tuple[str, ...]) -> dict[str, Any]:
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
    return {"concurrent": concurrent, "kills_per_stage": kills, "seed": seed, "stage_seconds": durations, "fault_free_rerun_identical": deterministic,
            "rows": rows, "wall_s": round(time.perf_counter() - wall0, 1)}


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def report_markdown(res: dict[str, Any]) -> str:
    rows = res["rows"]
    injected = [r for r in rows if r["injected"]]
    lines = ["## Killing every stage (`python -m bench.faults`)", "",
             "Generated by `python -m bench.faults --report docs/reliability.md` (the tests' tiny params in a temp "
             "git + DVC copy of the project; SIGKILL to the stage's whole process group at seeded moments of its "
             "measured duration, then `python -m pipelines.sweep`, `dvc repro`, the sweep again: what `make repro` runs). Same machine for every run: outputs are compared by "
             "their `dvc.lock` hashes.", "",
             f"Seed {res['seed']}, {res['kills_per_stage']} kills per stage; harness wall time {res['wall_s']:.0f} s.",
             "", "| stage | stage s | fault-free re-run identical | injected | recovered | outputs identical | "
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3, help="kills per stage (early, mid, late, early, ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages")
    ap.add_argument("--report", type=Path, default=None, help="write the Markdown report here")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or args.kills < 1:
        print(f"error: --stages must name some of {', '.join(STAGES)} (got {unknown}); --kills >= 1", file=sys.stderr)
        return 2
    res = run(args.kills, args.seed, stages)
    text = report_markdown(res)
    print(text)
    if args.report is not None:
        write_section(args.report, text)
    write_figures(args.json, res)
    bad = [r for r in res["rows"] if r["injected"] and (not r["recovered"] or not r["identical"] or r["leftovers"])]
    bad += [c for c in res["concurrent"] if not (c["second_refused"] and c["first_completed"] and c["identical"])]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
