"""Small shared helpers: atomic writes, hashing, seeding, device choice. Torch is imported lazily."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_dir", "save_safetensors", "temp_prefix", "remove_stale_temps", "write_json_atomic",
           "sha256_json", "sha256_file", "pid_alive",
           "seed_everything", "resolve_device", "OutputDirError", "OutputWriteError", "refuse_protected",
           "check_output_dir"]


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


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a process of another user counts as alive)."""
    if pid <= 0:
        return True  # never signal process groups; treat as alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:  # a zombie (killed, not yet reaped: an orphan waits for init) has exited: its temporaries are stale
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:][:1] != "Z"
    except (OSError, ValueError, IndexError):
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
        if match is None or pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class OutputDirError(ValueError):
    """An output folder the project may not write or replace (``.``, a repository root, a folder of the user's);
    the message names the folder and what was expected. The CLI exits 2 (``BAD_PARAMS``): it is a choice of path."""


class OutputWriteError(OSError):
    """Writing an output failed on the filesystem (no space, file size limit, permission denied, name too long...).

    One line naming the output path and the fault; the previous output at that path is unchanged (nothing
    was renamed onto it).

    Attributes:
        target: the output path named.
        original: the filesystem's own error.
    """

    target: Path
    original: OSError


PROTECTED_NAMES = frozenset({".git", ".dvc"})
"""Folder names an output path may never contain: a repository's own metadata."""


def refuse_protected(path: str | Path, what: str = "output folder") -> None:
    """Refuse an output folder whose contents are never the project's to write or replace.

    Refused outright: ``.`` / the working directory, any ancestor of it (``..``, ``/``), the home folder, a
    repository root (a folder holding ``.git`` or ``.dvc``), and any path through a ``.git`` or ``.dvc`` folder.

    Args:
        path: the output folder (as configured, e.g. ``data.out_dir``).
        what: how the message names it (the params key).

    Raises:
        OutputDirError: one of the above (the message names the path and why).
    """
    given = Path(path)
    real = given.resolve()
    cwd = Path.cwd().resolve()
    try:
        home: Path | None = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder known (HOME unset, no passwd entry)
        home = None
    why = None
    if real == cwd:
        why = "it is the working directory"
    elif real in cwd.parents:
        why = "it is an ancestor of the working directory"
    elif home is not None and real == home:
        why = "it is the home folder"
    elif PROTECTED_NAMES & set(given.parts) or real.name in PROTECTED_NAMES or any(
            real.is_relative_to(cwd / name) for name in PROTECTED_NAMES):
        why = "it is inside a repository's .git or .dvc folder"
    elif real.is_dir() and any((real / name).exists() for name in PROTECTED_NAMES):
        why = "it is a repository root (it holds .git or .dvc)"
    if why:
        raise OutputDirError(f"{what} {str(path)!r}: refused, {why}; outputs go to a folder of their own "
                             "(e.g. the default in params.yaml)")


def check_output_dir(path: str | Path, what: str = "output folder", own: Collection[str] = (),
                     key: str | None = None) -> None:
    """Refuse to replace a folder this project did not write (see :func:`atomic_dir`).

    A folder may be replaced whole only when it is absent, empty, or holds nothing but the entries the stage
    itself writes (``own``: names or ``fnmatch`` patterns) and, where ``key`` is given (for stages whose entry
    names alone are too generic, e.g. ``train/``), that key file. Previous outputs pass as they are, with no
    marker needed; a user's folder (``docs``, a dataset) with anything else in it is refused.

    Args:
        path: the folder to be replaced.
        what: how the message names it (the params key).
        own: the top-level entries the stage writes.
        key: an entry a previous output of the stage always holds.

    Raises:
        OutputDirError: protected (:func:`refuse_protected`), a file, foreign entries, or no key file.
    """
    path = Path(path)
    with _faults_named(path, None, NOTHING_WRITTEN):
        _check_output_dir(path, what, own, key)


def _check_output_dir(path: Path, what: str, own: Collection[str], key: str | None) -> None:
    refuse_protected(path, what)
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputDirError(f"{what} {str(path)!r} is a file, not a folder; point {what} to a folder of its own")
    names = sorted(entry.name for entry in path.iterdir())
    foreign = [n for n in names if not any(fnmatch.fnmatchcase(n, pattern) for pattern in own)]
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputDirError(f"{what} {str(path)!r} holds files this project did not write ({listed}): the folder is "
                             f"replaced whole, so point {what} to a new or empty folder (expected only "
                             f"{', '.join(own) or 'nothing'})")
    if names and key is not None and key not in names:
        raise OutputDirError(f"{what} {str(path)!r} has no {key}: it is not an output of this stage, and the folder "
                             f"is replaced whole; point {what} to a new or empty folder")


