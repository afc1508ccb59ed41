"""The Prefect flow over DVC: stage order from DVC's own stage graph (templating resolved), cached
reporting, retries and verdicts by exit code, outputs restored after a failure, overrides, artifacts, live
log streaming, and the ``lpt-serve`` command.

Two kinds of real DVC repos in tmp dirs (git init + dvc init): toy ones whose stages are shell commands
(fast; they exercise the orchestration itself) and one holding the project's dvc.yaml, ``lpt/`` and the
tiny params (the real stages). Every flow runs under one session-scoped ``prefect_test_harness``.
No DVC command ever runs in the project checkout itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from pipelines.dvc_stages import (DvcYamlError, locked_outputs, pipeline_order, read_stages, restore_outputs,
                                  run_dvc_stage, verdict_name)
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


def _sh(*cmd: str, cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def _git_dvc_init(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _sh("git", "init", "-q", cwd=root)
    _sh(PY, "-m", "dvc", "init", "-q", cwd=root)
    return root


def _lock(repo: Path) -> dict[str, Any]:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def _md5(path: Path) -> str:
    import hashlib

    return hashlib.md5(path.read_bytes()).hexdigest()


def _dvc_repo(root: Path, scripts: dict[str, tuple[str, list[str], list[str]]], params: dict[str, Any] | None = None,
              verdicts: bool = True) -> Path:
    """A git + DVC repo whose stages run Python scripts: ``{stage: (code, deps, outs)}``, in that file order.

    params.yaml holds the tiny params (or ``params``); ``src`` is a dependency file the tests edit. With
    ``verdicts`` each script reports its outcome as an ``lpt`` command does (:func:`lpt.verdict.recorded`: started,
    exit code, transient); without, the stages are foreign commands that report nothing.
    """
    _git_dvc_init(root)
    stages = {}
    for name, (code, deps, outs) in scripts.items():
        if verdicts:
            code = f"from lpt.verdict import recorded\nwith recorded({name!r}):\n" + textwrap.indent(code, "    ")
        (root / f"{name}.py").write_text(code)
        stages[name] = {"cmd": f'"{PY}" {name}.py', "deps": [f"{name}.py", *deps], "outs": outs}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(params or tiny_raw_params(), sort_keys=False))
    (root / "src").write_text("1\n")
    return root


def _project_repo(root: Path) -> Path:
    """A git + DVC repo with the project's dvc.yaml, a snapshot of ``lpt/`` (stage deps) and the tiny params.

    One commit is made: dvclive (in the training stages) needs a HEAD. The committed backbone comes along
    (the pretrain stage is frozen: `dvc repro` verifies its outputs exist).
    """
    _git_dvc_init(root)
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    if (REPO_ROOT / ".dvc" / "plots").is_dir():
        shutil.copytree(REPO_ROOT / ".dvc" / "plots", root / ".dvc" / "plots", dirs_exist_ok=True)
    for package in ("lpt", "pipelines"):  # stage deps; stage commands may run `python -m pipelines.launch`
        shutil.copytree(REPO_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(), sort_keys=False))
    shutil.copytree(REPO_ROOT / "data" / "source", root / "data" / "source")  # ingest's tracked input folder
    # the frozen pretrain stage's committed outputs (unused by the tiny params: backbone.weights none)
    shutil.copytree(REPO_ROOT / "models" / "pretrain", root / "models" / "pretrain")
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


# ------------------------------------------------------------------------- DAG from DVC's stage graph
def test_stage_order_follows_dvc_yaml_dependencies(toy_repo: Path) -> None:
    assert [s.name for s in pipeline_order(toy_repo)] == ["prep", "mid", "last"]
    assert [s.name for s in pipeline_order(toy_repo, target="mid")] == ["prep", "mid"]
    with pytest.raises(DvcYamlError, match=r"unknown target stage 'nope'; dvc.yaml has: last, prep, mid$"):
        pipeline_order(toy_repo, target="nope")


TEMPLATED_DVC_YAML = """\
stages:
  ingest:
    cmd: python ingest.py --out ${data.out_dir} --n ${data.n}
    deps:
      - ingest.py
    params:
      - data
    outs:
      - ${data.out_dir}
  report:
    cmd: python report.py ${data.out_dir}/manifest.json ${report.dir}
    deps:
      - ${data.out_dir}/manifest.json
    outs:
      - ${report.dir}
    metrics:
      - ${report.dir}-metrics.json:
          cache: false
  export:
    cmd: python export.py
    deps:
      - ${report.dir}
      - ${data.out_dir}
    outs:
      - ${export.out_dir}
      - models/state:
          persist: true
