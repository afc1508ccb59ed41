"""Timing helpers shared by the benchmarks (torch-free: the packs bench measures memory in child processes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["round_robin"]


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