_WRITE_FAULTS = frozenset({errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""Errors only a write can cause: whatever file they name, they are a fault of writing the output."""


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


NOTHING_WRITTEN = "nothing was written"
KEPT = "the previous one is unchanged"


def _write_error(err: OSError, path: Path, tmp: Path | None, kept: str) -> OSError:
    """``err`` as one :class:`OutputWriteError` line naming ``path`` when it is a fault of writing the output.

    An error about another file (an input read while the output is written) is returned unchanged.
    """
    name = Path(os.fsdecode(err.filename)) if err.filename is not None else None
    in_tmp = name is not None and tmp is not None and name.is_relative_to(tmp)
    if tmp is not None and err.errno not in _WRITE_FAULTS and not in_tmp:
        return err
    code = errno.errorcode.get(err.errno or 0, "")
    where = f" ({name})" if name is not None and not in_tmp and name != path else ""
    wrapped = OutputWriteError(f"cannot write {path}: {err.strerror or err}{f' [{code}]' if code else ''}{where}; "
                               f"{kept}")
    wrapped.errno, wrapped.target, wrapped.original = err.errno, path, err
    return wrapped


@contextlib.contextmanager
def _faults_named(path: Path, tmp: Path | None, kept: str) -> Iterator[None]:
    """Filesystem faults inside as one line naming ``path`` (``tmp``: the temporary being written, if any).

    A fault already named for a file inside ``tmp`` (a nested atomic write) is named again for ``path``.
    """
    try:
        yield
    except OutputWriteError as err:
        if tmp is None or not err.target.is_relative_to(tmp):
            raise
        raise _write_error(err.original, path, tmp, kept) from None
    except OSError as err:
        wrapped = _write_error(err, path, tmp, kept)
        if wrapped is err:
            raise
        raise wrapped from None


def save_safetensors(tensors: dict[str, Any], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file``, but written with Python's own file I/O.

    safetensors' writer reports a filesystem fault as ``SafetensorError("... I/O error: File too large (os error
    27)")``, which is no ``OSError``: :func:`atomic_path` could not name the output, and the user saw a traceback
    (``bench.faults`` under a file-size limit). Serialising to bytes first gives the same file, and a full disk or a
    size limit raises the ``OSError`` (errno, file name) that the atomic writers turn into one line.

    Args:
        tensors: name -> contiguous CPU tensor.
        path: the file to write (usually a temporary from :func:`atomic_path`).
        metadata: the safetensors header's string map.

    Returns:
        ``path``.
    """
    from safetensors.torch import save

    path = Path(path)
    path.write_bytes(save(tensors, metadata=metadata))
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``, on error delete it.

    Temporaries of the same ``path`` left by killed processes are removed first (:func:`remove_stale_temps`).
    The file gets the permissions of any new file (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    A filesystem fault while writing (no space, file size limit, permission denied, name too long) is
    raised as one :class:`OutputWriteError` line naming ``path``; ``path`` itself is never touched then.

    Example:
        >>> with atomic_path("out/model.onnx") as tmp:
        ...     save(tmp)
    """
    path = Path(path)
    with _faults_named(path, None, NOTHING_WRITTEN):
        kept = KEPT if path.exists() else NOTHING_WRITTEN
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _faults_named(path, tmp_path, kept):
            yield tmp_path
        with _faults_named(path, None, kept):
            os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path, what: str = "output folder", own: Collection[str] = (),
               key: str | None = None) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` whole, on error it is removed.

    Before anything is written, :func:`check_output_dir` refuses a folder this project did not write (``.``,
    a repository root, ``.git``, a folder with foreign files in it): ``own`` and ``key`` describe what the stage
    writes there. Temp folders of the same ``path`` left by killed processes are removed first
    (:func:`remove_stale_temps`). The folder gets the permissions of any new folder (``0o777`` less the umask).
    Filesystem faults are raised as in :func:`atomic_path`, naming ``path``.

    Args:
        path: the output folder.
        what: how messages name it (the params key, e.g. ``data.out_dir``).
        own: the top-level entries the stage writes (names or ``fnmatch`` patterns).
        key: an entry every earlier output of the stage holds (see :func:`check_output_dir`).
    """
    path = Path(path)
    check_output_dir(path, what, own, key)
    with _faults_named(path, None, NOTHING_WRITTEN):
        kept = KEPT if path.exists() else NOTHING_WRITTEN
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    try:
        with _faults_named(path, tmp, kept):
            yield tmp
        with _faults_named(path, None, kept):
            _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path``; an existing ``path`` goes to ``.{name}.old`` first and is removed last."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old")
    if old.is_symlink():
        old.unlink()
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    if old.is_symlink():  # ``path`` was a link to a folder: drop the link, never the folder it points to
        old.unlink()
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON via temp file + rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return Path(path)


def sha256_json(value: Any, *, compact: bool = True, length: int = 64) -> str:
    """Hex sha256 (first ``length`` digits) of ``value`` as key-sorted JSON; values JSON lacks are ``str``-ed.

    ``compact`` drops the spaces after ``,`` and ``:``. Callers keep the form their recorded hashes were made
    with: the recipe hash in ``model.json`` is compact; resume fingerprints, ``lpt compare`` cell keys and the
    pretraining digests are not.

    Example:
        >>> sha256_json({"b": 1, "a": [1, 2]}, length=12), sha256_json({"a": [1, 2], "b": 1}, compact=False, length=12)
        ('94a786c3662b', '3813f9409eb0')
    """
    separators = (",", ":") if compact else (", ", ": ")
    blob = json.dumps(value, sort_keys=True, separators=separators, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


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