"""


def test_templated_dvc_yaml_is_resolved_by_dvc(tmp_path: Path) -> None:
    repo = _git_dvc_init(tmp_path / "templated")
    (repo / "dvc.yaml").write_text(TEMPLATED_DVC_YAML)
    (repo / "params.yaml").write_text("data:\n  out_dir: data/shards\n  n: 3\nreport:\n  dir: reports/r1\n"
                                      "export:\n  out_dir: models/export\n")
    # export is listed before report but needs it: the order comes from the resolved paths
    order = pipeline_order(repo)
    assert [s.name for s in order] == ["ingest", "report", "export"]
    ingest, report, export = order
    assert ingest.cmd == "python ingest.py --out data/shards --n 3"
    assert ingest.deps == ("ingest.py",) and ingest.outs == ("data/shards",)  # params.yaml is not a path dep
    assert report.deps == ("data/shards/manifest.json",)
    assert report.outs == ("reports/r1", "reports/r1-metrics.json")
    assert ingest.owns("data/shards/manifest.json") and ingest.owns("data/shards")
    assert not ingest.owns("data/shards-old/x") and not ingest.owns("data")
    assert report.owns(Path("reports/r1/summary.json")) and report.owns("reports/r1-metrics.json")
    assert export.output_of("models/export/model.onnx") == "models/export"
    assert [s.name for s in pipeline_order(repo, target="report")] == ["ingest", "report"]
    assert export.restorable == ()  # nothing in dvc.lock yet

    # a params change moves the paths: DVC resolves them again
    (repo / "params.yaml").write_text("data:\n  out_dir: data/v2\n  n: 3\nreport:\n  dir: reports/r1\n"
                                      "export:\n  out_dir: models/export\n")
    ingest2 = read_stages(repo)[0]
    assert ingest2.outs == ("data/v2",) and ingest2.owns("data/v2/manifest.json") and not ingest2.owns("data/shards")


@pytest.mark.parametrize("files, message", [
    ({}, r"dvc\.yaml: not found"),
    ({"dvc.yaml": "stages:\n  a: [\n"}, r"YAML file structure is corrupted"),
    ({"dvc.yaml": "stages:\n  a:\n    deps: [x]\n"}, r"validation failed: required key not provided"),
    ({"dvc.yaml": "stages:\n  a:\n    cmd: echo ${nope.x}\n    outs: [o]\n", "params.yaml": "a: 1\n"},
     r"Could not find 'nope\.x'"),
    ({"dvc.yaml": "stages:\n  a:\n    cmd: c\n    deps: [y]\n    outs: [x]\n  b:\n    cmd: c\n    deps: [x]\n"
                  "    outs: [y]\n"}, r"defined as both a dependency and an output"),
])
def test_bad_dvc_yaml_is_one_line_error(tmp_path: Path, files: dict[str, str], message: str) -> None:
    repo = _git_dvc_init(tmp_path / "bad")
    for name, text in files.items():
        (repo / name).write_text(text)
    with pytest.raises(DvcYamlError, match=message) as info:
        pipeline_order(repo)
    assert "\n" not in str(info.value)


def test_project_dag_puts_every_stage_after_its_inputs(tmp_path: Path) -> None:
    repo = _git_dvc_init(tmp_path / "dag")  # the project's dvc.yaml + params, read by DVC outside the checkout
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO_ROOT / "params.yaml", repo / "params.yaml")
    stages = pipeline_order(repo)
    order = [s.name for s in stages]
    assert sorted(order) == sorted(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])
    for i, stage in enumerate(stages):  # whatever produces a stage's inputs runs before it
        producers = {o.name for o in stages if o is not stage and any(o.owns(d) for d in stage.deps)}
        assert producers <= set(order[:i]), (stage.name, producers)
    assert order.index("ingest") < order.index("validate")
    assert order[-2:] == ["export", "pack"] and order.index("evaluate") < order.index("export")
    upstream = [s.name for s in pipeline_order(repo, target="validate")]
    assert upstream[-1] == "validate" and "ingest" in upstream and "evaluate" not in upstream


# ---------------------------------------------------------------------------- failures by exit code
def test_a_stage_run_is_classified_from_data_not_dvc_messages(tmp_path: Path) -> None:
    """The command's exit code comes from its verdict file; DVC's outcome from ``Repo.reproduce`` and its
    exception types. Output that looks like DVC's own messages changes nothing."""
    repo = _git_dvc_init(tmp_path / "codes")
    lpt_like = "from lpt.verdict import recorded\nwith recorded('gate'):\n    import sys\n    {}\n"
    (repo / "gate.py").write_text(lpt_like.format(
        "print('OSError: flaky disk'); print(\"Stage 'gate' didn't change, skipping\"); sys.exit(4)"))
    (repo / "ok.py").write_text(lpt_like.format("open('q', 'w').write('ok')"))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "gate": {"cmd": f'"{PY}" gate.py', "outs": ["o"]},
        "ok": {"cmd": f'"{PY}" ok.py', "outs": ["q"]},
        "foreign": {"cmd": ["echo first", f"\"{PY}\" -c \"import sys; sys.exit(1)\""], "outs": ["p"]},
        "lpt_cmd": {"cmd": "lpt params check no-such-params.yaml", "outs": ["r"]},
    }}))
    run = run_dvc_stage(repo, "gate")
    assert (run.status, run.returncode, run.exit_code, run.command_started) == ("failed", 255, 4, True)
    assert verdict_name(run.exit_code) == "GATE_FAILED" and not run.transient  # a verdict, whatever the output says
    assert run.tail[-1].startswith("ERROR: failed to reproduce 'gate'")

    ok = run_dvc_stage(repo, "ok")
    assert (ok.status, ok.detail, ok.command_started) == ("ran", "command ran", True)
    again = run_dvc_stage(repo, "ok")
    assert (again.status, again.command_started) == ("cached", False) and "up to date" in again.detail

    foreign = run_dvc_stage(repo, "foreign")  # not an lpt command: no verdict, so no exit code; DVC's error type
    assert (foreign.status, foreign.exit_code, foreign.command_started) == ("failed", None, True)  # says it ran

    real = run_dvc_stage(repo, "lpt_cmd")  # the real CLI writes its verdict: exit 2 for a missing params file
    assert (real.status, real.exit_code, real.command_started) == ("failed", 2, True)
    assert verdict_name(real.exit_code) == "BAD_PARAMS" and not real.transient

    missing = run_dvc_stage(repo, "nope")  # DVC fails without running anything: no command exit code
    assert (missing.status, missing.exit_code, missing.command_started) == ("failed", None, False)


