"""Launch an ``lpt`` command on N processes: ``python -m pipelines.launch --nproc N -- lpt train --phase 1``.

* ``N == 1``: the command replaces this process (``os.execvp``): no overhead, signals (Ctrl-C, DVC
  stopping a stage) reach it directly, its exit code is the stage's.
* ``N > 1``: ``python -m torch.distributed.run --standalone --nproc_per_node=N -m lpt ARGS`` as a
  subprocess (this interpreter; the command must start with ``lpt``). torchrun sets ``RANK``,
  ``WORLD_SIZE`` and ``LOCAL_RANK``, which the training code reads. torchrun itself exits 1 whatever its
  workers exited with, so the root-cause worker's exit code is read from torchrun's failure report and
  returned when it is a verdict (``lpt.exitcodes.DETERMINISTIC``, e.g. 2 for bad params): the flow must
  not retry those. SIGTERM is passed on to torchrun, which stops its workers.

In ``dvc.yaml`` (``train.nproc`` from params.yaml)::

    cmd: python -m pipelines.launch --nproc ${train.nproc} -- lpt train --phase 1

This module never imports torch: torchrun runs in its own interpreter.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence

from lpt.exitcodes import BAD_PARAMS, DETERMINISTIC

__all__ = ["build_command", "launch", "main", "worker_exit_code"]

_USAGE = "python -m pipelines.launch --nproc N -- lpt COMMAND [ARGS...]"
# torchrun's ChildFailedError report (torch.distributed.elastic.multiprocessing.errors):
#   Root Cause (first observed failure):
#   [0]:
#     ...
#     exitcode  : 4 (pid: 5787)
_ROOT_CAUSE = "Root Cause (first observed failure)"
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(?P<code>-?\d+)")


def build_command(nproc: int, command: Sequence[str]) -> list[str]:
    """The command line to run ``command`` on ``nproc`` processes.

    Args:
        nproc: processes (>= 1).
        command: the ``lpt`` command and its arguments, e.g. ``["lpt", "train", "--phase", "1"]``.

    Returns:
        ``command`` unchanged for ``nproc == 1``; otherwise the torchrun command running ``-m lpt`` with the
        arguments after ``lpt``.

    Raises:
        ValueError: ``nproc < 1``, an empty command, or ``nproc > 1`` with a command that is not ``lpt ...``.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if not command:
        raise ValueError(f"no command to launch; usage: {_USAGE}")
    if nproc == 1:
        return list(command)
    if os.path.basename(command[0]) != "lpt":
        raise ValueError(f"--nproc {nproc} runs `lpt` commands under torchrun; got {command[0]!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lpt", *command[1:]]


def worker_exit_code(report_lines: Sequence[str]) -> int | None:
    """The root-cause worker's exit code in torchrun's failure report, or ``None`` if there is none."""
    in_root_cause = False
    for line in report_lines:
        in_root_cause = in_root_cause or _ROOT_CAUSE in line
        match = _EXITCODE.match(line) if in_root_cause else None
        if match:
            return int(match.group("code"))
    return None


def _run_torchrun(cmd: list[str]) -> int:
    """Run torchrun, its stderr passed through line by line (and kept to read its failure report)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1, errors="replace")
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    # Ctrl-C reaches torchrun through the process group; it stops its workers and reports
    previous_int = signal.signal(signal.SIGINT, lambda _signum, _frame: None)
    stderr: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            stderr.append(line)
        returncode = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    if returncode != 0:
        worker = worker_exit_code(stderr)
        if worker in DETERMINISTIC:
            return worker
    return returncode


def launch(nproc: int, command: Sequence[str]) -> int:
    """Run ``command`` on ``nproc`` processes (see the module docstring).

    Args:
        nproc: processes; 1 replaces this process with ``command`` and never returns.
        command: the ``lpt`` command and its arguments.

    Returns:
        The exit code (``nproc > 1``): torchrun's, or the root-cause worker's when that is a verdict.

    Raises:
        ValueError: as :func:`build_command`.
    """
    cmd = build_command(nproc, command)
    if nproc == 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(cmd[0], cmd)  # no return
    print(f"[launch] {nproc} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return _run_torchrun(cmd)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors raise (so ``main`` prints one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"{message}; usage: {_USAGE}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.launch --nproc N -- lpt COMMAND [ARGS...]``.

    Returns:
        The launched command's exit code (``--nproc 1`` never returns: the command replaces this process);
        2 for bad usage, 127 when the command is not found, each with one error line.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--") if "--" in args else len(args)
    ap = _Parser(prog="python -m pipelines.launch", usage=_USAGE,
                 description="Launch an lpt command on N processes (N > 1: under torchrun).")
    ap.add_argument("--nproc", type=int, required=True, help="processes (1: run the command as is)")
    try:
        opts = ap.parse_args(args[:split])
        return launch(opts.nproc, args[split + 1:])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_PARAMS
    except OSError as err:  # execvp: no such command, not executable
        print(f"error: cannot run {args[split + 1]!r}: {err.strerror}", file=sys.stderr)
        return 127 if isinstance(err, FileNotFoundError) else 126


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
