"""Are this run's metrics the committed ones, within a tolerance? ``python -m pipelines.metrics_check``.

The pipeline's outputs are byte-identical run to run on one machine with one set of library versions
(``dvc repro -f`` twice writes the same ``dvc.lock``). On another machine (another CPU, BLAS or thread
count) float sums round differently in the low bits, so the trained tensors — and with them the hashes
in ``dvc.lock`` — differ, while every metric stays equal within a tolerance. This is that check: each
number of ``<evaluate.out_dir>/metrics.json`` in the work tree against the same file in git's ``HEAD``
(``--ref``), at most ``--tolerance`` apart (default 1e-3; counts such as ``num_samples`` must be equal).
CI runs it after ``make repro`` on a fresh clone.

Exit status: 0 all within the tolerance, 1 a metric outside it (each named, with both values), 2 a file
missing or unreadable (one line naming it).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lpt.config import ParamsError, load_params
from lpt.utils import JsonFileError, read_json

__all__ = ["metric_differences", "main"]

DEFAULT_TOLERANCE = 1e-3


def metric_differences(committed: dict[str, Any], current: dict[str, Any],
                       tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """One line per number of ``committed`` that ``current`` lacks or holds more than ``tolerance`` away.

    Integers (counts) must be equal; booleans too. Non-numeric values are not compared.

    >>> metric_differences({"overall": 0.7319, "num_samples": 10000}, {"overall": 0.7324, "num_samples": 10000})
    []
    >>> metric_differences({"overall": 0.7319, "few": 0.70}, {"overall": 0.7339})
    ['overall: 0.7339 vs committed 0.7319 (|diff| 0.002 > 0.001)', 'few: missing (committed 0.7)']
    """
    problems = []
    for key, want in committed.items():
        if not isinstance(want, (int, float)):
            continue
        got = current.get(key)
        if not isinstance(got, (int, float)) or isinstance(got, bool) != isinstance(want, bool):
            problems.append(f"{key}: missing (committed {want})")
        elif isinstance(want, (bool, int)) and not isinstance(want, float):
            if got != want:
                problems.append(f"{key}: {got} vs committed {want} (counts must be equal)")
        elif not math.isclose(got, want, rel_tol=0.0, abs_tol=tolerance):
            problems.append(f"{key}: {got:.4g} vs committed {want:.4g} (|diff| {abs(got - want):.3g} > {tolerance:g})")
    return problems


def _committed(repo: Path, ref: str, path: Path) -> dict[str, Any]:
    result = subprocess.run(["git", "show", f"{ref}:{path.as_posix()}"], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise FileNotFoundError(f"{ref}:{path}: not in git ({result.stderr.strip() or 'git show failed'})")
    value = json.loads(result.stdout)
    if not isinstance(value, dict):
        raise ValueError(f"{ref}:{path}: expected a JSON object of metrics, got {type(value).__name__}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    from lpt.evaluate import METRICS_FILE

    parser = argparse.ArgumentParser(prog="python -m pipelines.metrics_check", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="project root (default: .)")
    parser.add_argument("--ref", default="HEAD", help="the git revision holding the committed metrics")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest |difference| allowed")
    args = parser.parse_args(argv)
    repo = Path(args.repo)
    try:
        path = Path(load_params(repo / "params.yaml").evaluate.out_dir) / METRICS_FILE
        committed = _committed(repo, args.ref, path)
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        current = read_json(repo / path, "metrics file")
    except JsonFileError as err:
        print(f"error: {path}: cannot read this run's metrics ({err}); run the pipeline first (`make repro`)",
              file=sys.stderr)
        return 2
    problems = metric_differences(committed, current, args.tolerance)
    for line in problems:
        print(f"{path}: {line}", file=sys.stderr)
    numbers = sum(isinstance(v, (int, float)) for v in committed.values())
    if not problems:
        print(f"{path}: all {numbers} numbers within {args.tolerance:g} of {args.ref}'s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