def test_a_frozen_stage_is_reported_cached_and_never_run(tmp_path: Path) -> None:
    """The pretrain stage is `frozen: true`: DVC only checks its committed outputs exist."""
    repo = _git_dvc_init(tmp_path / "frozen")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "made": {"cmd": "echo ran > m/x", "frozen": True, "outs": [{"m": {"cache": False}}]}}}))
    (repo / "m").mkdir()
    (repo / "m/x").write_text("committed\n")
    run = run_dvc_stage(repo, "made")
    assert (run.status, run.command_started) == ("cached", False) and "frozen" in run.detail
    assert (repo / "m/x").read_text() == "committed\n"


def test_failure_classification() -> None:
    from pipelines.dvc_stages import _stage_run

    lock = _stage_run("s", 255, {"reproduced": False, "error": {"kind": "lock", "message": "x"}}, None, 1.0, [])
    assert (lock.exit_code, lock.command_started, lock.transient) == (None, False, True)
    flaky = _stage_run("s", 255, {"reproduced": False, "error": {"kind": "command", "message": "x"}},
                       {"started": True, "exit_code": 1, "transient": True}, 1.0, [])
    assert (flaky.exit_code, flaky.command_started, flaky.transient) == (1, True, True)
    for code in (2, 3, 4, 5, 6):  # lpt.exitcodes.DETERMINISTIC: never transient
        run = _stage_run("s", 255, {"reproduced": False, "error": {"kind": "command", "message": "x"}},
                         {"started": True, "exit_code": code, "transient": True}, 1.0, [])
        assert not run.transient
    killed = _stage_run("s", -9, None, {"started": True}, 1.0, [])  # killed: no outcome, no exit code
    assert (killed.status, killed.exit_code, killed.command_started) == ("failed", None, True)
    cache = _stage_run("s", 0, {"reproduced": True, "error": None}, None, 1.0, [])
    assert cache.status == "ran" and "run cache" in cache.detail
    assert [verdict_name(c) for c in (0, 1, 2, 3, 4, 5, 6, 137, None)] == [
        "OK", "ERROR", "BAD_PARAMS", "VALIDATION_FAILED", "GATE_FAILED", "PARITY_FAILED", "GATE_NOT_PASSED", None, None]


def test_verdicts_are_written_by_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import doctest
    import errno

    import lpt.verdict
    from lpt.verdict import VERDICT_ENV, is_transient_error, read_verdict, recorded

    assert doctest.testmod(lpt.verdict).failed == 0

    path = tmp_path / "v.json"
    monkeypatch.setenv(VERDICT_ENV, str(path))
    with pytest.raises(OSError), recorded("x"):
        raise OSError(errno.EIO, "Input/output error")
    assert {k: read_verdict(path)[k] for k in ("started", "exit_code", "transient")} == {
        "started": True, "exit_code": 1, "transient": True}
    with pytest.raises(SystemExit), recorded("x"):
        raise SystemExit(4)
    assert (read_verdict(path)["exit_code"], read_verdict(path)["transient"]) == (4, False)
    assert not is_transient_error(OSError(errno.ENOSPC, "No space left on device"))
    assert read_verdict(tmp_path / "none.json") is None


