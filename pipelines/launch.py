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

Several machines (``--nnodes M``, or ``LPT_NNODES`` etc. in the environment so ``dvc.yaml``'s command stays
the same): every node runs the same launcher with its ``--node-rank`` and the address of node 0;
torchrun's *static* rendezvous then gives global ranks ``node_rank * N + local_rank``, so rank 0 (which
writes checkpoints and the stage's outputs) is always on node 0, the machine running ``dvc repro``::

    # node 0 (runs the pipeline)            # node 1 (same checkout, data pulled from the DVC remote)
    LPT_NNODES=2 LPT_NODE_RANK=0 \           LPT_NNODES=2 LPT_NODE_RANK=1 LPT_MASTER_ADDR=node0 \
    LPT_MASTER_ADDR=node0 dvc repro phase1    python -m pipelines.launch --nproc 1 -- lpt train --phase 1

(A ``c10d`` rendezvous would assign ranks in the order nodes join, so rank 0 could land on a machine
that is not running DVC; it is not used.) ``train.nproc`` stays the processes per node.

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
from dataclasses import dataclass

from lpt.exitcodes import BAD_PARAMS, DETERMINISTIC

__all__ = ["Nodes", "nodes_from_env", "build_command", "launch", "main", "worker_exit_code"]

_USAGE = ("python -m pipelines.launch --nproc N [--nnodes M --node-rank R --master-addr HOST [--master-port P]] "
          "-- lpt COMMAND [ARGS...]")
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Nodes:
    """Where this launcher sits in a multi-node launch (one node: the defaults).

    Attributes:
        nnodes: machines taking part, each running this launcher with the same ``--nproc``.
        node_rank: this machine's index, 0 for the one running ``dvc repro`` (it holds global rank 0).
        master_addr: address of node 0, reachable from every node.
        master_port: a free TCP port on node 0 for the rendezvous.
    """

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = DEFAULT_PORT

    def check(self) -> None:
        """Raises ValueError (one line naming the flag and its environment variable) on an impossible setup."""
        if self.nnodes < 1:
            raise ValueError(f"--nnodes (LPT_NNODES) must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank (LPT_NODE_RANK) must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.master_addr:
            raise ValueError(f"--nnodes {self.nnodes} needs --master-addr (LPT_MASTER_ADDR): the address of node 0")
        if not 0 < self.master_port < 65536:
            raise ValueError(f"--master-port (LPT_MASTER_PORT) must be a TCP port, got {self.master_port}")


def nodes_from_env(env: dict[str, str] | None = None) -> Nodes:
    """Multi-node settings from ``LPT_NNODES``, ``LPT_NODE_RANK``, ``LPT_MASTER_ADDR``, ``LPT_MASTER_PORT``
    (what a machine exports so ``dvc repro`` runs its training stages across nodes without editing dvc.yaml).

    Raises:
        ValueError: a variable that is not an integer where one is needed.
    """
    env = os.environ if env is None else env
    values = {}
    for key, name in (("nnodes", "LPT_NNODES"), ("node_rank", "LPT_NODE_RANK"), ("master_port", "LPT_MASTER_PORT")):
        if env.get(name, "").strip():
            try:
                values[key] = int(env[name])
            except ValueError:
                raise ValueError(f"{name}={env[name]!r} is not an integer") from None
    if env.get("LPT_MASTER_ADDR", "").strip():
        values["master_addr"] = env["LPT_MASTER_ADDR"].strip()
    return Nodes(**values)
# torchrun's ChildFailedError report (torch.distributed.elastic.multiprocessing.errors):
#   Root Cause (first observed failure):
#   [0]:
#     ...
#     exitcode  : 4 (pid: 5787)
_ROOT_CAUSE = "Root Cause (first observed failure)"
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(?P<code>-?\d+)")


def build_command(nproc: int, command: Sequence[str], nodes: Nodes | None = None) -> list[str]:
    """The command line to run ``command`` on ``nproc`` processes (on each of ``nodes.nnodes`` machines).

    Args:
        nproc: processes on this machine (>= 1).
        command: the ``lpt`` command and its arguments, e.g. ``["lpt", "train", "--phase", "1"]``.
        nodes: the multi-node setup (default: this machine alone).

    Returns:
        ``command`` unchanged for one process on one node; otherwise the torchrun command running ``-m lpt``
        with the arguments after ``lpt``: ``--standalone`` on one node, a static rendezvous at
        ``master_addr:master_port`` with this ``--node_rank`` on several.

    Raises:
        ValueError: ``nproc < 1``, an empty command, an impossible node setup (:meth:`Nodes.check`), or
            several processes with a command that is not ``lpt ...``.
    """
    nodes = nodes or Nodes()
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    nodes.check()
    if not command:
        raise ValueError(f"no command to launch; usage: {_USAGE}")
    if nproc == 1 and nodes.nnodes == 1:
        return list(command)
    if os.path.basename(command[0]) != "lpt":
        what = f"--nproc {nproc}" if nodes.nnodes == 1 else f"--nnodes {nodes.nnodes}"
        raise ValueError(f"{what} runs `lpt` commands under torchrun; got {command[0]!r}")
    if nodes.nnodes == 1:
        where = ["--standalone"]
    else:  # static rendezvous: global rank = node_rank * nproc + local_rank, so rank 0 is on node 0
        where = [f"--nnodes={nodes.nnodes}", f"--node_rank={nodes.node_rank}", f"--master_addr={nodes.master_addr}",
                 f"--master_port={nodes.master_port}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}",
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


def launch(nproc: int, command: Sequence[str], nodes: Nodes | None = None) -> int:
    """Run ``command`` on ``nproc`` processes per node (see the module docstring).

    Args:
        nproc: processes on this machine; 1 on a single node replaces this process with ``command`` and
            never returns.
        command: the ``lpt`` command and its arguments.
        nodes: the multi-node setup (default: this machine alone).

    Returns:
        The exit code (under torchrun): torchrun's, or the root-cause worker's when that is a verdict.

    Raises:
        ValueError: as :func:`build_command`.
    """
    nodes = nodes or Nodes()
    cmd = build_command(nproc, command, nodes)
    if nproc == 1 and nodes.nnodes == 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(cmd[0], cmd)  # no return
    where = "" if nodes.nnodes == 1 else f" on node {nodes.node_rank} of {nodes.nnodes}"
    print(f"[launch] {nproc} processes{where}: {' '.join(cmd)}", file=sys.stderr, flush=True)
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
    ap.add_argument("--nproc", type=int, required=True, help="processes on this machine (1 on one node: run the "
                    "command as is)")
    ap.add_argument("--nnodes", type=int, default=None, help="machines in the launch (default LPT_NNODES or 1)")
    ap.add_argument("--node-rank", type=int, default=None, help="this machine's index, 0 = the one running DVC "
                    "(default LPT_NODE_RANK or 0)")
    ap.add_argument("--master-addr", default=None, help="address of node 0 (default LPT_MASTER_ADDR)")
    ap.add_argument("--master-port", type=int, default=None,
                    help=f"rendezvous port on node 0 (default LPT_MASTER_PORT or {DEFAULT_PORT})")
    try:
        opts = ap.parse_args(args[:split])
        env = nodes_from_env()
        nodes = Nodes(nnodes=env.nnodes if opts.nnodes is None else opts.nnodes,
                      node_rank=env.node_rank if opts.node_rank is None else opts.node_rank,
                      master_addr=env.master_addr if opts.master_addr is None else opts.master_addr,
                      master_port=env.master_port if opts.master_port is None else opts.master_port)
        return launch(opts.nproc, args[split + 1:], nodes)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_PARAMS
    except OSError as err:  # execvp: no such command, not executable
        print(f"error: cannot run {args[split + 1]!r}: {err.strerror}", file=sys.stderr)
        return 127 if isinstance(err, FileNotFoundError) else 126


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
