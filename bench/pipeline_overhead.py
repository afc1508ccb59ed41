"""What the Prefect flow costs on top of plain DVC: the whole pipeline, forced, measured side by side.

Usage::

    python -m bench.pipeline_overhead --tiny                 # tiny params: a quick figure (~5 min on 2 cores)
    python -m bench.pipeline_overhead                        # the embedded default params.yaml (long on CPU)
    python -m bench.pipeline_overhead --tiny --rounds 3 --json reports/bench/pipeline_overhead.json

Both contenders run in the same throw-away copy of the project (dvc.yaml, ``lpt/`` as stage deps,
``pipelines/`` for ``python -m pipelines.launch`` in the training stages, params, one git commit) so the
real workspace is never touched:

- ``dvc``: ``python -m dvc repro --force`` (one DVC process runs every stage);
- ``flow``: the ``lpt`` flow with ``force=True`` (the stage graph read through DVC's index, then one
  task and one ``dvc repro --single-item --force`` per stage, output streamed into the run logger,
  artifacts published: the ONNX link reads the export stage's md5 back from ``dvc.lock``).

A warm-up flow run of the first stage starts the Prefect API (a temporary local server unless
``PREFECT_API_URL`` points at one) and warms imports, so neither is in the timings; a forced run
recomputes everything anyway, so nothing else needs building first. Rounds alternate which
contender goes first; the figure is the median of each. Goal: ``flow`` at most 10 % slower.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import yaml  # noqa: E402

from pipelines.dvc_stages import dvc_env  # noqa: E402
from bench.timing import write_figures

ROOT = Path(__file__).resolve().parents[1]
GOAL_OVERHEAD_PCT = 10.0


def make_project_copy(dest: Path, params: dict[str, Any]) -> Path:
    """A git + DVC repo at ``dest``: the project's dvc.yaml, snapshots of ``lpt/`` and ``pipelines/``, ``params``."""
    dest.mkdir(parents=True)
    env = dvc_env()
    run = lambda *cmd: subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)  # noqa: E731
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    shutil.copy(ROOT / "dvc.yaml", dest / "dvc.yaml")
    if (ROOT / ".dvc" / "plots").is_dir():
        shutil.copytree(ROOT / ".dvc" / "plots", dest / ".dvc" / "plots", dirs_exist_ok=True)
    for package in ("lpt", "pipelines"):  # stage deps; training stages run `python -m pipelines.launch`
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "add", "-A")
    run("git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench copy")
    return dest


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_dvc(repo: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``dvc repro --force`` over the whole pipeline (output discarded)."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", "repro", "--force"], cwd=repo, env=dvc_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _cpu_seconds() - cpu


def time_flow(repo: Path, force: bool = True) -> tuple[float, float, list[dict[str, Any]]]:
    """Wall and CPU seconds of the ``lpt`` flow (run in this process) and its per-stage results.

    CPU covers this process (Prefect engine, log shipping) and the DVC calls; a temporary API server
    runs in its own process and is not counted.
    """
    from pipelines.flow import lpt

    cpu, start = _cpu_seconds(), time.perf_counter()
    state = lpt(repo_dir=str(repo), force=force, return_state=True)
    wall = time.perf_counter() - start
    if not state.is_completed():  # the message names the stage, its command's exit code and verdict
        raise RuntimeError(f"flow run failed: {state.message}")
    return wall, _cpu_seconds() - cpu, state.result()