def test_stage_failed_carries_exit_code_and_verdict_through_pickling() -> None:
    import pickle

    from pipelines.flow import StageFailed

    tail = ["Running stage 'export':", "> lpt export", "parity: max |diff| 0.2 > 0.0001",
            "ERROR: failed to reproduce 'export': failed to run: lpt export, exited with 5"]
    err = pickle.loads(pickle.dumps(StageFailed("export", 255, tail, exit_code=5, command_started=True, transient=True)))
    assert (err.stage, err.returncode, err.exit_code, err.verdict) == ("export", 255, 5, "PARITY_FAILED")
    assert err.deterministic and not err.transient and err.command_started
    assert str(err).startswith("stage 'export' failed: its command exited with 5 (PARITY_FAILED: a verdict, not retried)")
    lock = StageFailed("train", 255, ["ERROR: Unable to acquire lock. Most likely another DVC process is running"],
                       transient=True)
    assert lock.exit_code is None and lock.transient and not lock.deterministic
    assert str(lock).startswith("stage 'train' failed: dvc exited with 255 before running the command")


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
    # exit code 3 (VALIDATION_FAILED) decides, although the output mentions an I/O error on the way
    code = "import sys\nprint('checking... OSError while reading shard 3')\nsys.exit(3)\n"
    repo = _dvc_repo(tmp_path / "bad", {
        "first": ("import os; os.makedirs('a')", ["src"], ["a"]),
        "check": (code, ["a"], ["b"]),
        "after": ("import os; os.makedirs('c')", ["b"], ["c"]),
    })
    state = _run(repo_dir=str(repo))
    assert state.is_failed()
    assert "stage 'check' failed: its command exited with 3 (VALIDATION_FAILED: a verdict, not retried)" in state.message
    assert "OSError while reading shard 3" in state.message  # its last output lines
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.name for r in runs] == ["first", "check"]  # 'after' never started
    assert runs[1].run_count == 1
    err = state.result(raise_on_failure=False)
    assert (err.stage, err.exit_code, err.verdict, err.deterministic, err.transient) == ("check", 3, "VALIDATION_FAILED",
                                                                                        True, False)


def test_failed_stage_gets_its_previous_outputs_back(prefect_harness: None, tmp_path: Path) -> None:
    """DVC removes a stage's outputs before running it; after a failure the flow checks the locked ones out."""
    code = ("import os, pathlib, sys\n"
            "v = open('src').read()\n"
            "os.makedirs('model', exist_ok=True)\n"
            "pathlib.Path('model/w.txt').write_text('weights ' + v)\n"  # half-written by a failing run too
            "pathlib.Path('result.txt').write_text('result ' + v)\n"
            "os.makedirs('state', exist_ok=True)\n"
            "with open('state/log', 'a') as f: f.write('attempt ' + v)\n"
            "sys.exit(4 if v.startswith('2') else 0)\n")
    repo = _dvc_repo(tmp_path / "restore", {"train": (code, ["src"], ["model", "result.txt", {"state": {"persist": True}}])})
    first = _run(repo_dir=str(repo))
    assert first.is_completed(), first.message
    locked = {o["path"]: o["md5"] for o in _lock(repo)["train"]["outs"]}
    assert locked["result.txt"] == _md5(repo / "result.txt")

    (repo / "src").write_text("2\n")  # the next run fails its gate (exit 4) after rewriting its outputs
    second = _run(repo_dir=str(repo))
    assert second.is_failed() and "exited with 4 (GATE_FAILED" in second.message
    assert (repo / "model/w.txt").read_text() == "weights 1\n"  # back as dvc.lock names them
    assert (repo / "result.txt").read_text() == "result 1\n" and _md5(repo / "result.txt") == locked["result.txt"]
    assert {o["path"]: o["md5"] for o in _lock(repo)["train"]["outs"]} == locked
    assert locked_outputs(repo, "train")["model"].md5 == locked["model"]
    # persist outputs are what the stage keeps on purpose (resume state): left as the failed run left them
    assert (repo / "state/log").read_text() == "attempt 1\nattempt 2\n"
    messages = [log.message for log in _logs(second.state_details.flow_run_id)]
    assert any("restoring its previous outputs: dvc checkout --force model result.txt" in m for m in messages)
    assert any("previous outputs restored as dvc.lock names them" in m for m in messages)


