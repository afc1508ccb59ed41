"""Every shell block of the README, run as written, in order, in a fresh clone (slow: ~30 min on 2 cores).

``tests/test_readme.py`` (fast) checks that each block parses and that each command exists; this runs
them. The clone is ``git clone`` of the committed ``HEAD``, using this checkout's ``.venv`` (its code is
the clone's: ``PYTHONPATH`` points at the clone). A block is skipped only when the README marks it, on
the line before it, with ``<!-- readme-test: skip (reason) -->`` (a server or a GPU); a block marked
``<!-- readme-test: fresh venv -->`` runs with a new, empty virtual environment first on ``PATH`` (the
consumer install). ``make test`` inside a block is run as ``make -n test``: it is this test suite (CI runs
it itself). Blocks that need Fashion-MNIST skip when the Debian package is absent.

Run it: ``python -m pytest -m slow tests/test_readme_run.py -s`` (prints each block's verdict and time).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

FASHION = Path("/usr/share/datasets/fashion-mnist")
MARK = re.compile(r"<!-- readme-test: (skip \((?P<reason>.+?)\)|(?P<venv>fresh venv)) -->")


@dataclass
class Block:
    """One ```bash block of the README, with its marker (if any) and the line it starts on."""

    text: str
    line: int
    skip: str | None = None
    fresh_venv: bool = False


def readme_blocks(readme: Path = REPO_ROOT / "README.md") -> list[Block]:
    """The README's bash blocks in order, each with the marker on the line before it."""
    lines = readme.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            end = lines.index("```", i + 1)
            mark = MARK.search(lines[i - 1]) if i else None
            blocks.append(Block("\n".join(lines[i + 1:end]) + "\n", i + 1,
                                skip=mark.group("reason") if mark and mark.group("reason") else None,
                                fresh_venv=bool(mark and mark.group("venv"))))
            i = end
        i += 1
    return blocks


def test_markers_are_read() -> None:
    blocks = readme_blocks()
    assert [b.skip for b in blocks if b.skip] and all("server" in b.skip or "GPU" in b.skip for b in blocks if b.skip)
    assert sum(b.fresh_venv for b in blocks) == 1


def _clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(REPO_ROOT / ".venv")
    installed = (REPO_ROOT / ".venv" / ".installed").stat().st_mtime
    os.utime(clone / "pyproject.toml", (installed - 60, installed - 60))  # make's install target: up to date
    return clone


@pytest.mark.slow
def test_every_readme_block_runs_as_written_in_a_fresh_clone(tmp_path: Path) -> None:
    clone = _clone(tmp_path)
    venv_bin = REPO_ROOT / ".venv" / "bin"
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(clone),
           "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(tmp_path / "prefect"),
           "VIRTUAL_ENV": str(REPO_ROOT / ".venv")}
    verdicts = []
    for block in readme_blocks(clone / "README.md"):
        if block.skip:
            verdicts.append(f"README.md:{block.line}: skipped ({block.skip})")
            continue
        if "fashion_mnist" in block.text and not FASHION.is_dir():
            verdicts.append(f"README.md:{block.line}: skipped (needs the Debian package dataset-fashion-mnist)")
            continue
        script = re.sub(r"^make test\b", "make -n test", block.text, flags=re.M)
        block_env = dict(env)
        if block.fresh_venv:
            consumer = tmp_path / f"venv-{block.line}"
            subprocess.run([sys.executable, "-m", "venv", str(consumer)], check=True)
            block_env["PATH"] = f"{consumer / 'bin'}{os.pathsep}{env['PATH']}"
            block_env.pop("PYTHONPATH")
            block_env["VIRTUAL_ENV"] = str(consumer)
        started = time.perf_counter()
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=clone, env=block_env,
                                capture_output=True, text=True, timeout=3600)
        seconds = time.perf_counter() - started
        assert result.returncode == 0, (f"README.md:{block.line}: exit {result.returncode}\n{script}\n"
                                        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        verdicts.append(f"README.md:{block.line}: ran in {seconds:.0f} s")
    print("\n".join(verdicts))
    ran = sum("ran in" in v for v in verdicts)
    assert ran >= len(verdicts) - 2, verdicts
