"""DVC without Prefect: the stage DAG read from ``dvc.yaml`` and one ``dvc repro`` call per stage.

The flow (``pipelines/flow.py``) is built on these helpers, so adding a stage to ``dvc.yaml`` needs no
change here or there. Nothing in this module knows about tensors or about Prefect.

Example:
    >>> from pipelines.dvc_stages import pipeline_order, run_dvc_stage
    >>> [s.name for s in pipeline_order(".", target="validate")]
    ['ingest', 'validate']
    >>> run = run_dvc_stage(".", "ingest", on_line=print)
    >>> run.status  # "ran" or "cached"
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "DvcStage",
    "StageRun",
    "DvcYamlError",
    "read_stages",
    "pipeline_order",
    "dvc_env",
    "run_dvc_stage",
    "is_transient_failure",
]

# DVC's messages for a stage it did not run (dvc 3.x): its lock matches, or the run cache restored it.
_UP_TO_DATE = re.compile(r"Stage '(?P<name>[^']+)' didn't change, skipping")
_RUN_CACHE = re.compile(r"Stage '(?P<name>[^']+)' is cached - skipping run")

# Failures worth retrying: the machine hiccuped, not the data or the model.
_TRANSIENT = re.compile(
    r"\b(OSError|IOError|BrokenPipeError|ConnectionError|ConnectionResetError|TimeoutError|BlockingIOError)\b"
    r"|Input/output error|Resource temporarily unavailable|Stale file handle|Too many open files"
    r"|Unable to acquire lock|lock is held|Lock(ed|Error)",
    re.IGNORECASE,
)
# Deterministic verdicts that must never be retried, even if an I/O error is mentioned on the way.
_DETERMINISTIC = re.compile(
    r"data validation failed|quality gate failed|parity|ParamsError|invalid params|IngestError|ExportError",
    re.IGNORECASE,
)


class DvcYamlError(ValueError):
    """``dvc.yaml`` is missing, malformed, uses a construct this reader does not expand, or names no such stage."""


@dataclass(frozen=True)
class DvcStage:
    """One stage of ``dvc.yaml`` with its paths relative to the repo root (POSIX, normalised).

    Attributes:
        name: the stage name.
        cmd: the command DVC runs (for logs only).
        deps: dependency paths.
        outs: output paths (``outs``, ``metrics`` and ``plots`` declared in the stage).
    """

    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]

    def owns(self, path: str | Path) -> bool:
        """True when ``path`` (repo-relative) is one of this stage's outputs or lies inside one."""
        return any(_inside(_norm(str(path)), out) for out in self.outs)


@dataclass
class StageRun:
    """What one ``dvc repro --single-item`` call did.

    Attributes:
        stage: stage name.
        returncode: the DVC process exit code.
        status: ``ran`` (the command ran), ``cached`` (DVC skipped it: up to date or restored from the run
            cache) or ``failed``.
        detail: a human sentence about the status.
        seconds: wall time of the DVC call.
        tail: the last output lines (stdout and stderr interleaved).
    """

    stage: str
    returncode: int
    status: Literal["ran", "cached", "failed"]
    detail: str
    seconds: float
    tail: list[str] = field(default_factory=list)


def _norm(path: str, wdir: str = ".") -> str:
    return posixpath.normpath(posixpath.join(wdir, str(path).replace(os.sep, "/")))