def _still_running(pid: int, wait_s: float = 10.0) -> bool:
    """Whether process ``pid`` still runs after up to ``wait_s`` s: gone, or a zombie waiting for its reaper
    (a stopped command whose parent already exited, reaped by init when init gets to it), counts as stopped.
    An orphaned command that kept running (the failure this guards against) would run for its whole 120 s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


def test_interrupted_stage_is_stopped_then_restorable(tmp_path: Path) -> None:
    """Ctrl-C (or a cancellation) during a stage stops DVC and the command, so its outputs can be put back."""
    code = ("import os, sys, time\nos.makedirs('o', exist_ok=True)\nopen('o/x', 'w').write(open('src').read())\n"
            "if open('src').read() == '2\\n':\n"
            "    print('pid', os.getpid(), flush=True)\n    time.sleep(120)\n")
    repo = _dvc_repo(tmp_path / "interrupt", {"slow": (code, ["src"], ["o"])})
    assert run_dvc_stage(repo, "slow").status == "ran"
    (repo / "src").write_text("2\n")
    pids: list[int] = []

    def interrupt(line: str) -> None:
        if line.startswith("pid "):
            pids.append(int(line.split()[1]))
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_dvc_stage(repo, "slow", on_line=interrupt)
    assert time.monotonic() - start < 30
    assert pids and not _still_running(pids[0])  # the command is stopped, not orphaned
    [stage] = read_stages(repo)
    restored = restore_outputs(repo, stage)  # DVC's repo lock is free again
    assert restored.returncode == 0 and restored.targets == ["o"]
    assert (repo / "o/x").read_text() == "1\n"


def test_cancelled_flow_stops_the_stage_and_restores_its_outputs(prefect_harness: None, tmp_path: Path) -> None:
    """SIGTERM to the flow process (what a Prefect cancellation sends): the stage command is stopped, not
    orphaned, and the outputs dvc.lock names are back before the process ends."""
    from prefect.settings import get_current_settings

    code = ("import os, time\nv = open('src').read()\nos.makedirs('o', exist_ok=True)\nopen('o/x', 'w').write(v)\n"
            "if v == '2\\n':\n    open('pid', 'w').write(str(os.getpid()))\n    time.sleep(120)\n")
    repo = _dvc_repo(tmp_path / "cancel", {"slow": (code, ["src"], ["o"])})
    assert run_dvc_stage(repo, "slow").status == "ran"
    (repo / "src").write_text("2\n")
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url)}
    flow = subprocess.Popen([PY, "-m", "pipelines.flow", "--repo-dir", str(repo)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while not (repo / "pid").exists() and flow.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (repo / "pid").exists(), flow.communicate(timeout=30)[0][-3000:]
    stage_pid = int((repo / "pid").read_text())
    flow.terminate()
    out = flow.communicate(timeout=90)[0]
    assert flow.returncode != 0
    assert not _still_running(stage_pid)
    assert "restoring its previous outputs: dvc checkout --force o" in out, out[-3000:]
    assert (repo / "o/x").read_text() == "1\n"


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
                "sys.exit(4)\n")
    export = ("import hashlib, json, os\nos.makedirs('models/export')\n"
              "open('models/export/model.onnx', 'wb').write(b'onnx')\n"
              "sha = hashlib.sha256(b'onnx').hexdigest()\n"
              "json.dump({'variants': {'fp32': {'file': 'model.onnx', 'sha256': sha}}}, open('models/export/export.json', 'w'))\n")
    repo = _dvc_repo(tmp_path / "arts", {
        "export": (export, ["src"], ["models/export"]),
        "evaluate": (evaluate, ["models/export"], ["reports"]),
    })
    state = _run(repo_dir=str(repo))
    assert state.is_failed() and "stage 'evaluate' failed" in state.message
    arts = _artifacts(state.state_details.flow_run_id)
    # Prefect stores a link artifact as Markdown: [text](link); the text names the version
    onnx = arts["onnx-model"]
    folder_md5 = {o["path"]: o["md5"] for o in _lock(repo)["export"]["outs"]}["models/export"]
    sha = hashlib.sha256(b"onnx").hexdigest()
    assert onnx.data == (f"[models/export/model.onnx (dvc.lock md5 {folder_md5}, sha256 {sha[:12]})]"
                         f"({(repo / 'models/export/model.onnx').resolve().as_uri()})")
    assert f"md5 `{folder_md5}`" in onnx.description and f"sha256 (export.json): `{sha}`" in onnx.description
    # published although the gate failed the stage: the verdict is the point
    assert arts["evaluation-metrics"].type == "markdown"
    assert "Quality gate: **FAILED**" in arts["evaluation-metrics"].data
    assert "| overall | 0.5000 |" in arts["evaluation-metrics"].data


def test_onnx_link_tolerates_a_missing_export_report(tmp_path: Path) -> None:
    from pipelines.artifacts import onnx_link, onnx_sha256s

    assert onnx_sha256s({"variants": [{"file": "a.onnx", "sha256": "ab"}, {"file": "b.onnx"}]}) == {"a.onnx": "ab"}
    assert onnx_sha256s(None) == {} and onnx_sha256s({"variants": "x"}) == {}
    (tmp_path / "m").mkdir()
    (tmp_path / "m/model.onnx").write_bytes(b"x")
    link = onnx_link(tmp_path, Path("m/model.onnx"), "onnx-model", "m", None, "export", None)
    assert link.link_text == "m/model.onnx (not in dvc.lock, sha256 not recorded)"
    assert link.link == (tmp_path / "m/model.onnx").resolve().as_uri()


# ------------------------------------------------------------------ the project's real stages (tiny)
@pytest.fixture(scope="module")
def project_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _project_repo(tmp_path_factory.mktemp("project") / "repo")


def _image_folder(root: Path, per_class: dict[str, int]) -> None:
    """``root/{train,test}/<class>/<i>.png``: 8x8 grey images, ``per_class`` train and 2 test images each."""
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for c, (name, n) in enumerate(per_class.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 2):
                Image.fromarray(np.full((8, 8), 20 * c + i, np.uint8), mode="L").save(root / split / name / f"{i}.png")


def test_an_image_added_to_the_tracked_source_folder_re_ingests(tmp_path: Path) -> None:
    """data.source_dir is an ingest dependency: `dvc status` sees an added image and `dvc repro` re-ingests;
    a folder outside it still ingests, with a note that DVC cannot see it change."""
    repo = _project_repo(tmp_path / "repo")
    _image_folder(repo / "data/source/images", {"a": 12, "b": 7})
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["data"].update(source="imagefolder", imagefolder={"root": "data/source/images"}, val_per_class=1)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = _sh(PY, "-m", "dvc", "repro", "-q", "ingest", cwd=repo)
    assert "note:" not in out
    assert "ingest" not in _sh(PY, "-m", "dvc", "status", "ingest", cwd=repo)
    before = json.loads((repo / "data/shards/manifest.json").read_text())["full_train_counts"]

    _image_folder(repo / "data/source/images", {"a": 13, "b": 7})  # one more image of class a
    status = _sh(PY, "-m", "dvc", "status", "ingest", cwd=repo)
    assert "ingest:" in status and "modified:" in status and "data/source" in status
    _sh(PY, "-m", "dvc", "repro", "-q", "ingest", cwd=repo)
    after = json.loads((repo / "data/shards/manifest.json").read_text())["full_train_counts"]
    assert (before, after) == ([12, 7], [13, 7])

    outside = tmp_path / "elsewhere"
    _image_folder(outside, {"a": 12, "b": 7})
    raw["data"]["imagefolder"] = {"root": str(outside)}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = _sh(PY, "-m", "dvc", "repro", "ingest", cwd=repo)
    assert f"note: data.imagefolder.root ({outside}) is outside data.source_dir (data/source)" in out


def test_real_ingest_validate_then_cached_then_validation_failure(prefect_harness: None, project_repo: Path) -> None:
    upstream = [s.name for s in pipeline_order(project_repo, target="validate")]  # ingest (and a params check)
    assert "ingest" in upstream and upstream[-1] == "validate"
    first = _run(repo_dir=str(project_repo), target="validate")
    assert first.is_completed(), first.message
    assert [(r["stage"], r["status"]) for r in first.result()] == [(name, "ran") for name in upstream]
    table = _artifacts(first.state_details.flow_run_id)["data-validation"]
    assert table.type == "table"
    rows = json.loads(table.data)
    assert rows and all(r["success"] for r in rows)
    assert {"expectation", "column", "success", "unexpected_count", "details"} <= set(rows[0])

    second = _run(repo_dir=str(project_repo), target="validate")
    assert [(r["stage"], r["status"]) for r in second.result()] == [(name, "cached") for name in upstream]
    passing_summary = (project_repo / "data/validation/summary.json").read_bytes()

    # A shard edited in place and committed as the ingest output: DVC keeps ingest, validate must catch it.
    shard = sorted((project_repo / "data/shards/train").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)
    _sh(PY, "-m", "dvc", "commit", "-f", "-q", "ingest", cwd=project_repo)
    params_before = (project_repo / "params.yaml").read_bytes()
    third = _run(repo_dir=str(project_repo), target="validate", overrides={"validate.imbalance_tolerance": 0.1})
    assert third.is_failed()
    assert "stage 'validate' failed" in third.message and "data validation failed" in third.message
    runs = _task_runs(third.state_details.flow_run_id)
    assert [(r.name, r.run_count) for r in runs] == [(name, 1) for name in upstream]  # no retry of a verdict
    assert "exited with 3 (VALIDATION_FAILED" in third.message
    assert "— error: data validation failed" in third.message  # the stage's own error line, up front
    failure = _artifacts(third.state_details.flow_run_id)["stage-failure"]
    assert failure.type == "markdown" and "# Stage `validate` failed" in failure.data
    assert "- `error: data validation failed" in failure.data and "```text" in failure.data
    failed_rows = json.loads(_artifacts(third.state_details.flow_run_id)["data-validation"].data)
    assert any(r["success"] is False and "sha256" in str(r["details"]) for r in failed_rows)
    assert (project_repo / "params.yaml").read_bytes() == params_before  # override rolled back
    # the failed run's report is in the artifact; the workspace has the outputs dvc.lock names again
    assert (project_repo / "data/validation/summary.json").read_bytes() == passing_summary


# ----------------------------------------------------------------------------------------- lpt-serve
def test_serve_status_and_stop_when_nothing_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from pipelines.serve import main, serve_command

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # the project root is found upwards
    monkeypatch.setenv("LPT_PREFECT_PORT", str(port))
    assert serve_command("status") == 3
    assert "not answering" in capsys.readouterr().out
    assert main(["stop"]) == 0
    assert "not running" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path.parent)
    assert main(["status"]) == 2  # no dvc.yaml here or above
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["status", "--root", str(tmp_path)]) == 3


def test_serve_cli_without_action_prints_help_and_unknown_action_is_one_line() -> None:
    """``lpt-serve`` (the console script) and ``python -m pipelines.serve``: never start anything by accident."""
    lpt_serve = Path(PY).parent / "lpt-serve"
    for cmd in ([str(lpt_serve)], [PY, "-m", "pipelines.serve"]):
        bare = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert bare.returncode == 0 and bare.stdout.startswith("usage: lpt-serve") and "{start,stop,status}" in bare.stdout
        wrong = subprocess.run([*cmd, "restart"], capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 2 and wrong.stdout == ""
        assert wrong.stderr == "error: unknown action 'restart'; use one of: start, stop, status\n"


# ------------------------------------------------------------------ issue 31: a served run killed, a busy repo
_HOLD_DVC_LOCK = """
import sys, time
from dvc.repo import Repo
with Repo(sys.argv[1]) as repo, repo.lock:
    print("locked", flush=True)
    time.sleep(60)
