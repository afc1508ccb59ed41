"""DVC without Prefect: the stage DAG as DVC itself builds it, one ``dvc repro`` call per stage, failure
classes by exit code, and putting back the outputs a failed stage's run removed.

What a stage run did is read from data, never from DVC's messages: DVC's ``Repo.reproduce`` return value and
exception types (:mod:`pipelines.dvc_repro`, the subprocess that runs the stage) and the verdict file the
``lpt`` command writes (:mod:`lpt.verdict`: started, exit code, transient). A DVC upgrade that rewords a
message changes nothing here.

The stage graph comes from DVC's own index (``dvc.repo.Repo(root).index``): DVC resolves the templating
of ``dvc.yaml`` (``${data.out_dir}`` from ``params.yaml``), ``wdir``, ``foreach``/``matrix`` and the
edges between stages, so what the flow runs is exactly what ``dvc repro`` would. ``Repo`` is DVC's
internal API; it works in the pinned dvc 3.67.1 and tests/test_pipelines.py covers it.

The flow (``pipelines/flow.py``) is built on these helpers, so adding a stage to ``dvc.yaml`` needs no
change here or there. Nothing in this module knows about tensors or about Prefect.

Example:
    >>> from pipelines.dvc_stages import pipeline_order, run_dvc_stage
    >>> [s.name for s in pipeline_order(".", target="validate")]
    ['ingest', 'validate']
    >>> run = run_dvc_stage(".", "ingest", on_line=print)
    >>> run.status  # "ran", "cached" or "failed"; run.exit_code is the lpt command's own code
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lpt import exitcodes
from lpt.verdict import VERDICT_ENV, read_verdict

__all__ = [
    "repo_busy",
    "DvcStage",
    "StageRun",
    "LockedOutput",
    "CheckoutRun",
    "DvcYamlError",
    "read_stages",
    "pipeline_order",
    "locked_outputs",
    "StageStatus",
    "stage_status",
    "dvc_env",
    "run_dvc_stage",
    "checkout_outputs",
    "restore_outputs",
    "verdict_name",
]

_VERDICTS = {getattr(exitcodes, name): name for name in exitcodes.__all__
             if isinstance(getattr(exitcodes, name), int)}

# Stopping an interrupted DVC call: SIGINT first (the stage command stops as on Ctrl-C and DVC exits
# cleanly, releasing its repo lock), then SIGTERM, then SIGKILL.
_STOP_GRACE_S = (15.0, 5.0, 5.0)


class DvcYamlError(ValueError):
    """No ``dvc.yaml``, not a DVC repository, a ``dvc.yaml`` DVC refuses (syntax, schema, templating,
    cycles), or no such stage. The message is one line."""


@dataclass(frozen=True)
class DvcStage:
    """One pipeline stage as DVC resolved it, paths relative to the repo root (POSIX, normalised).

    Attributes:
        name: how ``dvc repro`` run in the root addresses it: the stage name for the root ``dvc.yaml``,
            ``sub/dvc.yaml:name`` for another one; ``name@key`` for ``foreach``/``matrix`` stages.
        cmd: the command DVC runs, templating resolved (for logs only).
        deps: dependency paths (params files excluded).
        outs: output paths (``outs``, ``metrics`` and ``plots`` declared in the stage).
        restorable: the outputs ``dvc checkout`` can put back from DVC's cache: recorded in ``dvc.lock``,
            cached (``cache: true``) and not ``persist: true`` (DVC keeps persistent outputs, e.g. a
            training run's resume state, when the stage runs; the locked version would throw it away).
    """

    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    restorable: tuple[str, ...] = ()

    def owns(self, path: str | Path) -> bool:
        """True when ``path`` (repo-relative) is one of this stage's outputs or lies inside one."""
        return self.output_of(path) is not None

    def output_of(self, path: str | Path) -> str | None:
        """The output of this stage that is or contains ``path`` (repo-relative), or ``None``."""
        target = _norm(str(path))
        return next((out for out in self.outs if _inside(target, out)), None)


@dataclass
class StageRun:
    """What one ``dvc repro --single-item`` call did.

    Attributes:
        stage: stage name.
        returncode: the DVC process exit code (255 whenever the stage failed).
        status: ``ran`` (the command ran), ``cached`` (DVC skipped it: up to date or restored from the run
            cache) or ``failed``.
        detail: a human sentence about the status.
        seconds: wall time of the DVC call.
        tail: the last output lines (stdout and stderr interleaved).
        exit_code: the stage command's own exit code, from the verdict file an ``lpt`` command writes
            (:mod:`lpt.verdict`); ``None`` when there is none: DVC failed before the command (a lock held, a
            missing dependency), the command was killed, or it is not an ``lpt`` command.
        command_started: DVC started the command, so it had already removed the stage's outputs (the command
            wrote a verdict, or DVC raised its command-failed error).
        transient: a failure worth retrying: the command's verdict says so (an I/O fault by ``errno``), or
            another DVC process held the repo lock; never for a deterministic verdict (:mod:`lpt.exitcodes`).
    """

    stage: str
    returncode: int
    status: Literal["ran", "cached", "failed"]
    detail: str
    seconds: float
    tail: list[str] = field(default_factory=list)
    exit_code: int | None = None
    command_started: bool = False
    transient: bool = False


@dataclass(frozen=True)
class LockedOutput:
    """One output as ``dvc.lock`` records it (what ``dvc checkout`` would put back)."""

    path: str
    md5: str
    size: int | None = None
    nfiles: int | None = None


@dataclass
class CheckoutRun:
    """What :func:`checkout_outputs` did: ``targets`` checked out (none: nothing restorable), DVC's exit code."""

    targets: list[str]
    returncode: int
    lines: list[str] = field(default_factory=list)


def _norm(path: str) -> str:
    return os.path.normpath(str(path)).replace(os.sep, "/")


def _inside(path: str, parent: str) -> bool:
    """``path`` equals ``parent`` or lies under it."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _one_line(err: BaseException) -> str:
    """DVC's message (and, for its generic YAML/schema errors, the cause) collapsed into one line."""
    text = " ".join(str(err).split())
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip() and (text.endswith("failed") or "corrupted" in text):
        detail = " ".join(str(cause).split())
        text += ": " + (detail if len(detail) <= 300 else detail[:297] + "...")
    return text


@contextlib.contextmanager
def _open_repo(repo_dir: str | Path) -> Iterator[Any]:
    """``dvc.repo.Repo`` for ``repo_dir``, every DVC error turned into a one-line :class:`DvcYamlError`."""
    root = Path(repo_dir).resolve()
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise DvcYamlError(f"{dvc_yaml}: not found (is repo_dir a DVC project root?)")
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            yield repo
    except DvcException as err:
        raise DvcYamlError(f"{dvc_yaml}: {_one_line(err)}") from None


def _relpath(path: str | Path, root: Path) -> str:
    return _norm(os.path.relpath(str(path), str(root)))


def _address(stage: Any, root: Path) -> str:
    """The stage's address for ``dvc repro`` run in ``root`` (``name`` or ``sub/dvc.yaml:name``)."""
    dvcfile = _relpath(stage.path, root)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _is_pipeline_stage(stage: Any) -> bool:
    """A ``dvc.yaml`` stage with a command (not a ``.dvc`` file from ``dvc add``/``dvc import``)."""
    return getattr(stage, "name", None) is not None and bool(stage.cmd)


def _local_path(item: Any, root: Path) -> str:
    fs_path = getattr(item, "fs_path", None)
    if isinstance(fs_path, str) and os.path.isabs(fs_path):
        return _relpath(fs_path, root)
    return str(item.def_path)


def _to_stage(stage: Any, root: Path) -> DvcStage:
    from dvc.dependency.param import ParamsDependency

    cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
    deps = tuple(_local_path(d, root) for d in stage.deps if not isinstance(d, ParamsDependency))
    outs = tuple(_local_path(o, root) for o in stage.outs)
    restorable = tuple(_local_path(o, root) for o in stage.outs
                       if o.use_cache and not o.persist and o.hash_info and o.hash_info.value)
    return DvcStage(name=_address(stage, root), cmd=cmd, deps=deps, outs=outs, restorable=restorable)


def read_stages(repo_dir: str | Path) -> list[DvcStage]:
    """Every pipeline stage of the repository, as DVC resolved it (``dvc.yaml`` order within a file).

    Args:
        repo_dir: the DVC repository root (holds ``dvc.yaml``).

    Returns:
        The stages, paths relative to ``repo_dir``.

    Raises:
        DvcYamlError: no ``dvc.yaml``, not a DVC repository, or a ``dvc.yaml`` DVC refuses.
    """
    root = Path(repo_dir).resolve()
    with _open_repo(root) as repo:
        return [_to_stage(s, root) for s in repo.index.stages if _is_pipeline_stage(s)]


def pipeline_order(repo_dir: str | Path, target: str | None = None) -> list[DvcStage]:
    """Stages in dependency order (DVC's stage graph), ``target`` and its upstream or the whole pipeline.

    Like ``dvc repro [TARGET]`` run in ``repo_dir``: without a target, every stage of ``repo_dir/dvc.yaml``
    plus whatever they depend on. Ties keep the ``dvc.yaml`` order, so the order is deterministic.

    Args:
        repo_dir: the DVC repository root.
        target: a stage name (as :attr:`DvcStage.name`); ``None`` means the whole pipeline.

    Returns:
        Stages to run, upstream first.

    Raises:
        DvcYamlError: unknown target (the message names the stages), no ``dvc.yaml``, or one DVC refuses
            (syntax, schema, unresolved ``${...}``, a dependency cycle).
    """
    import networkx as nx

    root = Path(repo_dir).resolve()
    with _open_repo(root) as repo:
        index = repo.index
        stages = [s for s in index.stages if _is_pipeline_stage(s)]
        by_name = {_address(s, root): s for s in stages}
        if target is None:
            wanted = {s for s in stages if _relpath(s.path, root) == "dvc.yaml"}
        elif target in by_name:
            wanted = {by_name[target]}
        else:
            raise DvcYamlError(f"unknown target stage {target!r}; dvc.yaml has: {', '.join(by_name) or 'no stages'}")
        graph = index.graph  # edges run from a stage to the stages it depends on
        for stage in list(wanted):
            wanted |= nx.descendants(graph, stage)
        wanted = {s for s in wanted if _is_pipeline_stage(s)}
        position = {s: i for i, s in enumerate(stages)}
        upstream_first = graph.subgraph(wanted).reverse(copy=True)
        ordered = nx.lexicographical_topological_sort(upstream_first, key=lambda s: position[s])
        return [_to_stage(s, root) for s in ordered]


def locked_outputs(repo_dir: str | Path, stage: str) -> dict[str, LockedOutput]:
    """The outputs of ``stage`` as ``dvc.lock`` records them now (read through DVC's index).

    Args:
        repo_dir: the DVC repository root.
        stage: stage name (as :attr:`DvcStage.name`).

    Returns:
        Output path (repo-relative) to its locked md5 (``<md5>.dir`` for a folder), size and file count;
        outputs without a lock entry are left out (the stage never completed).

    Raises:
        DvcYamlError: as :func:`read_stages`, or no such stage.
    """
    root = Path(repo_dir).resolve()
    with _open_repo(root) as repo:
        found = [s for s in repo.index.stages if _is_pipeline_stage(s) and _address(s, root) == stage]
        if not found:
            raise DvcYamlError(f"unknown stage {stage!r}")
        locked = {}
        for out in found[0].outs:
            if out.hash_info and out.hash_info.value:
                path = _local_path(out, root)
                locked[path] = LockedOutput(path=path, md5=str(out.hash_info.value), size=out.meta.size,
                                            nfiles=out.meta.nfiles)
        return locked


@dataclass
class StageStatus:
    """One stage's ``dvc status`` (``Repo.status()``, the same as ``dvc status --json``).

    Attributes:
        stage: the stage.
        locked: ``dvc.lock`` has an entry for it.
        entries: DVC's status entries, e.g. ``[{"changed deps": {"src": "modified", "params.yaml":
            {"train.lr": "modified"}}}, {"changed outs": {"models": "not in cache"}}, "changed command"]``;
            empty when DVC finds the stage up to date.
    """

    stage: DvcStage
    locked: bool
    entries: list[Any] = field(default_factory=list)


def _lock_entries(dvc_yaml: Path) -> set[str]:
    """Stage names recorded in the ``dvc.lock`` next to ``dvc_yaml`` (empty when there is none)."""
    import yaml

    try:
        doc = yaml.safe_load((dvc_yaml.parent / "dvc.lock").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return set()
    stages = doc.get("stages") if isinstance(doc, dict) else None
    return set(stages) if isinstance(stages, dict) else set()


def stage_status(repo_dir: str | Path) -> list[StageStatus]:
    """``dvc status`` of every pipeline stage against ``dvc.lock`` (takes DVC's repo lock while it runs).

    Args:
        repo_dir: the DVC repository root.

    Returns:
        One :class:`StageStatus` per pipeline stage, in DVC's order.

    Raises:
        DvcYamlError: as :func:`read_stages`.
    """
    root = Path(repo_dir).resolve()
    with _open_repo(root) as repo:
        stages = [s for s in repo.index.stages if _is_pipeline_stage(s)]
        status = repo.status()  # keyed by each stage's address relative to the working directory
        locks = {path: _lock_entries(Path(path)) for path in {s.path for s in stages}}
        return [StageStatus(stage=_to_stage(s, root), locked=s.name in locks[s.path],
                            entries=list(status.get(s.addressing, []))) for s in stages]


def repo_busy(repo_dir: str | Path) -> bool:
    """True when another DVC command works in the repository: a ``dvc repro`` is running.

    DVC holds its repo lock (``.dvc/tmp/lock``) while it hashes and records, but releases it while a stage's
    command runs, so that stages of other pipelines may run beside it; what it keeps then are its read and write
    locks on the stage's dependencies and outputs (``.dvc/tmp/rwlock``). So: busy when the repo lock is held (DVC
    waits about 3 s for it), or when the rwlock names a live process. Read under the repo lock, as DVC does.

    Raises:
        DvcYamlError: not a DVC project, or DVC refuses it.
    """
    from dvc.lock import LockError

    with _open_repo(repo_dir) as repo:
        try:
            with repo.lock:
                return bool(_rwlock_holders(Path(repo.tmp_dir) / "rwlock"))
        except LockError:
            return True


def _rwlock_holders(path: Path) -> list[int]:
    """The live PIDs that DVC's rwlock file names (``{"read": {path: [{"pid", "cmd"}]}, "write": {path: {...}}}``);
    none for a missing or unreadable file (:mod:`pipelines.sweep` repairs a corrupted one)."""
    from lpt.utils import pid_alive

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    entries: list[Any] = []
    for mode in ("read", "write"):
        for holders in (doc.get(mode) or {}).values() if isinstance(doc, dict) else ():
            entries += holders if isinstance(holders, list) else [holders]
    pids = {e.get("pid") for e in entries if isinstance(e, dict)}
    return sorted(pid for pid in pids if isinstance(pid, int) and pid != os.getpid() and pid_alive(pid))


def dvc_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a DVC subprocess: this interpreter's bin dir first on PATH (stage commands call
    ``lpt``), no analytics, offline Hugging Face hub, unbuffered Python so lines stream as they happen."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir)])
    env.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", GX_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    return env


def _stop(proc: subprocess.Popen, on_line: Callable[[str], None]) -> None:
    """Stop an interrupted DVC call and everything it started (its own process group), draining its output."""
    for sig, grace in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), _STOP_GRACE_S):
        with contextlib.suppress(OSError):  # already gone
            os.killpg(proc.pid, sig)
        try:
            rest = proc.communicate(timeout=grace)[0] or ""
        except subprocess.TimeoutExpired:
            continue
        except ValueError:  # the output pipe is already closed: just wait
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            rest = ""
        for line in rest.splitlines():
            with contextlib.suppress(Exception):  # a failing logger must not leave the process running
                on_line(line)
        return


