"""``python -m bench.packs`` end to end on the tiny geometry (slow: it exports a graph per task and starts a
process per configuration). Checks that the three ways agree and every figure is there; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, make_tiny_params

pytestmark = pytest.mark.slow


def test_bench_packs_runs_and_reports_every_figure(tmp_path: Path) -> None:
    from lpt.config import write_params_atomic

    params = make_tiny_params(tmp_path)
    write_params_atomic(tmp_path / "params.yaml", params.to_dict())
    out = tmp_path / "packs.json"
    proc = subprocess.run([sys.executable, "-m", "bench.packs", "--params", str(tmp_path / "params.yaml"),
                           "--tasks", "1,2", "--rounds", "2", "--latency-tasks", "2", "--threads", "1",
                           "--json", str(out)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {(r["config"], r["tasks"]) for r in res["memory"]} == {("baseline", 0)} | {
        (c, n) for c in ("single", "packs", "shared_init") for n in (1, 2)}
    assert all(r["rss_mb"] > 0 for r in res["memory"])
    disk = res["disk_bytes"]["2"]
    assert disk["packs"] < disk["single"]  # one backbone graph + 2 packs vs 2 whole exports
    assert set(res["latency"]) == {"1", "32"} and set(res["goals"]) == {
        "memory_2_packs_vs_one_single", "latency_packs_vs_single_worst_batch"}
    assert "goal memory_2_packs_vs_one_single" in proc.stdout
