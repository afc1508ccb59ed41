"""``lpt-serve start|stop|status``: a local Prefect server plus the process serving deployment ``lpt/full``.

Also ``python -m pipelines.serve start|stop|status`` (``lpt-serve`` is its console script; ``make serve``
runs ``start``). Without an action it prints its help and exits 0; an unknown action is one error line
and exit 2.

Everything lives in the project's ``.prefect/`` folder (``PREFECT_HOME``): the SQLite database, the
pid files ``server.pid`` / ``serve.pid`` and the logs ``server.log`` / ``serve.log``. The server binds
to 127.0.0.1 only. ``start`` is idempotent: what already runs is reused. ``stop`` ends the serving
process first, then the server, each by the PID recorded at start (and only if that PID still runs
the command we started). When ``start`` has to start a new serving process, the runs the old one left
running (it was killed mid-run) are marked ``Crashed`` first (:func:`crash_orphaned_runs`).

The port is 4200 unless ``LPT_PREFECT_PORT`` says otherwise.

``python -m pipelines.serve run --root DIR`` (a hidden action) is the serving process itself
(``prefect.serve`` of ``lpt/full`` and ``score/batch``); ``start`` launches it in the background. The older spelling
``python -m pipelines.serve --root DIR`` still means ``run``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "serve_command", "crash_orphaned_runs", "ServeLayout", "project_root", "prefect_env", "ACTIONS"]

DEFAULT_PORT = 4200
DEPLOYMENT = "lpt/full"
SCORE_DEPLOYMENT = "score/batch"
"""Scoring a batch of images with the gated export (:mod:`pipelines.score_flow`), served beside the pipeline."""
SERVER_START_TIMEOUT_S = 120.0  # ~13 s on a fresh database on an idle 2-core machine; leave room for load
SERVE_START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class ServeLayout:
    """Where a project's Prefect state, pid files and logs live, and the API it talks to."""

    root: Path
    port: int

    @property
    def home(self) -> Path:
        return self.root / ".prefect"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def pid_file(self, name: str) -> Path:
        return self.home / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.home / f"{name}.log"


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) holding ``dvc.yaml``."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml in {here} or above: run `lpt-serve` inside the project or pass --root")


def prefect_env(layout: ServeLayout) -> dict[str, str]:
    """Environment for the server and serving processes (and, through them, every flow run)."""
    from pipelines.dvc_stages import dvc_env

    env = dvc_env()
    env.update(
        PREFECT_HOME=str(layout.home),
        PREFECT_API_URL=layout.api_url,
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(layout.port),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
        LPT_REPO_DIR=str(layout.root),
    )
    return env


# --------------------------------------------------------------------------------------------- probes
def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback URL we built
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (OSError, ValueError):
        return 0, ""


def _healthy(layout: ServeLayout) -> bool:
    status, body = _get(f"{layout.api_url}/health")
    return status == 200 and body.strip() == "true"


def _deployment_registered(layout: ServeLayout) -> bool:
    status, body = _get(f"{layout.api_url}/deployments/name/{DEPLOYMENT}")
    if status != 200:
        return False
    try:
        return json.loads(body).get("name") == DEPLOYMENT.split("/")[1]
    except ValueError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _runs_ours(pid: int, marker: str) -> bool:
    """The process exists and its command line contains ``marker`` (guards against a reused PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): existence only
        except OSError:
            return False
        return True
    return marker in cmdline


def _live_pid(layout: ServeLayout, name: str, marker: str) -> int | None:
    pid = _read_pid(layout.pid_file(name))
    if pid is not None and _runs_ours(pid, marker):
        return pid
    return None


def _wait(predicate: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.5)
    return predicate()


def _log_tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _spawn(layout: ServeLayout, name: str, cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` detached in its own session, output appended to ``.prefect/<name>.log``."""
    log = layout.log_file(name).open("ab")
    try:
        proc = subprocess.Popen(cmd, cwd=layout.root, env=prefect_env(layout), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()
    layout.pid_file(name).write_text(f"{proc.pid}\n")
    return proc


_UNFINISHED = ("PENDING", "RUNNING", "CANCELLING")
"""Flow-run state types that a serving process that has died can leave behind (nobody will ever finish them)."""
ORPHAN_MESSAGE = ("its serving process stopped (killed?) while it ran; marked crashed by `lpt-serve start`: "
                  "run it again")


def _flow_run_ids_alive() -> set[str] | None:
    """The flow-run ids (``PREFECT__FLOW_RUN_ID``) of the live processes this user can read; None without /proc."""
    from lpt.utils import pid_alive

    proc = Path("/proc")
    if not (proc / "self" / "environ").is_file():
        return None
    ids: set[str] = set()
    for folder in proc.iterdir():
        if not folder.name.isdigit():
            continue
        if not pid_alive(int(folder.name)):  # a zombie is dead
            continue
        try:
            environ = (folder / "environ").read_bytes()
        except OSError:
            continue
        for entry in environ.split(b"\0"):
            if entry.startswith(b"PREFECT__FLOW_RUN_ID="):
                ids.add(entry.split(b"=", 1)[1].decode(errors="replace"))
    return ids


def crash_orphaned_runs(layout: ServeLayout) -> list[str] | None:
    """Mark ``Crashed`` the runs of the served deployments that no process runs any more.

    Called by ``start`` before it starts a new serving process: the runs of ``lpt/full`` and ``score/batch``
    are executed only by that process (each in a child that carries ``PREFECT__FLOW_RUN_ID``); if it was killed
    mid-run, the server still shows them running, and would forever. A run whose process still lives is left
    alone.

    Returns:
        ``"NAME (ID)"`` of each run marked; None where live processes cannot be listed (no /proc): nothing marked.
    """
    alive = _flow_run_ids_alive()
    if alive is None:
        return None
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    marked: list[str] = []
    with temporary_settings({PREFECT_API_URL: layout.api_url}), get_client(sync_client=True) as client:
        ids = []
        for name in (DEPLOYMENT, SCORE_DEPLOYMENT):
            try:
                ids.append(client.read_deployment_by_name(name).id)
            except ObjectNotFound:
                continue
        if not ids:
            return marked
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=ids)),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType(t) for t in _UNFINISHED]))))
        for run in runs:
            if str(run.id) in alive:
                continue
            client.set_flow_run_state(run.id, Crashed(message=ORPHAN_MESSAGE), force=True)
            marked.append(f"{run.name} ({run.id})")
    return marked


