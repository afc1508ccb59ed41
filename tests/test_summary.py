"""pipelines.summary: the table `make repro` ends with, from what the stages wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipelines.summary import summary_text
from tests.conftest import REPO_ROOT

from lpt.cli import record_stage_time

METRICS = {"overall": 0.7319, "many": 0.6954, "medium": 0.7917, "few": 0.7047, "ece": 0.0166, "top5": 0.97}


def _project(tmp_path: Path, gate: dict | None) -> Path:
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/metrics.json").write_text(json.dumps(METRICS))
    if gate is not None:
        (tmp_path / "reports/gate.json").write_text(json.dumps(gate))
    (tmp_path / "models/export").mkdir(parents=True)
    (tmp_path / "models/export/model.onnx").write_bytes(b"\0" * 2_500_000)
    return tmp_path


def test_a_passing_run_shows_metrics_gate_artifacts_and_stage_times(tmp_path: Path) -> None:
    repo = _project(tmp_path, {"passed": True, "failures": []})
    runs = repo / ".lpt/runs"
    runs.mkdir(parents=True)
    now = time.time()
    (runs / "ingest.json").write_text(json.dumps({"stage": "ingest", "seconds": 4.04, "finished": now - 100}))
    (runs / "phase1.json").write_text(json.dumps({"stage": "phase1", "seconds": 95.25, "finished": now}))
    (runs / "evaluate.json").write_text(json.dumps({"stage": "evaluate", "seconds": 3.0, "finished": "soon"}))
    lines = summary_text(repo, since=now - 10, status=0).splitlines()
    assert lines[0] == "== what this run achieved (dvc repro exit status 0) =="
    assert lines[1] == "test (reports/metrics.json, %): overall 73.19 | many 69.54 | medium 79.17 | few 70.47 | ECE 1.66"
    assert lines[2] == "gate: passed (reports/gate.json)"
    assert lines[3] == "exported model: models/export/model.onnx (2.5 MB); from an earlier run (export did not run this time)"
    assert lines[4] == "task pack: not written (models/pack/synthetic_lt.pack)"
    rows = {line.split()[0]: line.split()[1:] for line in lines[6:]}
    assert rows["ingest"] == ["cached", "4.0", "s", "(earlier)"] and rows["phase1"] == ["ran", "95.2", "s"]
    assert rows["evaluate"] == ["-", "-"] and list(rows)[:3] == ["params", "ingest", "validate"]


def test_a_failed_gate_names_its_thresholds_and_how_to_get_the_passing_reports_back(tmp_path: Path) -> None:
    repo = _project(tmp_path, {"passed": False, "failures": ["few = 0.1000 < min_few = 0.2000"]})
    text = summary_text(repo, status=4)
    assert "exported model: models/export/model.onnx (2.5 MB)\n" in text  # no --since: no claim on when
    assert "gate: FAILED (reports/gate.json); export and pack refuse this checkpoint" in text
    assert "  - few = 0.1000 < min_few = 0.2000" in text
    assert ("`git checkout -- reports/metrics.json reports/gate.json && python -m pipelines.restore evaluate`"
            in text)


def test_no_gate_verdict_and_bad_params_are_said_in_one_line(tmp_path: Path) -> None:
    repo = _project(tmp_path, None)
    assert "gate: no verdict (reports/gate.json not written" in summary_text(repo)
    (repo / "params.yaml").write_text("seed: -1\n")
    text = summary_text(repo)
    assert text.splitlines()[1].startswith("params: ") and "seed" in text


def test_a_stage_command_records_its_wall_time_and_nothing_else_does(tmp_path: Path) -> None:
    assert record_stage_time({}) is None
    assert record_stage_time({"DVC_STAGE": "phase1", "DVC_ROOT": str(tmp_path), "RANK": "1"}) is None
    env = {**os.environ, "DVC_STAGE": "params", "DVC_ROOT": str(tmp_path)}
    lpt = Path(sys.executable).parent / "lpt"
    subprocess.run([str(lpt), "params", "check", str(REPO_ROOT / "params.yaml")], env=env, check=True,
                   capture_output=True)
    record = json.loads((tmp_path / ".lpt/runs/params.json").read_text())
    assert record["stage"] == "params" and 0 < record["seconds"] < 60 and record["finished"] <= time.time()
