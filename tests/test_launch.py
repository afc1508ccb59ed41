"""``python -m pipelines.launch --nproc N -- lpt ...``: the command it builds, the exec path for N == 1,
usage errors, and reading a worker's exit code out of torchrun's failure report."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.launch import build_command, worker_exit_code

PY = sys.executable

# torchrun's report when both workers exited 4 (torch 2.14.1, shortened)
TORCHRUN_REPORT = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
lpt FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 5788)
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-03_09:36:08
  rank      : 0 (local_rank: 0)
  exitcode  : 4 (pid: 5787)
  error_file: <N/A>
============================================================
""".splitlines()


def test_commands_it_builds() -> None:
    assert build_command(1, ["lpt", "train", "--phase", "1"]) == ["lpt", "train", "--phase", "1"]
    assert build_command(4, ["lpt", "train", "--phase", "2", "-S", "train.device=cuda"]) == [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
        "-m", "lpt", "train", "--phase", "2", "-S", "train.device=cuda"]
    assert build_command(2, ["/opt/venv/bin/lpt", "train"])[-2:] == ["lpt", "train"]
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        build_command(0, ["lpt"])
    with pytest.raises(ValueError, match="runs `lpt` commands under torchrun; got 'python'"):
        build_command(2, ["python", "train.py"])


def test_single_process_execs_the_command_unchanged() -> None:
    """N == 1 replaces the launcher: same PID, same exit code, output straight through."""
    code = "import os, sys; print(os.getpid()); sys.exit(7)"
    proc = subprocess.Popen([PY, "-m", "pipelines.launch", "--nproc", "1", "--", PY, "-c", code],
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 7
    assert int(out.strip()) == proc.pid


@pytest.mark.parametrize("args, message", [
    ([], "the following arguments are required: --nproc"),
    (["--nproc", "x", "--", "lpt"], "argument --nproc: invalid int value: 'x'"),
    (["--nproc", "2"], "no command to launch"),
    (["--nproc", "2", "--", "python", "x.py"], "runs `lpt` commands under torchrun"),
])
def test_usage_errors_are_one_line_exit_2(args: list[str], message: str) -> None:
    run = subprocess.run([PY, "-m", "pipelines.launch", *args], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("error: ") and message in run.stderr and run.stderr.count("\n") == 1


def test_worker_exit_code_is_the_root_cause() -> None:
    assert worker_exit_code(TORCHRUN_REPORT) == 4
    assert worker_exit_code(["exitcode  : 3 (pid: 1)"]) is None  # not in a root-cause block
    assert worker_exit_code([]) is None


@pytest.mark.slow
def test_two_processes_keep_the_workers_verdict(tmp_path) -> None:
    """Real torchrun: both workers refuse a bad override (exit 2); torchrun exits 1, the launcher 2."""
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\n")
    run = subprocess.run([PY, "-m", "pipelines.launch", "--nproc", "2", "--", "lpt", "params", "check", str(params),
                          "--set", "nope.key=1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2 -m lpt params check" in run.stderr
