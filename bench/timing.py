"""Timing helpers shared by the benchmarks (torch-free: the packs bench measures memory in child processes)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["round_robin", "write_figures"]


def write_figures(path: Path | None, figures: Any) -> None:
    """Write a bench's figures as indented JSON to ``path`` (its folder created; nothing when ``path`` is None).

    Values JSON does not know (paths, numpy scalars) are written as their ``str``.
    """
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n")


def round_robin(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each call of each function, timed one call of each per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times
