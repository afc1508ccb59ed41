"""Names of ``lpt compare``'s folder layout, shared by the writer (:mod:`lpt.compare`) and a reader (the gate's
probe, :func:`lpt.gate.probe_metrics_path`), like :mod:`lpt.data.layout` for the shards folder.

``<evaluate.out_dir>/compare/<data.source>/<method>/seed<seed>/`` holds one cell: ``models/``, ``eval/`` (its
test metrics) and ``cell.json``.
"""

from __future__ import annotations

from pathlib import Path

from lpt.config import Params

__all__ = ["compare_root", "compare_cell_dir", "cell_metrics_path"]


def compare_root(params: Params) -> Path:
    """Where ``lpt compare`` trains and evaluates each method for ``data.source``."""
    return Path(params.evaluate.out_dir) / "compare" / params.data.source


def compare_cell_dir(params: Params, method: str, seed: int) -> Path:
    """``<compare_root>/<method>/seed<seed>``: one method at one seed (``models/``, ``eval/``, ``cell.json``)."""
    return compare_root(params) / method / f"seed{int(seed)}"


def cell_metrics_path(params: Params, method: str, seed: int) -> Path:
    """The evaluated test metrics of one cell."""
    return compare_cell_dir(params, method, seed) / "eval" / "metrics.json"