"""


def test_flow_refuses_to_start_while_another_dvc_command_holds_the_repo(prefect_harness: None, toy_repo: Path) -> None:
    """A `prefect deployment run` beside a `dvc repro` in a shell: refused in one line before its overrides touch
    params.yaml (they would change the params under the other run), no stage started."""
    before = (toy_repo / "params.yaml").read_bytes()
    holder = subprocess.Popen([PY, "-c", _HOLD_DVC_LOCK, str(toy_repo)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        state = _run(repo_dir=str(toy_repo), overrides={"train.phase1.epochs": 3})
    finally:
        holder.kill()
        holder.wait()
    assert state.is_failed()
    assert "another DVC command is running" in state.message and "this run changed nothing" in state.message
    assert _task_runs(state.state_details.flow_run_id) == []
    assert (toy_repo / "params.yaml").read_bytes() == before
    assert not (toy_repo / "prep").exists() and not (toy_repo / "dvc.lock").exists()
    assert _run(repo_dir=str(toy_repo)).is_completed()  # the lock released: the same call runs


_PARENT = """
import os, subprocess, sys, time
child = ("import subprocess, sys\\nfrom pipelines.dvc_repro import end_with_parent\\n"
         "armed = end_with_parent(int(sys.argv[1]))\\n"
         "grandchild = subprocess.Popen(['sleep', '120'])\\n"
         "print(armed, grandchild.pid, flush=True)\\n"
         "grandchild.wait()\\n")