def _inside(path: str, parent: str) -> bool:
    """``path`` equals ``parent`` or lies under it."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _overlaps(a: str, b: str) -> bool:
    return _inside(a, b) or _inside(b, a)


def _entry_paths(entries: Iterable[Any] | None, wdir: str) -> list[str]:
    """Paths of ``deps``/``outs``-style entries: ``- path`` or ``- path: {options}``."""
    paths: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            paths.append(_norm(entry, wdir))
        elif isinstance(entry, dict):
            paths.extend(_norm(key, wdir) for key in entry)
    return paths


def read_stages(repo_dir: str | Path) -> list[DvcStage]:
    """Read the stages of ``repo_dir/dvc.yaml`` in file order.

    Args:
        repo_dir: the DVC repository root.

    Returns:
        The stages, paths relative to ``repo_dir``.

    Raises:
        DvcYamlError: no ``dvc.yaml``, not a mapping, or a templated stage (``foreach``/``matrix``).
    """
    path = Path(repo_dir) / "dvc.yaml"
    if not path.is_file():
        raise DvcYamlError(f"{path}: not found (is repo_dir a DVC project root?)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DvcYamlError(f"{path}: not valid YAML: {err}") from None
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise DvcYamlError(f"{path}: no 'stages' mapping")
    out: list[DvcStage] = []
    for name, spec in stages.items():
        if not isinstance(spec, dict) or "cmd" not in spec:
            raise DvcYamlError(f"{path}: stage {name!r} has no 'cmd' (foreach/matrix stages are not expanded here)")
        wdir = str(spec.get("wdir", "."))
        cmd = spec["cmd"] if isinstance(spec["cmd"], str) else " && ".join(spec["cmd"])
        outs = [*_entry_paths(spec.get("outs"), wdir), *_entry_paths(spec.get("metrics"), wdir),
                *_entry_paths(spec.get("plots"), wdir)]
        out.append(DvcStage(name=str(name), cmd=cmd, deps=tuple(_entry_paths(spec.get("deps"), wdir)),
                            outs=tuple(outs)))
    return out


def pipeline_order(repo_dir: str | Path, target: str | None = None) -> list[DvcStage]:
    """Stages in dependency order (what ``dvc dag`` draws), optionally only ``target`` and its upstream.

    A stage depends on another when one of its ``deps`` is, contains or lies inside one of the other's
    outputs. Ties keep the ``dvc.yaml`` order, so the order is deterministic.

    Args:
        repo_dir: the DVC repository root.
        target: a stage name; ``None`` means every stage.

    Returns:
        Stages to run, upstream first.

    Raises:
        DvcYamlError: unknown target, or a dependency cycle.
    """
    stages = read_stages(repo_dir)
    by_name = {s.name: s for s in stages}
    upstream: dict[str, set[str]] = {
        s.name: {o.name for o in stages if o.name != s.name and any(_overlaps(d, p) for d in s.deps for p in o.outs)}
        for s in stages
    }
    wanted = set(by_name)
    if target is not None:
        if target not in by_name:
            raise DvcYamlError(f"unknown target stage {target!r}; dvc.yaml has: {', '.join(by_name)}")
        wanted, todo = set(), [target]
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(upstream[name])
    ordered: list[DvcStage] = []
    done: set[str] = set()
    while len(ordered) < len(wanted):
        ready = [s for s in stages if s.name in wanted and s.name not in done and upstream[s.name] & wanted <= done]
        if not ready:
            cycle = sorted(wanted - done)
            raise DvcYamlError(f"dependency cycle among stages: {', '.join(cycle)}")
        ordered.append(ready[0])
        done.add(ready[0].name)
    return ordered


def dvc_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a DVC subprocess: this interpreter's bin dir first on PATH (stage commands call
    ``lpt``), no analytics, offline Hugging Face hub, unbuffered Python so lines stream as they happen."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir)])
    env.update(DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1", GX_ANALYTICS_ENABLED="false", PYTHONUNBUFFERED="1")
    return env


def run_dvc_stage(
    repo_dir: str | Path,
    stage: str,
    *,
    force: bool = False,
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 25,
) -> StageRun:
    """Run ``python -m dvc repro --single-item STAGE`` in ``repo_dir``, streaming every output line.

    Args:
        repo_dir: the DVC repository root (the subprocess's working directory).
        stage: stage name.
        force: pass ``-f`` (run even if DVC considers the stage up to date).
        on_line: called with each output line (stdout and stderr merged) as soon as it is printed.
        tail_lines: how many trailing lines to keep for error messages.

    Returns:
        A :class:`StageRun`; a non-zero exit gives ``status="failed"`` (this function does not raise).
    """
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    tail: deque[str] = deque(maxlen=tail_lines)
    up_to_date = run_cache = False
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=repo_dir, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True, bufsize=1, errors="replace") as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            up_to_date = up_to_date or bool(_UP_TO_DATE.search(line))
            run_cache = run_cache or bool(_RUN_CACHE.search(line))
            if on_line is not None:
                on_line(line)
        returncode = proc.wait()
    seconds = time.perf_counter() - start
    if returncode != 0:
        status, detail = "failed", f"dvc exited with {returncode}"
    elif up_to_date:
        status, detail = "cached", "up to date (dvc.lock matches), skipped"
    elif run_cache:
        status, detail = "cached", "restored from the DVC run cache, command not run"
    else:
        status, detail = "ran", "command ran"
    return StageRun(stage=stage, returncode=returncode, status=status, detail=detail, seconds=seconds,
                    tail=list(tail))


def is_transient_failure(lines: Iterable[str]) -> bool:
    """True when a failed stage's output looks like an I/O or lock hiccup worth retrying.

    Deterministic verdicts (validation, quality gate, ONNX parity, bad params) are never transient.
    """
    text = "\n".join(lines)
    return bool(_TRANSIENT.search(text)) and not _DETERMINISTIC.search(text)
