"""What a pipeline run achieved, in one short table: ``python -m pipelines.summary [--since T] [--status RC]``.

``make repro`` prints it after ``dvc repro``, passed or failed. It reads what the stages wrote:

- the test metrics (``<evaluate.out_dir>/metrics.json``): overall, many / medium / few, ECE;
- the gate verdict (``gate.json``): passed, or each failing threshold, and — when it failed — that the
  failing run's reports stay in the work tree as the evidence, and how to get the last passing ones back;
- the exported model and the pack, with their sizes (or that they were not written);
- the wall time of each stage's last command, from ``.lpt/runs/<stage>.json`` (written by the ``lpt``
  command a stage runs; not a DVC output, so no timing ever enters a tracked file), marked ``ran`` when it
  finished after ``--since`` (the run's start, seconds since the epoch) and ``cached`` otherwise.

Exit status: 0 (the summary is a report, not a verdict; ``make repro`` exits with ``dvc repro``'s status).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lpt.config import ParamsError, load_params
from lpt.utils import JsonFileError, read_json

__all__ = ["RUNS_DIR", "stage_rows", "summary_text", "main"]

RUNS_DIR = Path(".lpt/runs")
"""Where each stage command records its wall time (:func:`lpt.cli.record_stage_time`)."""


def _read(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``; ``None`` when it is missing or damaged (the summary says "not written")."""
    try:
        return read_json(path)
    except JsonFileError:
        return None


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def stage_rows(repo: Path, since: float | None) -> list[tuple[str, str, str]]:
    """``(stage, ran | cached | -, wall time)`` for each stage of ``dvc.yaml``, in pipeline order."""
    from pipelines.dvc_stages import DvcYamlError, read_stages

    try:
        stages = [s.name for s in read_stages(repo)]
    except DvcYamlError:
        return []
    rows = []
    for name in stages:
        record = _read(repo / RUNS_DIR / f"{name}.json")
        if record is None or not all(isinstance(record.get(k), (int, float)) for k in ("seconds", "finished")):
            rows.append((name, "-", "-"))  # none, or not one this command wrote
            continue
        ran = since is None or record["finished"] >= since
        rows.append((name, "ran" if ran else "cached", f"{record['seconds']:.1f} s" + ("" if ran else " (earlier)")))
    return rows


def _metrics_line(metrics: dict[str, Any] | None, path: Path) -> str:
    if metrics is None:
        return f"test metrics: none ({path} not written)"
    cells = [f"{key} {100 * metrics[key]:.2f}" for key in ("overall", "many", "medium", "few")
             if isinstance(metrics.get(key), (int, float))]
    if isinstance(metrics.get("ece"), (int, float)):
        cells.append(f"ECE {100 * metrics['ece']:.2f}")
    return f"test ({path}, %): " + " | ".join(cells)


def _gate_lines(gate: dict[str, Any] | None, path: Path, metrics_path: Path) -> list[str]:
    if gate is None:
        return [f"gate: no verdict ({path} not written: evaluate did not run to the end)"]
    if gate.get("passed") is True:
        return [f"gate: passed ({path})"]
    lines = [f"gate: FAILED ({path}); export and pack refuse this checkpoint"]
    lines += [f"  - {failure}" for failure in gate.get("failures", [])]
    lines += [f"  the failing run's {metrics_path} and {path} stay in the work tree (the evidence);",
              f"  the last passing ones: `git checkout -- {metrics_path} {path} && python -m pipelines.restore "
              "evaluate`"]
    return lines


def _artifact_line(label: str, path: Path) -> str:
    return f"{label}: {path} ({_size(path)})" if path.is_file() else f"{label}: not written ({path})"


def summary_text(repo: str | Path = ".", since: float | None = None, status: int | None = None) -> str:
    """The run's summary (see the module docstring).

    Args:
        repo: the project root (params.yaml, dvc.yaml).
        since: the run's start (seconds since the epoch): stages whose command finished later ``ran``.
        status: ``dvc repro``'s exit status, shown in the first line when given.
    """
    from lpt.evaluate import METRICS_FILE
    from lpt.export import MODEL_FILE
    from lpt.gate import GATE_FILE
    from lpt.pack import PACK_SUFFIX

    repo = Path(repo)
    head = "what this run achieved" + ("" if status is None else f" (dvc repro exit status {status})")
    try:
        params = load_params(repo / "params.yaml")
    except ParamsError as err:
        return f"== {head} ==\nparams: {err}"
    reports = Path(params.evaluate.out_dir)
    metrics_path, gate_path = reports / METRICS_FILE, reports / GATE_FILE
    lines = [f"== {head} ==", _metrics_line(_read(repo / metrics_path), metrics_path)]
    lines += _gate_lines(_read(repo / gate_path), gate_path, metrics_path)
    model, pack = Path(params.export.out_dir) / MODEL_FILE, Path(params.pack.out_dir) / f"{params.pack.name}{PACK_SUFFIX}"
    rows = stage_rows(repo, since)
    ran = {name for name, state, _ in rows if state == "ran"}
    for label, stage, path in (("exported model", "export", model), ("task pack", "pack", pack)):
        line = _artifact_line(label, repo / path).replace(str(repo / path), str(path))
        if since is not None and stage not in ran and (repo / path).is_file():
            line += f"; from an earlier run ({stage} did not run this time)"
        lines.append(line)
    if rows:
        width = max(len(name) for name, _, _ in rows)
        lines.append(f"{'stage'.ljust(width)}  {'run':6}  wall time of its last command")
        lines += [f"{name.ljust(width)}  {state:6}  {wall}" for name, state, wall in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=".", help="project root (default: .)")
    parser.add_argument("--since", type=float, default=None, help="the run's start, seconds since the epoch")
    parser.add_argument("--status", type=int, default=None, help="dvc repro's exit status")
    args = parser.parse_args(argv)
    print(summary_text(args.repo, args.since, args.status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