proc = subprocess.Popen([sys.executable, "-c", child, str(os.getpid())], start_new_session=True,
                        stdout=subprocess.PIPE, text=True)
print(proc.pid, proc.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


def test_a_dvc_call_ends_with_the_process_that_started_it(tmp_path: Path) -> None:
    """`pipelines.dvc_repro --parent PID` runs in its own process group (so a cancellation can stop it); when the
    flow-run process that started it is SIGKILLed, it and the stage command must not run on as orphans holding
    DVC's repo lock (bench.faults found them after killing the serving process)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen([PY, "-c", _PARENT], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    assert parent.stdout is not None
    child_pid, armed, grandchild_pid = parent.stdout.readline().split()
    assert armed == "True"
    assert _still_running(int(child_pid), wait_s=0) and _still_running(int(grandchild_pid), wait_s=0)
    parent.kill()
    parent.wait()
    assert not _still_running(int(child_pid)) and not _still_running(int(grandchild_pid))


def test_restarted_serving_marks_the_runs_it_left_running_crashed(prefect_harness: None) -> None:
    """`lpt-serve start` after the serving process was killed mid-run: the server still shows the run RUNNING
    (nobody will ever finish it); it is marked Crashed, while a run whose process still lives is left alone."""
    from urllib.parse import urlparse

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings
    from prefect.states import Running

    from pipelines.serve import ORPHAN_MESSAGE, ServeLayout, crash_orphaned_runs

    @flow(name="lpt")
    def fake() -> None:
        return None

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(fake)
        deployment_id = client.create_deployment(flow_id=flow_id, name="full")
        orphan, alive, other = (client.create_flow_run_from_deployment(deployment_id) for _ in range(3))
        for run in (orphan, alive):
            client.set_flow_run_state(run.id, Running(), force=True)
    keeper = subprocess.Popen(["sleep", "60"], env={**os.environ, "PREFECT__FLOW_RUN_ID": str(alive.id)})
    try:
        port = urlparse(str(get_current_settings().api.url)).port
        marked = crash_orphaned_runs(ServeLayout(root=Path.cwd(), port=port))
    finally:
        keeper.kill()
        keeper.wait()
    assert marked == [f"{orphan.name} ({orphan.id})"]
    with get_client(sync_client=True) as client:
        states = {run.id: client.read_flow_run(run.id).state for run in (orphan, alive, other)}
    assert states[orphan.id].type.value == "CRASHED" and states[orphan.id].message == ORPHAN_MESSAGE
    assert states[alive.id].type.value == "RUNNING"
    assert states[other.id].type.value == "SCHEDULED"  # not started: the new serving process will run it


def test_a_failed_run_with_overrides_puts_params_lock_and_outputs_back(prefect_harness: None, tmp_path: Path) -> None:
    """A run with overrides whose first stage ran with them and whose second failed (or was cancelled): params.yaml,
    dvc.lock and the first stage's output are exactly as before the run, and `dvc status` is clean."""
    read_epochs = "import yaml\nv = yaml.safe_load(open('params.yaml'))['train']['phase1']['epochs']\n"
    repo = _dvc_repo(tmp_path / "undo", {
        "prep": (read_epochs + "import os\nos.makedirs('prep', exist_ok=True)\nopen('prep/x', 'w').write(str(v))\n",
                 [], ["prep"]),
        "mid": ("import shutil\nassert open('prep/x').read() != '3', 'mid refuses 3'\nshutil.copytree('prep', 'mid')\n",
                ["prep/x"], ["mid"]),
    })
    doc = yaml.safe_load((repo / "dvc.yaml").read_text())
    doc["stages"]["prep"]["params"] = ["train.phase1.epochs"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert _run(repo_dir=str(repo)).is_completed()
    before = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock", "prep/x", "mid/x")}
    assert before["prep/x"] == b"1"

    state = _run(repo_dir=str(repo), overrides={"train.phase1.epochs": 3})
    assert state.is_failed() and "stage 'mid' failed" in state.message
    assert {name: (repo / name).read_bytes() for name in before} == before
    assert json.loads(_sh(PY, "-m", "dvc", "status", "--json", cwd=repo)) == {}


def test_repo_busy_while_a_stage_command_runs_under_dvc_rwlock(toy_repo: Path) -> None:
    """While a stage's command runs, `dvc repro` releases its repo lock and keeps only its read/write locks on the
    stage's paths (.dvc/tmp/rwlock, with its PID): that counts as busy; a dead PID there does not."""
    from pipelines.dvc_stages import repo_busy

    rwlock = toy_repo / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    assert not repo_busy(toy_repo)
    holder = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        rwlock.write_text(json.dumps({"read": {}, "write": {str(toy_repo / "prep"): {"pid": holder.pid, "cmd": "dvc repro"}}}))
        assert repo_busy(toy_repo)
        rwlock.write_text(json.dumps({"read": {str(toy_repo / "src"): [{"pid": holder.pid, "cmd": "dvc repro"}]}, "write": {}}))
        assert repo_busy(toy_repo)
        rwlock.write_text(json.dumps({"read": {}, "write": {str(toy_repo / "prep"): {"pid": dead.pid, "cmd": "dvc repro"}}}))
        assert not repo_busy(toy_repo)
        rwlock.write_text("")  # a corrupted file (a killed dvc): not busy; pipelines.sweep repairs it
        assert not repo_busy(toy_repo)
    finally:
        holder.kill()
        holder.wait()
