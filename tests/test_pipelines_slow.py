"""The deployment end to end: `lpt-serve start` (real local server + serving process), then
`prefect deployment run lpt/full --watch` on the tiny config, then `lpt-serve stop`.

Slow (a minute or two on 2 cores): the whole tiny pipeline trains, evaluates and exports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipelines.dvc_stages import pipeline_order
from tests.test_pipelines import _project_repo

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")  # zombies are dead


def _post(api_url: str, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(f"{api_url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _artifact(api_url: str, key: str) -> dict:
    [artifact] = _post(api_url, "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1})
    return artifact


def _stage_order_of_last_run(api_url: str) -> list[str]:
    [run] = _post(api_url, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    tasks = _post(api_url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"})
    return [t["name"] for t in sorted(tasks, key=lambda t: t["start_time"])]


def test_served_deployment_runs_the_whole_tiny_pipeline(tmp_path: Path) -> None:
    repo = _project_repo(tmp_path / "repo")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "LPT_PREFECT_PORT": str(port),
           "PREFECT_HOME": str(repo / ".prefect")}
    env.pop("PREFECT_API_URL", None)

    def lpt_serve(action: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "lpt-serve"), action], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300)

    pids: list[int] = []
    try:
        started = lpt_serve("start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export PREFECT_API_URL={api_url}" in started.stdout
        pids = [int((repo / ".prefect" / f"{name}.pid").read_text()) for name in ("server", "serve")]
        again = lpt_serve("start")  # idempotent: reuses both processes
        assert again.returncode == 0 and "already running" in again.stdout
        assert [int((repo / ".prefect" / f"{n}.pid").read_text()) for n in ("server", "serve")] == pids

        run = subprocess.run([str(BIN / "prefect"), "deployment", "run", "lpt/full", "--watch"], cwd=repo,
                             env={**env, "PREFECT_API_URL": api_url}, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout
        assert list((repo / "models/export").glob("*.onnx"))
        assert _stage_order_of_last_run(api_url) == [s.name for s in pipeline_order(repo)]
        assert "Quality gate: **PASSED**" in _artifact(api_url, "evaluation-metrics")["data"]
        onnx_link = _artifact(api_url, "onnx-model")["data"]
        assert onnx_link.endswith(".onnx)") and "dvc.lock md5 " in onnx_link and "sha256 " in onnx_link
        assert lpt_serve("status").returncode == 0
    finally:
        stopped = lpt_serve("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert pids and not any(_alive(pid) for pid in pids)
    assert lpt_serve("status").returncode == 3
