"""A command's outcome as data: where a caller asks for it, a command writes its verdict to a JSON file.

A caller that runs ``lpt`` commands through another program (the Prefect flow runs them through ``dvc
repro``) sets ``LPT_VERDICT_FILE`` to a path; the command writes there that it started, then its exit code
(:mod:`lpt.exitcodes`) and whether the failure looked transient (an I/O hiccup by ``errno``, never a
verdict). The caller reads numbers, not the messages of the program in between. Without the variable
nothing is written.

Example:
    >>> import json, os, tempfile
    >>> os.environ[VERDICT_ENV] = path = os.path.join(tempfile.mkdtemp(), "verdict.json")
    >>> with recorded("demo"):
    ...     pass
    >>> {k: v for k, v in json.loads(open(path).read()).items() if k != "pid"}
    {'command': 'demo', 'started': True, 'exit_code': 0, 'transient': False}
    >>> del os.environ[VERDICT_ENV]
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["VERDICT_ENV", "TRANSIENT_ERRNOS", "is_transient_error", "record", "recorded", "read_verdict"]

VERDICT_ENV = "LPT_VERDICT_FILE"
"""The environment variable naming the verdict file."""

TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EAGAIN, errno.ESTALE, errno.EMFILE, errno.ENFILE, errno.EBUSY,
                              errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.EINTR})
"""Filesystem or network faults worth one more try (a flaky disk, a busy file, too many open files). A full
disk, a permission or a missing file is not: the next try would fail the same way."""


def is_transient_error(err: BaseException) -> bool:
    """True for an ``OSError`` whose ``errno`` is in :data:`TRANSIENT_ERRNOS` (or for a connection/timeout error).

    Example:
        >>> is_transient_error(OSError(errno.EIO, "Input/output error")), is_transient_error(OSError(errno.ENOSPC, "x"))
        (True, False)
    """
    if isinstance(err, (ConnectionError, TimeoutError, BlockingIOError)):
        return True
    return isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS


def record(*, fresh: bool = False, **fields: Any) -> None:
    """Merge ``fields`` into the verdict file named by :data:`VERDICT_ENV` (atomic rename); nothing when unset.

    Args:
        fresh: replace the file's fields instead of merging (a command starting).
        fields: what to record.

    Never raises: a verdict that cannot be written must not change the command's own outcome.
    """
    target = os.environ.get(VERDICT_ENV)
    if not target:
        return
    path = Path(target)
    with contextlib.suppress(OSError, ValueError, TypeError):
        current = {} if fresh else read_verdict(path) or {}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**current, **fields}, default=str))
        os.replace(tmp, path)


def read_verdict(path: str | Path) -> dict[str, Any] | None:
    """The verdict file's fields, or ``None`` when there is none (the command never started, or wrote nothing)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _exit_code(code: Any) -> int:
    """``SystemExit.code`` as a process exit status (``None`` → 0, a message → 1)."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


@contextlib.contextmanager
def recorded(command: str) -> Iterator[None]:
    """Record that ``command`` started, then its exit code and whether a failure looked transient.

    A ``SystemExit`` gives its code; any other exception exit code 1, transient when
    :func:`is_transient_error` says so (or when :func:`record` was told ``transient=True`` on the way, e.g. by
    a handler that turned the exception into an exit code).
    """
    record(fresh=True, command=command, pid=os.getpid(), started=True)
    code, transient = 1, None
    try:
        yield
        code = 0
    except SystemExit as err:
        code = _exit_code(err.code)
        raise
    except BaseException as err:
        transient = is_transient_error(err)
        raise
    finally:
        fields: dict[str, Any] = {"exit_code": code}
        target = os.environ.get(VERDICT_ENV)
        earlier = read_verdict(target) if target else None
        fields["transient"] = bool(transient if transient is not None else (earlier or {}).get("transient", False))
        if code == 0:
            fields["transient"] = False
        record(**fields)
