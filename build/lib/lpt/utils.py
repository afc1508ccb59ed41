"""Small shared helpers: atomic writes, hashing, seeding, device choice. Torch is imported lazily."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_dir", "temp_prefix", "remove_stale_temps", "write_json_atomic", "sha256_file",
           "seed_everything", "resolve_device"]


def _host_tag() -> str:
    """This machine's name reduced to ``[A-Za-z0-9]`` (at most 24 chars): pids only mean something per host."""
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def temp_prefix(path: str | Path, pid: int | None = None) -> str:
    """Name prefix of the temporaries that :func:`atomic_path`/:func:`atomic_dir` create beside ``path``.

    Temporaries are named ``.{name}.{host}-{pid}.{random}.tmp``: the creating process is in the name, so a
    later run can tell a temporary left by a killed process from one that a live process is still writing.

    Args:
        path: the final path.
        pid: the creating process (default: this one).
    """
    return f".{Path(path).name}.{_host_tag()}-{os.getpid() if pid is None else pid}."


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return True  # never signal process groups; treat as alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove temporaries beside ``path`` left by dead processes of this host (see :func:`temp_prefix`).

    Only names of our own pattern are touched, and only when the pid in the name is not a live process on
    this host; a temporary of a live process (or of another host, or of the old pid-less format) is kept.

    Returns:
        The paths removed.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(_host_tag())}-(\d+)\.[A-Za-z0-9_]+\.tmp$")
    removed = []
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``, on error delete it.

    Temporaries of the same ``path`` left by killed processes are removed first (:func:`remove_stale_temps`).

    Example:
        >>> with atomic_path("out/model.onnx") as tmp:
        ...     save(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` whole, on error it is removed.

    Temp folders of the same ``path`` left by killed processes are removed first (:func:`remove_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON via temp file + rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return Path(path)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (if importable)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # torch-free runtime install
        pass


def resolve_device(choice: str = "auto") -> str:
    """Map ``auto|cpu|cuda`` to a concrete torch device string; ``cuda`` without a GPU is an error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return choice


class JsonFileError(ValueError):
    """A JSON file could not be read or is not what it should be; the message names the file."""


def read_json(path: str | Path, what: str = "JSON file", expect: type = dict) -> Any:
    """Read a JSON file that this project (or a user) wrote, with one clear error when it is damaged.

    JSON is data only: reading it never runs code.

    Args:
        path: the file.
        what: how the message names it (e.g. ``"checkpoint metadata"``).
        expect: the top-level type required (``dict`` by default).

    Raises:
        JsonFileError: missing, unreadable, not JSON, or a different top-level type (the file is named).
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JsonFileError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise JsonFileError(f"{path}: cannot read the {what} ({err})") from None
    except json.JSONDecodeError as err:
        raise JsonFileError(f"{path}: the {what} is not valid JSON ({err.msg} at line {err.lineno} "
                            f"column {err.colno}); it is damaged: regenerate it") from None
    if not isinstance(value, expect):
        raise JsonFileError(f"{path}: the {what} must hold a JSON {expect.__name__}, got {type(value).__name__}")
    return value
