"""pipelines.metrics_check: this run's metrics against the committed ones, within a tolerance."""

from __future__ import annotations

import doctest
import json
import shutil
import subprocess
from pathlib import Path

import pipelines.metrics_check
from pipelines.metrics_check import main
from tests.conftest import REPO_ROOT


def test_the_module_examples_hold() -> None:
    assert doctest.testmod(pipelines.metrics_check).failed == 0


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=repo, check=True,
                   capture_output=True)


def test_the_command_passes_within_the_tolerance_and_names_what_is_not(tmp_path: Path, capsys) -> None:
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "reports").mkdir()
    metrics = tmp_path / "reports/metrics.json"
    metrics.write_text(json.dumps({"overall": 0.7319, "few": 0.7047, "num_samples": 10000, "gate_passed": True}))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "metrics")
    metrics.write_text(json.dumps({"overall": 0.7321, "few": 0.7040, "num_samples": 10000, "gate_passed": True}))
    assert main(["--repo", str(tmp_path)]) == 0
    assert "all 4 numbers within 0.001 of HEAD's" in capsys.readouterr().out
    metrics.write_text(json.dumps({"overall": 0.7419, "few": 0.7047, "num_samples": 9999, "gate_passed": True}))
    assert main(["--repo", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "reports/metrics.json: overall: 0.7419 vs committed 0.7319" in err
    assert "num_samples: 9999 vs committed 10000 (counts must be equal)" in err and "few" not in err
    assert main(["--repo", str(tmp_path), "--tolerance", "0.02"]) == 1  # the count still differs
    assert "overall" not in capsys.readouterr().err
    metrics.write_text("[1, 2]")  # JSON, but not an object of metrics: one line, no traceback
    assert main(["--repo", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: reports/metrics.json: cannot read this run's metrics")
    metrics.unlink()
    assert main(["--repo", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: reports/metrics.json: cannot read this run's metrics")