_SERVER_MARKER = "prefect server start"
_SERVE_MARKER = "pipelines.serve"


# ------------------------------------------------------------------------------------------- actions
def start(layout: ServeLayout) -> int:
    """Start the server (if needed), then the serving process (if needed); print how to use and stop it."""
    layout.home.mkdir(parents=True, exist_ok=True)
    server_pid = _live_pid(layout, "server", _SERVER_MARKER)
    if server_pid and _healthy(layout):
        print(f"prefect server already running (pid {server_pid}) at {layout.api_url}")
    elif server_pid is None and _healthy(layout):
        print(f"a Prefect server not started by `lpt-serve` already answers at {layout.api_url}: using it")
    else:
        if server_pid is None:
            print(f"starting prefect server on 127.0.0.1:{layout.port} (database in {layout.home}) ...", flush=True)
            proc = _spawn(layout, "server", [sys.executable, "-m", "prefect", "server", "start",
                                             "--host", "127.0.0.1", "--port", str(layout.port)])
        else:
            print(f"prefect server (pid {server_pid}) is starting; waiting for it ...", flush=True)
            proc = None
        if not _wait(lambda: _healthy(layout), SERVER_START_TIMEOUT_S, proc):
            print(f"error: prefect server not healthy at {layout.api_url}/health; log {layout.log_file('server')}:\n"
                  f"{_log_tail(layout.log_file('server'))}", file=sys.stderr)
            return 1
        print(f"prefect server healthy (pid {_read_pid(layout.pid_file('server'))})")

    serve_pid = _live_pid(layout, "serve", _SERVE_MARKER)
    if serve_pid:
        print(f"serving process already running (pid {serve_pid})")
        proc = None
    else:
        try:
            marked = crash_orphaned_runs(layout)
        except Exception as err:  # noqa: BLE001 - the API refused: starting the serving process matters more
            print(f"note: runs the old serving process left running were not marked crashed: {err}")
            marked = None
        for run in marked or ():
            print(f"flow run {run} marked crashed: {ORPHAN_MESSAGE.split(';')[0]}")
        proc = _spawn(layout, "serve", [sys.executable, "-m", "pipelines.serve", "run", "--root", str(layout.root)])
        serve_pid = proc.pid
        print(f"serving process started (pid {serve_pid}); registering {DEPLOYMENT} ...", flush=True)
    if not _wait(lambda: _deployment_registered(layout), SERVE_START_TIMEOUT_S, proc):
        print(f"error: deployment {DEPLOYMENT} not registered; log {layout.log_file('serve')}:\n"
              f"{_log_tail(layout.log_file('serve'))}", file=sys.stderr)
        return 1
    print(f"deployments {DEPLOYMENT} and {SCORE_DEPLOYMENT} ready. In each shell that talks to them:\n\n"
          f"    export PREFECT_API_URL={layout.api_url}\n"
          f"    prefect deployment run {DEPLOYMENT} --watch\n"
          f"    prefect deployment run {SCORE_DEPLOYMENT} -p 'inputs=[\"FOLDER\"]' --watch   # score new images\n\n"
          f"UI: http://127.0.0.1:{layout.port}   logs: {layout.home}/{{server,serve}}.log\n"
          f"stop with: lpt-serve stop")
    return 0