def _run_streaming(cmd: list[str], repo_dir: str | Path, on_line: Callable[[str], None],
                   env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` in ``repo_dir``, call ``on_line`` with each merged output line as it comes, return its exit code.

    The process gets its own process group; if this call is interrupted (KeyboardInterrupt, Prefect's
    TerminationSignal on cancellation), the process and everything it started are stopped first.
    """
    with subprocess.Popen(cmd, cwd=repo_dir, env={**dvc_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True, bufsize=1, errors="replace",
                          start_new_session=True) as proc:
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                on_line(raw.rstrip("\n"))
            return proc.wait()
        except BaseException:
            _stop(proc, on_line)
            raise


def run_dvc_stage(
    repo_dir: str | Path,
    stage: str,
    *,
    force: bool = False,
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 25,
) -> StageRun:
    """``dvc repro --single-item STAGE`` in ``repo_dir`` (through :mod:`pipelines.dvc_repro`), streaming every line.

    If this call is interrupted (KeyboardInterrupt, a Prefect cancellation), the DVC process and the stage
    command are stopped (SIGINT, then SIGTERM, then SIGKILL) before the exception propagates, so DVC's repo
    lock is free for :func:`restore_outputs`.

    Args:
        repo_dir: the DVC repository root (the subprocess's working directory).
        stage: stage name.
        force: run even if DVC considers the stage up to date.
        on_line: called with each output line (stdout and stderr merged) as soon as it is printed.
        tail_lines: how many trailing lines to keep for error messages.

    Returns:
        A :class:`StageRun`; a failure gives ``status="failed"`` with the command's ``exit_code`` where its
        verdict file has one (this function does not raise for a failed stage).
    """
    tail: deque[str] = deque(maxlen=tail_lines)

    def watch(line: str) -> None:
        tail.append(line)
        if on_line is not None:
            on_line(line)

    with tempfile.TemporaryDirectory(prefix="lpt-stage-") as tmp:
        outcome_file, verdict_file = Path(tmp) / "outcome.json", Path(tmp) / "verdict.json"
        cmd = [sys.executable, "-m", "pipelines.dvc_repro", stage, *(["--force"] if force else []),
               "--outcome", str(outcome_file), "--parent", str(os.getpid())]
        start = time.perf_counter()
        returncode = _run_streaming(cmd, repo_dir, watch, env={VERDICT_ENV: str(verdict_file)})
        seconds = time.perf_counter() - start
        outcome, verdict = read_verdict(outcome_file), read_verdict(verdict_file)
    return _stage_run(stage, returncode, outcome, verdict, seconds, list(tail))


def _stage_run(stage: str, returncode: int, outcome: dict[str, Any] | None, verdict: dict[str, Any] | None,
               seconds: float, tail: list[str]) -> StageRun:
    """Classify one stage run from DVC's outcome (:mod:`pipelines.dvc_repro`) and the command's verdict."""
    error = (outcome or {}).get("error") or {}
    exit_code = verdict.get("exit_code") if verdict else None
    exit_code = exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None
    started = bool(verdict and verdict.get("started")) or error.get("kind") == "command"
    if returncode != 0 or outcome is None or error:
        transient = exit_code not in exitcodes.DETERMINISTIC and (
            bool(verdict and verdict.get("transient")) or error.get("kind") == "lock")
        if exit_code is not None:
            detail = f"command exited with {exit_code}"
        elif started:
            detail = f"dvc exited with {returncode}: the command failed without a verdict (killed, or not an lpt command)"
        else:
            detail = f"dvc exited with {returncode} before running the command"
        return StageRun(stage=stage, returncode=returncode or 255, status="failed", detail=detail, seconds=seconds,
                        tail=tail, exit_code=exit_code, command_started=started, transient=transient)
    if outcome.get("frozen"):  # DVC never runs a frozen stage's command; it only verifies its outputs
        status, detail = "cached", "frozen stage: its committed outputs are used as they are, command not run"
    elif not outcome.get("reproduced"):
        status, detail = "cached", "up to date (dvc.lock matches), skipped"
    elif verdict:
        status, detail = "ran", "command ran"
    else:
        status, detail = "ran", ("reproduced by DVC: its command ran, or DVC restored its outputs from the run "
                                 "cache (only lpt commands report which)")
    return StageRun(stage=stage, returncode=returncode, status=status, detail=detail, seconds=seconds, tail=tail,
                    command_started=bool(verdict))


def checkout_outputs(repo_dir: str | Path, targets: Sequence[str], *,
                     on_line: Callable[[str], None] | None = None) -> CheckoutRun:
    """``python -m dvc checkout --force TARGETS``: put these outputs back as ``dvc.lock`` names them.

    ``--force`` replaces whatever is there (a failed run's half-written files). Never raises for a failed
    checkout: the caller reads ``returncode``. No targets: nothing runs.

    Args:
        repo_dir: the DVC repository root.
        targets: output paths (repo-relative) or stage names.
        on_line: called with each DVC output line.
    """
    if not targets:
        return CheckoutRun(targets=[], returncode=0)
    lines: list[str] = []

    def keep(line: str) -> None:
        lines.append(line)
        if on_line is not None:
            on_line(line)

    cmd = [sys.executable, "-m", "dvc", "checkout", "--force", *targets]
    return CheckoutRun(targets=list(targets), returncode=_run_streaming(cmd, repo_dir, keep), lines=lines)


def restore_outputs(repo_dir: str | Path, stage: DvcStage, *,
                    on_line: Callable[[str], None] | None = None) -> CheckoutRun:
    """Put back the previous outputs of a stage whose run failed or was stopped.

    ``dvc repro`` removes a stage's outputs before running its command; when the command fails, the
    previous outputs are still in DVC's cache and ``dvc.lock`` still names them. Only
    :attr:`DvcStage.restorable` outputs are checked out (``persist: true`` ones are left as they are).

    Args:
        repo_dir: the DVC repository root.
        stage: the stage, as read before its run.
        on_line: called with each DVC output line.

    Returns:
        A :class:`CheckoutRun` (``targets`` empty when nothing is restorable).
    """
    return checkout_outputs(repo_dir, stage.restorable, on_line=on_line)


def verdict_name(exit_code: int | None) -> str | None:
    """The :mod:`lpt.exitcodes` name of a command exit code (``GATE_FAILED`` for 4), ``None`` if it has none."""
    return _VERDICTS.get(exit_code) if exit_code is not None else None
