"""``python -m pipelines.dvc_repro STAGE [--force] --outcome FILE``: one ``dvc repro --single-item`` through DVC's
``Repo.reproduce`` API, its outcome written as JSON.

Run as a subprocess by :func:`pipelines.dvc_stages.run_dvc_stage` (its own process group, so a cancelled
flow can stop it and the stage command). The stage command's output and DVC's log lines stream to stdout as
with ``dvc repro``; what happened is read from DVC's return value and exception types, never from its
messages:

- ``reproduced``: ``Repo.reproduce`` returned the stage (its command ran, or DVC restored it from the run
  cache); ``false`` when DVC found it up to date (or frozen) and skipped it;
- ``error``: ``null``, or ``{"kind", "message"}`` with ``kind`` ``lock`` (another DVC process holds the repo
  lock: DVC did not start), ``command`` (the stage command ran and exited non-zero) or ``dvc`` (DVC failed
  otherwise: a missing dependency, a bad ``dvc.yaml``, before running the command).

With ``--parent PID`` (what :func:`~pipelines.dvc_stages.run_dvc_stage` passes: the process that started it),
it ends with its parent: when the flow run's process is killed (its serving process SIGKILLed, the machine's
OOM killer), this process and the stage command are SIGKILLed as one process group instead of running on as
orphans that hold DVC's repo lock (``bench.faults`` found them; Linux only: elsewhere they run to their end).

Exit status 0 on success, 255 on an error (what ``dvc repro`` exits with).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["reproduce_stage", "end_with_parent", "main"]

FAILED = 255
"""The exit status of a failed reproduction (``dvc repro``'s)."""


def _one_line(err: BaseException) -> str:
    """The exception and its causes, one line (what ``dvc repro`` prints after ``ERROR:``)."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = " ".join(str(err).split())
        if text:
            parts.append(text)
        err = err.__cause__  # type: ignore[assignment]
    return ": ".join(parts)


def reproduce_stage(repo_dir: str | Path, stage: str, force: bool = False) -> dict[str, Any]:
    """Reproduce one stage (``single_item``) through ``dvc.repo.Repo.reproduce``; the outcome as data.

    Args:
        repo_dir: the DVC repository root.
        stage: the stage's address (as ``dvc repro`` takes it).
        force: run it even when DVC finds it up to date.

    Returns:
        ``{"reproduced": bool, "frozen": bool, "error": None | {"kind": "lock" | "command" | "dvc", "message": str}}``.
    """
    from dvc.exceptions import DvcException
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageCmdFailedError

    frozen = False
    try:
        with Repo(str(repo_dir)) as repo:
            frozen = any(s.frozen for s in repo.stage.collect(stage))
            done = repo.reproduce(targets=[stage], single_item=True, force=force)
    except LockError as err:
        return {"reproduced": False, "frozen": frozen, "error": {"kind": "lock", "message": _one_line(err)}}
    except DvcException as err:
        kind = "command" if isinstance(err.__cause__, StageCmdFailedError) else "dvc"
        return {"reproduced": False, "frozen": frozen, "error": {"kind": kind, "message": _one_line(err)}}
    return {"reproduced": bool(done), "frozen": frozen, "error": None}


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_PARENT_GONE = signal.SIGUSR1
"""The signal the kernel sends this process when the thread that started it ends (``PR_SET_PDEATHSIG``)."""


def _end_group(*_: Any) -> None:
    """SIGKILL this process's whole group: itself and the stage command DVC started (it leads the group)."""
    os.killpg(os.getpgid(0), signal.SIGKILL)


def end_with_parent(parent: int) -> bool:
    """Have the kernel end this process group when ``parent`` dies (Linux ``prctl(PR_SET_PDEATHSIG)``).

    Args:
        parent: the PID that started this process; if it is already gone, the group ends at once.

    Returns:
        True when armed; False where ``prctl`` is missing (not Linux): the process then outlives its parent.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        signal.signal(_PARENT_GONE, _end_group)
        if libc.prctl(_PR_SET_PDEATHSIG, int(_PARENT_GONE), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError, ValueError):
        return False
    if os.getppid() != parent:  # it died before the prctl: nobody is left to tell us
        _end_group()
    return True


def main(argv: list[str] | None = None) -> int:
    """Parse, reproduce, write the outcome file; print DVC's error line as ``dvc repro`` would."""
    ap = argparse.ArgumentParser(prog="python -m pipelines.dvc_repro", description=__doc__.splitlines()[0])
    ap.add_argument("stage")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--outcome", required=True, type=Path, help="where to write the outcome JSON")
    ap.add_argument("--parent", type=int, default=None, help="end (with the stage command) when this PID ends")
    args = ap.parse_args(argv)
    if args.parent is not None:
        end_with_parent(args.parent)
    from dvc.logger import setup

    setup()  # DVC's own log lines ("Running stage ...", "> cmd") on stdout/stderr, as the CLI prints them
    outcome = reproduce_stage(Path.cwd(), args.stage, force=args.force)
    tmp = args.outcome.with_name(f".{args.outcome.name}.tmp")
    tmp.write_text(json.dumps(outcome))
    os.replace(tmp, args.outcome)
    if outcome["error"]:
        print(f"ERROR: {outcome['error']['message']}", file=sys.stderr, flush=True)
        return FAILED
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