def _terminate(layout: ServeLayout, name: str, marker: str) -> str:
    pid = _live_pid(layout, name, marker)
    layout_pid = layout.pid_file(name)
    if pid is None:
        layout_pid.unlink(missing_ok=True)
        return "not running"
    try:  # the process leads its own session (start_new_session): end its children (flow runs) too
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        os.kill(pid, signal.SIGTERM)
    if not _wait(lambda: not _runs_ours(pid, marker), STOP_TIMEOUT_S):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        _wait(lambda: not _runs_ours(pid, marker), 5.0)
    layout_pid.unlink(missing_ok=True)
    return f"stopped (pid {pid})"


def stop(layout: ServeLayout) -> int:
    """Stop the serving process, then the server, by their recorded PIDs."""
    print(f"serving process: {_terminate(layout, 'serve', _SERVE_MARKER)}")
    print(f"prefect server: {_terminate(layout, 'server', _SERVER_MARKER)}")
    return 0


def status(layout: ServeLayout) -> int:
    """Report both processes, server health and the deployment; exit 0 when all is up, 3 otherwise."""
    server_pid = _live_pid(layout, "server", _SERVER_MARKER)
    serve_pid = _live_pid(layout, "serve", _SERVE_MARKER)
    healthy = _healthy(layout)
    registered = healthy and _deployment_registered(layout)
    print(f"prefect server: {'pid ' + str(server_pid) if server_pid else 'not started by lpt-serve'}, "
          f"{'healthy' if healthy else 'not answering'} at {layout.api_url}")
    print(f"serving process: {'pid ' + str(serve_pid) if serve_pid else 'not running'}")
    print(f"deployment {DEPLOYMENT}: {'registered' if registered else 'not registered'}")
    print(f"logs: {layout.home}/server.log, {layout.home}/serve.log")
    if healthy and serve_pid and registered:
        print(f"\n    export PREFECT_API_URL={layout.api_url}")
        return 0
    return 3


ACTIONS: dict[str, Callable[[ServeLayout], int]] = {"start": start, "stop": stop, "status": status}
_RUN = "run"  # hidden action: the serving process itself, started by `start`


def serve_command(action: str, root: Path | None = None) -> int:
    """Run ``start``, ``stop`` or ``status`` for the project at ``root`` (default: found from the cwd up).

    Args:
        action: ``start``, ``stop`` or ``status``.
        root: the project root (holds ``dvc.yaml``); ``None`` searches from the working directory upwards.

    Returns:
        The process exit code (``status``: 0 when everything runs, 3 when not; 2 for an unknown action or
        no project).
    """
    if action not in ACTIONS:
        print(f"error: unknown action {action!r}; use one of: {', '.join(ACTIONS)}", file=sys.stderr)
        return 2
    try:
        folder = project_root(root)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    port = int(os.environ.get("LPT_PREFECT_PORT", DEFAULT_PORT))
    return ACTIONS[action](ServeLayout(root=folder, port=port))


def _serve_forever(root: Path) -> None:
    """The serving process: register ``lpt/full`` and ``score/batch`` and execute their runs (one at a time:
    DVC locks the repo, and a scoring run reads the export a pipeline run may be replacing)."""
    from prefect import serve

    from pipelines.flow import lpt
    from pipelines.score_flow import score

    serve(lpt.to_deployment(name="full", parameters={"repo_dir": str(root)}, tags=["lpt", "dvc"],
                            description="The whole LPT DVC pipeline (dvc.yaml), one stage per task."),
          score.to_deployment(name="batch", parameters={"repo_dir": str(root)}, tags=["lpt", "score"],
                              description="Score a batch of images with the gated export (lpt score)."),
          limit=1, pause_on_shutdown=False)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lpt-serve",
        description="A local Prefect server (127.0.0.1, state in .prefect/) plus the process serving the "
                    "deployment lpt/full. The port is 4200 unless LPT_PREFECT_PORT says otherwise.",
        epilog="start: start both (reuses what runs) and wait until lpt/full is registered; "
               "stop: stop the serving process, then the server, by PID; "
               "status: report both, exit 0 when all is up, 3 otherwise.")
    ap.add_argument("action", nargs="?", metavar="{start,stop,status}", help="what to do")
    ap.add_argument("--root", type=Path, default=None,
                    help="project root holding dvc.yaml (default: the nearest one from the working directory up)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``lpt-serve`` / ``python -m pipelines.serve``: parse the action and run it.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: the action's, 0 for help (no action), 2 for an unknown action.
    """
    ap = _parser()
    args = ap.parse_args(argv)
    if args.action == _RUN or (args.action is None and args.root is not None):
        try:  # the serving process, started by `start` with --root
            root = project_root(args.root)
        except FileNotFoundError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        _serve_forever(root)
        return 0
    if args.action is None:
        ap.print_help()
        return 0
    return serve_command(args.action, args.root)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
