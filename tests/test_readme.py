"""Every command in the README's shell blocks is valid as written: the block parses as bash, and each
command's program and subcommand exist (``--help`` of the ``lpt`` / ``dvc`` / ``prefect`` / ``python -m``
command, ``make -n`` for make targets). ``tests/test_readme_run.py`` (slow) runs every block for real.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
BIN = Path(sys.executable).parent


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    out = []
    for block in _blocks():
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                out.append(line)
    return out


def test_readme_has_shell_blocks() -> None:
    assert len(_blocks()) >= 5 and any(c.startswith("dvc exp run --queue") for c in _commands())


@pytest.mark.parametrize("block", _blocks(), ids=lambda b: b.splitlines()[0][:40])
def test_block_is_valid_bash(block: str) -> None:
    result = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _help_command(tokens: list[str]) -> list[str] | None:
    """The ``--help`` (or dry-run) form that proves ``tokens``' program and subcommand exist."""
    prog, rest = tokens[0], tokens[1:]
    words = [t for t in rest if not t.startswith("-") and "=" not in t and "$(" not in t]
    if prog in ("lpt", "lpt-serve", "dvc", "prefect"):
        depth = {"lpt": 2 if words[:1] == ["params"] else 1, "lpt-serve": 0, "dvc": 2 if words[:1] in
                 (["exp"], ["queue"], ["metrics"], ["plots"]) else 1, "prefect": 2}[prog]
        return [str(BIN / prog), *words[:depth], "--help"]
    if prog == "python" and rest[:1] == ["-m"]:
        if rest[1] == "pip":
            return [sys.executable, "-m", "pip", rest[2], "--help"]
        return [sys.executable, "-m", rest[1], "--help"]
    if prog == "make":
        return ["make", "-n", *rest]
    if prog in ("while", "for", "if"):
        return ["true"]  # shell syntax: the bash -n check covers it (tests/test_readme_run.py runs it)
    if prog == "node":  # the script parses (node --check); without Node.js (its tests skip) the script exists
        return ["bash", "-c", f"if command -v node >/dev/null; then node --check {shlex.quote(rest[0])}; "
                              f"else test -f {shlex.quote(rest[0])}; fi"]
    if prog in ("mkdir", "cp", "git"):
        return ["bash", "-c", f"command -v {prog}"]
    return None  # shell builtins (source, export) and plain programs: the bash -n check covers them


@pytest.mark.parametrize("command", _commands())
def test_command_exists_as_written(command: str) -> None:
    tokens = shlex.split(command)
    if tokens[0] in ("source", "export", "cd"):
        return
    check = _help_command(tokens)
    assert check is not None, f"no check for {command!r}: extend _help_command"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(REPO_ROOT / ".prefect")}
    result = subprocess.run(check, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command!r}: `{' '.join(check)}` failed:\n{result.stdout}{result.stderr}"
