"""The Prefect flow over DVC: stage order from dvc.yaml, cached reporting, retries, failures, overrides,
artifacts and live log streaming.

Two kinds of real DVC repos in tmp dirs (git init + dvc init): toy ones whose stages are shell commands
(fast; they exercise the orchestration itself) and one holding the project's dvc.yaml, ``lpt/`` and the
tiny params (the real stages). Every flow runs under one session-scoped ``prefect_test_harness``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from pipelines.dvc_stages import DvcYamlError, is_transient_failure, pipeline_order
from pipelines.overrides import applied_overrides
from tests.conftest import REPO_ROOT, tiny_raw_params

from lpt.config import ParamsError

PY = sys.executable


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API + SQLite database for every flow test of the session (~15 s once)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _sh(*cmd: str, cwd: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)


def _dvc_repo(root: Path, scripts: dict[str, tuple[str, list[str], list[str]]], params: dict[str, Any] | None = None) -> Path:
    """A git + DVC repo whose stages run Python scripts: ``{stage: (code, deps, outs)}``, in that file order.

    params.yaml holds the tiny params (or ``params``); ``src`` is a dependency file the tests edit.
    """
    root.mkdir(parents=True, exist_ok=True)
    _sh("git", "init", "-q", cwd=root)
    _sh(PY, "-m", "dvc", "init", "-q", cwd=root)
    stages = {}
    for name, (code, deps, outs) in scripts.items():
        (root / f"{name}.py").write_text(code)
        stages[name] = {"cmd": f'"{PY}" {name}.py', "deps": [f"{name}.py", *deps], "outs": outs}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params or tiny_raw_params(), sort_keys=False))
    (root / "src").write_text("1\n")
    return root


def _project_repo(root: Path) -> Path:
    """A git + DVC repo with the project's dvc.yaml, a snapshot of ``lpt/`` (stage deps) and the tiny params.

    One commit is made: dvclive (in the training stages) needs a HEAD.
    """
    root.mkdir(parents=True, exist_ok=True)
    _sh("git", "init", "-q", cwd=root)
    _sh(PY, "-m", "dvc", "init", "-q", cwd=root)
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    if (REPO_ROOT / ".dvc" / "plots").is_dir():
        shutil.copytree(REPO_ROOT / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    shutil.copytree(REPO_ROOT / "lpt", root / "lpt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(), sort_keys=False))
    _sh("git", "add", "-A", cwd=root)
    _sh("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "tiny project", cwd=root)
    return root


@pytest.fixture
def toy_repo(tmp_path: Path) -> Path:
    """Three file-copying stages, listed out of order in dvc.yaml: prep -> mid -> last."""
    return _dvc_repo(tmp_path / "toy", {
        "last": ("import shutil; shutil.copytree('mid', 'last'); print('last done')", ["mid"], ["last"]),
        "prep": ("import os; os.makedirs('prep'); open('prep/x', 'w').write(open('src').read()); print('prep done')",
                 ["src"], ["prep"]),
        "mid": ("import shutil; shutil.copytree('prep', 'mid'); print('mid done')", ["prep/x"], ["mid"]),
    })


def _task_runs(flow_run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)


def _artifacts(flow_run_id: UUID) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def _logs(flow_run_id: UUID) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs are shipped in batches: send what is queued
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def _run(**kwargs: Any):
    from pipelines.flow import lpt

    return lpt(return_state=True, **kwargs)


# ------------------------------------------------------------------------------ DAG from dvc.yaml
def test_stage_order_follows_dvc_yaml_dependencies(toy_repo: Path) -> None:
    assert [s.name for s in pipeline_order(toy_repo)] == ["prep", "mid", "last"]
    assert [s.name for s in pipeline_order(toy_repo, target="mid")] == ["prep", "mid"]
    with pytest.raises(DvcYamlError, match="unknown target stage 'nope'"):
        pipeline_order(toy_repo, target="nope")


def test_project_dag_puts_every_stage_after_its_inputs() -> None:
    order = [s.name for s in pipeline_order(REPO_ROOT)]
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert sorted(order) == sorted(stages)
    assert order.index("ingest") < order.index("validate")
    assert order[-1] == "export" and order.index("evaluate") < order.index("export")
    assert [s.name for s in pipeline_order(REPO_ROOT, target="validate")] == ["ingest", "validate"]


def test_failure_classification() -> None:
    assert is_transient_failure(["Traceback ...", "OSError: [Errno 5] Input/output error"])
    assert is_transient_failure(["ERROR: Unable to acquire lock. Most likely another DVC process is running"])
    assert not is_transient_failure(["ValueError: bad shape"])
    assert not is_transient_failure(["error: data validation failed:", "  - OSError while reading shard"])
    assert not is_transient_failure(["error: quality gate failed:", "  - overall 0.1 < 0.5"])


# -------------------------------------------------------------------------------------- overrides
def test_overrides_validated_kept_on_success_restored_on_failure(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO_ROOT / "params.yaml", params)
    original = params.read_bytes()

    with pytest.raises(ParamsError, match=r"train\.phase1\.epoch: unknown key"):
        with applied_overrides(params, {"train.phase1.epoch": 3}):
            pytest.fail("must not get here")
    assert params.read_bytes() == original

    with pytest.raises(RuntimeError):
        with applied_overrides(params, {"train.phase1.epochs": 3}):
            assert yaml.safe_load(params.read_text())["train"]["phase1"]["epochs"] == 3
            raise RuntimeError("stage failed")
    assert params.read_bytes() == original

    with applied_overrides(params, {"train.phase1.epochs": 3}):
        pass
    text = params.read_text()
    assert yaml.safe_load(text)["train"]["phase1"]["epochs"] == 3
    assert "# The single source of truth" in text  # comments survive


# ---------------------------------------------------------------------------- flow on a toy repo
def test_flow_runs_in_order_then_reports_cached(prefect_harness: None, toy_repo: Path) -> None:
    first = _run(repo_dir=str(toy_repo))
    assert first.is_completed(), first.message
    assert [(r["stage"], r["status"]) for r in first.result()] == [("prep", "ran"), ("mid", "ran"), ("last", "ran")]
    assert [t.name for t in _task_runs(first.state_details.flow_run_id)] == ["prep", "mid", "last"]
    assert (toy_repo / "last" / "x").read_text() == "1\n"

    second = _run(repo_dir=str(toy_repo))
    assert [r["status"] for r in second.result()] == ["cached"] * 3
    messages = [log.message for log in _logs(second.state_details.flow_run_id)]
    assert any("didn't change, skipping" in m for m in messages)
    assert any("stage 'mid' cached" in m for m in messages)

    (toy_repo / "src").write_text("2\n")
    third = _run(repo_dir=str(toy_repo), target="prep")
    assert [(r["stage"], r["status"]) for r in third.result()] == [("prep", "ran")]


def test_stage_output_is_streamed_while_it_runs(prefect_harness: None, tmp_path: Path) -> None:
    code = "import os, time\nprint('first')\ntime.sleep(2)\nos.makedirs('o')\nprint('second')\n"
    repo = _dvc_repo(tmp_path / "slowprint", {"talk": (code, ["src"], ["o"])})
    state = _run(repo_dir=str(repo))
    assert state.is_completed(), state.message
    logs = {log.message: log.timestamp for log in _logs(state.state_details.flow_run_id)}
    # each line reaches the run logger when printed, not when the stage ends
    assert (logs["second"] - logs["first"]).total_seconds() > 1.5


def test_transient_failure_is_retried(prefect_harness: None, tmp_path: Path) -> None:
    code = ("import os, pathlib\n"
            "attempts = pathlib.Path('attempts')\n"
            "attempts.write_text((attempts.read_text() if attempts.exists() else '') + 'x')\n"
            "if len(attempts.read_text()) < 2:\n"
            "    raise OSError(5, 'Input/output error')  # the first attempt hits a flaky disk\n"
            "os.makedirs('o')\n")
    repo = _dvc_repo(tmp_path / "flaky", {"flaky": (code, ["src"], ["o"])})
    state = _run(repo_dir=str(repo))
    assert state.is_completed(), state.message
    assert (repo / "attempts").read_text() == "xx"
    [run] = _task_runs(state.state_details.flow_run_id)
    assert run.run_count == 2


def test_deterministic_failure_fails_the_flow_without_retry(prefect_harness: None, tmp_path: Path) -> None:
    code = "import sys\nprint('checking...')\nsys.exit('error: data validation failed: 3 expectations')\n"
    repo = _dvc_repo(tmp_path / "bad", {
        "first": ("import os; os.makedirs('a')", ["src"], ["a"]),
        "check": (code, ["a"], ["b"]),
        "after": ("import os; os.makedirs('c')", ["b"], ["c"]),
    })
    state = _run(repo_dir=str(repo))
    assert state.is_failed()
    assert "stage 'check' failed" in state.message
    assert "data validation failed: 3 expectations" in state.message  # its last error lines
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.name for r in runs] == ["first", "check"]  # 'after' never started
    assert runs[1].run_count == 1


def test_misspelt_override_fails_before_any_stage(prefect_harness: None, toy_repo: Path) -> None:
    before = (toy_repo / "params.yaml").read_bytes()
    state = _run(repo_dir=str(toy_repo), overrides={"train.phase1.epoch": 3})
    assert state.is_failed()
    assert "train.phase1.epoch: unknown key" in state.message
    assert _task_runs(state.state_details.flow_run_id) == []
    assert not (toy_repo / "prep").exists() and not (toy_repo / "dvc.lock").exists()
    assert (toy_repo / "params.yaml").read_bytes() == before


# ------------------------------------------------------------------------------------- artifacts
def test_artifact_readers_tolerate_both_summary_shapes_and_missing_gate() -> None:
    from pipelines.artifacts import metrics_markdown, validation_rows

    flat = [{"expectation": "expect_column_values_to_be_unique", "column": "key", "success": False,
             "unexpected_count": 2, "details": {"examples": ["a", "a"]}}]
    assert validation_rows(flat) == [{"expectation": "expect_column_values_to_be_unique", "column": "key",
                                      "success": False, "unexpected_count": 2, "details": '{"examples": ["a", "a"]}'}]
    assert validation_rows({"success": False, "expectations": flat})[0]["unexpected_count"] == 2
    assert validation_rows("garbage") == []
    text = metrics_markdown({"overall": 0.5, "per_class": [0.1] * 100})
    assert "Quality gate: not reported" in text and "| overall | 0.5000 |" in text and "per_class" not in text


def test_metrics_and_onnx_artifacts_are_published(prefect_harness: None, tmp_path: Path) -> None:
    metrics = {"overall": 0.5, "few": 0.25, "gate": {"passed": False, "failures": ["few 0.2500 < min_few 0.3"]}}
    evaluate = (f"import json, os, sys\nos.makedirs('reports')\njson.dump({metrics!r}, open('reports/metrics.json', 'w'))\n"
                "sys.exit('error: quality gate failed')\n")
    repo = _dvc_repo(tmp_path / "arts", {
        "export": ("import os\nos.makedirs('models/export')\nopen('models/export/model.onnx', 'wb').write(b'onnx')\n",
                   ["src"], ["models/export"]),
        "evaluate": (evaluate, ["models/export"], ["reports"]),
    })
    state = _run(repo_dir=str(repo))
    assert state.is_failed() and "stage 'evaluate' failed" in state.message
    arts = _artifacts(state.state_details.flow_run_id)
    # Prefect stores a link artifact as Markdown: [text](link)
    assert f"({(repo / 'models/export/model.onnx').resolve().as_uri()})" in arts["onnx-model"].data
    # published although the gate failed the stage: the verdict is the point
    assert arts["evaluation-metrics"].type == "markdown"
    assert "Quality gate: **FAILED**" in arts["evaluation-metrics"].data
    assert "| overall | 0.5000 |" in arts["evaluation-metrics"].data


# ------------------------------------------------------------------ the project's real stages (tiny)
@pytest.fixture(scope="module")
def project_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _project_repo(tmp_path_factory.mktemp("project") / "repo")


def test_real_ingest_validate_then_cached_then_validation_failure(prefect_harness: None, project_repo: Path) -> None:
    first = _run(repo_dir=str(project_repo), target="validate")
    assert first.is_completed(), first.message
    assert [(r["stage"], r["status"]) for r in first.result()] == [("ingest", "ran"), ("validate", "ran")]
    table = _artifacts(first.state_details.flow_run_id)["data-validation"]
    assert table.type == "table"
    rows = json.loads(table.data)
    assert rows and all(r["success"] for r in rows)
    assert {"expectation", "column", "success", "unexpected_count", "details"} <= set(rows[0])

    second = _run(repo_dir=str(project_repo), target="validate")
    assert [(r["stage"], r["status"]) for r in second.result()] == [("ingest", "cached"), ("validate", "cached")]

    # A shard edited in place and committed as the ingest output: DVC keeps ingest, validate must catch it.
    shard = sorted((project_repo / "data/shards/train").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)
    _sh(PY, "-m", "dvc", "commit", "-f", "-q", "ingest", cwd=project_repo)
    params_before = (project_repo / "params.yaml").read_bytes()
    third = _run(repo_dir=str(project_repo), target="validate", overrides={"validate.imbalance_tolerance": 0.1})
    assert third.is_failed()
    assert "stage 'validate' failed" in third.message and "data validation failed" in third.message
    runs = _task_runs(third.state_details.flow_run_id)
    assert [(r.name, r.run_count) for r in runs] == [("ingest", 1), ("validate", 1)]  # no retry of a verdict
    failed_rows = json.loads(_artifacts(third.state_details.flow_run_id)["data-validation"].data)
    assert any(r["success"] is False and "sha256" in str(r["details"]) for r in failed_rows)
    assert (project_repo / "params.yaml").read_bytes() == params_before  # override rolled back


# ----------------------------------------------------------------------------------------- lpt serve
def test_serve_status_and_stop_when_nothing_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from pipelines.serve import serve_command

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # the project root is found upwards
    monkeypatch.setenv("LPT_PREFECT_PORT", str(port))
    assert serve_command("status") == 3
    assert "not answering" in capsys.readouterr().out
    assert serve_command("stop") == 0
    assert "not running" in capsys.readouterr().out
    assert serve_command("restart") == 2
    monkeypatch.chdir(tmp_path.parent)
    assert serve_command("status") == 2  # no dvc.yaml here or above