def measure(repo: Path, rounds: int) -> dict[str, Any]:
    """Warm up, then ``rounds`` forced runs of each contender, alternating which goes first."""
    from pipelines.dvc_stages import pipeline_order

    first = pipeline_order(repo)[0].name
    print(f"warm-up: flow run of stage {first!r} (starts the Prefect API, warms imports) ...", flush=True)
    from pipelines.flow import lpt

    start = time.perf_counter()
    warm = lpt(repo_dir=str(repo), target=first, return_state=True)
    if not warm.is_completed():
        raise RuntimeError(f"warm-up flow run failed: {warm.message}")
    warm_s = time.perf_counter() - start
    wall: dict[str, list[float]] = {"dvc": [], "flow": []}
    cpu: dict[str, list[float]] = {"dvc": [], "flow": []}
    stage_seconds: list[dict[str, float]] = []
    for r in range(rounds):
        for name in (("dvc", "flow") if r % 2 == 0 else ("flow", "dvc")):
            if name == "dvc":
                w, c = time_dvc(repo)
            else:
                w, c, results = time_flow(repo)
                stage_seconds.append({x["stage"]: x["seconds"] for x in results})
            wall[name].append(w)
            cpu[name].append(c)
            print(f"round {r + 1}/{rounds} {name:>4}: {w:7.1f} s wall, {c:7.1f} s cpu", flush=True)
    med = {f"{k}_{n}": statistics.median(v[n]) for k, v in (("wall", wall), ("cpu", cpu)) for n in ("dvc", "flow")}
    per_stage = {k: statistics.median(s[k] for s in stage_seconds) for k in stage_seconds[0]}
    return {
        "warmup_s": round(warm_s, 2),
        "dvc_repro_force_wall_s": [round(t, 2) for t in wall["dvc"]],
        "flow_force_wall_s": [round(t, 2) for t in wall["flow"]],
        "dvc_repro_force_cpu_s": [round(t, 2) for t in cpu["dvc"]],
        "flow_force_cpu_s": [round(t, 2) for t in cpu["flow"]],
        "dvc_median_s": round(med["wall_dvc"], 2),
        "flow_median_s": round(med["wall_flow"], 2),
        "overhead_pct": round(100.0 * (med["wall_flow"] - med["wall_dvc"]) / med["wall_dvc"], 1),
        "dvc_median_cpu_s": round(med["cpu_dvc"], 2),
        "flow_median_cpu_s": round(med["cpu_flow"], 2),
        "cpu_overhead_pct": round(100.0 * (med["cpu_flow"] - med["cpu_dvc"]) / med["cpu_dvc"], 1),
        "flow_stage_dvc_call_s": {k: round(v, 2) for k, v in per_stage.items()},
        "goal_overhead_pct": GOAL_OVERHEAD_PCT,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny params (tests/conftest.py) for a quick figure")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="params file (ignored with --tiny)")
    ap.add_argument("--rounds", type=int, default=None, help="forced runs of each contender (default: 3 tiny, 1 full)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the throw-away project copy")
    args = ap.parse_args(argv)

    if args.tiny:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import tiny_raw_params

        params, label = tiny_raw_params(), "tiny params (tests/conftest.py)"
    else:
        from lpt.config import read_raw

        params, label = read_raw(args.params), str(args.params)
    rounds = args.rounds or (3 if args.tiny else 1)
    work = Path(tempfile.mkdtemp(prefix="lpt-bench-overhead-"))
    try:
        repo = make_project_copy(work / "repo", params)
        res = {"params": label, "rounds": rounds, "python": sys.version.split()[0], "cpus": os.cpu_count(),
               "prefect_api": os.environ.get("PREFECT_API_URL", "temporary local server"), **measure(repo, rounds)}
    finally:
        if args.keep:
            print(f"project copy kept at {work / 'repo'}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    verdict = "OK" if res["overhead_pct"] <= GOAL_OVERHEAD_PCT else "ABOVE GOAL"
    print(f"\nwhole pipeline, forced, {label}, median of {rounds}:")
    print(f"  dvc repro -f          {res['dvc_median_s']:8.1f} s")
    print(f"  prefect flow (force)  {res['flow_median_s']:8.1f} s")
    print(f"  overhead              {res['overhead_pct']:+7.1f} %   (goal <= {GOAL_OVERHEAD_PCT:.0f} %: {verdict})")
    print(f"  CPU time: dvc {res['dvc_median_cpu_s']:.1f} s, flow {res['flow_median_cpu_s']:.1f} s, "
          f"{res['cpu_overhead_pct']:+.1f} % (less sensitive to a busy machine than wall time)")
    print("  flow, per stage (one dvc call each): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in res["flow_stage_dvc_call_s"].items()))
    write_figures(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
