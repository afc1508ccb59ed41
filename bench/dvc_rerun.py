"""What `dvc exp run -S KEY=VALUE` re-runs, and how long it takes, at two revisions side by side.

For each revision: a fresh `git clone` of this repository in a temp folder, `dvc repro` to populate its
outputs and cache (not timed), then for each override one timed `dvc exp run -S ...` (the README's
example first), recording which stages DVC ran and the wall time; the workspace is reset to the
revision's params between overrides. Run it on an otherwise idle machine.

    python -m bench.dvc_rerun                                  # 38faca8 (before issue 9) vs HEAD
    python -m bench.dvc_rerun --revs HEAD --set export.int8=true

Each revision runs its own code (``PYTHONPATH`` = the clone) with this checkout's virtual environment.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import write_figures

REPO = Path(__file__).resolve().parents[1]
BEFORE = "38faca8"  # the last commit before the `dvc repro` contract work (issue 9)
DEFAULT_SETS = ["train.phase2.epochs=1", "evaluate.gate.min_few=0.1", "export.int8=true"]
_RAN = re.compile(r"Running stage '(?P<stage>[^']+)'")


def _env(clone: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(clone),
            "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
            "PYTHONDONTWRITEBYTECODE": "1"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], *, check: bool = True) -> tuple[float, str, int]:
    """Run ``cmd``; (wall seconds, output, exit code). ``check``: a failure ends the benchmark."""
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if check and result.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed in {cwd}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr, result.returncode


def measure(rev: str, sets: list[str], root: Path) -> dict[str, object]:
    """Clone ``rev``, populate it, then time one ``dvc exp run -S`` per override."""
    clone = root / rev.replace("/", "_")
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
    env = _env(clone)
    populate, _, _ = _run([sys.executable, "-m", "dvc", "repro"], clone, env)
    subprocess.run(["git", "-c", "user.email=b@b", "-c", "user.name=bench", "commit", "-qam", "populated"],
                   cwd=clone, env=env, check=False)
    rows = []
    for override in sets:
        # a stage may refuse the override (e.g. the export's accuracy check): recorded, not fatal
        seconds, log, code = _run([sys.executable, "-m", "dvc", "exp", "run", "-S", override], clone, env, check=False)
        rows.append({"set": override, "seconds": round(seconds, 1), "ran": _RAN.findall(log), "exit": code})
        print(f"[bench] {rev}: -S {override}: ran {', '.join(_RAN.findall(log)) or 'nothing'} in {seconds:.1f} s"
              + (f" (exit {code})" if code else ""), flush=True)
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=clone, check=True)
        _run([sys.executable, "-m", "dvc", "checkout", "--force"], clone, env)
    return {"rev": rev, "commit": _commit(clone), "populate_seconds": round(populate, 1), "runs": rows}


def _commit(clone: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.dvc_rerun", description=__doc__.splitlines()[0])
    ap.add_argument("--revs", default=f"{BEFORE},HEAD", help="comma-separated git revisions (default: %(default)s)")
    ap.add_argument("--set", action="append", dest="sets", metavar="KEY=VALUE",
                    help=f"override to time (repeatable; default: {', '.join(DEFAULT_SETS)})")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    sets = args.sets or DEFAULT_SETS
    results = []
    with tempfile.TemporaryDirectory(prefix="lpt-rerun-") as tmp:
        for rev in args.revs.split(","):
            print(f"[bench] {rev}: clone, dvc repro (populate), then {len(sets)} x dvc exp run", flush=True)
            results.append(measure(rev.strip(), sets, Path(tmp)))
    print("\n| revision | dvc exp run -S | stages re-run | wall s | exit |\n|---|---|---|---|---|")
    for res in results:
        for row in res["runs"]:
            print(f"| {res['rev']} ({res['commit']}) | `{row['set']}` | {', '.join(row['ran']) or 'none'} | {row['seconds']} | {row['exit']} |")
    if len(results) == 2:
        for a, b in zip(results[0]["runs"], results[1]["runs"]):
            print(f"{a['set']}: {results[1]['rev']} / {results[0]['rev']} wall = {b['seconds'] / max(a['seconds'], 1e-9):.2f}")
    write_figures(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
