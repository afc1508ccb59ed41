"""``python -m pipelines.lock_check`` and ``python -m pipelines.restore`` on real DVC repos in tmp dirs.

A pipeline is run once and committed (git + dvc.lock); the check then runs in a fresh ``git clone``,
which, like CI, has no outputs and no DVC cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.lock_check import main, stale_stages
from pipelines.restore import main as restore_main

PY = sys.executable
_ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}
_GIT_USER = ("-c", "user.name=test", "-c", "user.email=test@example.com")

DVC_YAML = {
    "stages": {
        "ingest": {"cmd": "mkdir -p ${data.out_dir} && cp src/raw.txt ${data.out_dir}/raw.txt",
                   "deps": ["src/raw.txt", "code/ingest.py"], "params": ["data"], "outs": ["${data.out_dir}"]},
        "train": {"cmd": "mkdir -p models && cat ${data.out_dir}/raw.txt > models/w.txt",
                  "deps": ["${data.out_dir}", "code/train.py"], "params": ["train.lr", "train.epochs"],
                  "outs": ["models"]},
    }
}
PARAMS = {"data": {"out_dir": "data/shards", "n": 3}, "train": {"lr": 0.1, "epochs": 2}}


def _sh(*cmd: str, cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, env=_ENV, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def committed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repo whose pipeline ran once, dvc.lock committed."""
    root = tmp_path_factory.mktemp("lock") / "origin"
    root.mkdir()
    _sh("git", "init", "-q", cwd=root)
    _sh(PY, "-m", "dvc", "init", "-q", cwd=root)
    for path, text in {"src/raw.txt": "raw\n", "code/ingest.py": "# ingest\n", "code/train.py": "# train\n"}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    _sh(PY, "-m", "dvc", "repro", "-q", cwd=root)
    _sh("git", "add", "-A", cwd=root)
    _sh("git", *_GIT_USER, "commit", "-qm", "pipeline + lock", cwd=root)
    return root


@pytest.fixture
def clone(committed: Path, tmp_path: Path) -> Path:
    """A fresh clone: dvc.lock and sources, no outputs, no cache."""
    _sh("git", "clone", "-q", str(committed), str(tmp_path / "clone"), cwd=tmp_path)
    return tmp_path / "clone"


def test_fresh_clone_with_current_lock_passes(clone: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not (clone / "data/shards").exists()  # outputs missing: fine
    assert stale_stages(clone) == []
    assert main(["--repo", str(clone)]) == 0
    assert "dvc.lock matches" in capsys.readouterr().out


def test_changed_dep_or_param_fails_naming_stage_and_key(clone: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (clone / "code/train.py").write_text("# train, edited after the lock was made\n")
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["train"]["lr"] = 0.2
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--repo", str(clone)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["dvc.lock is out of date: stage 'train': changed deps: code/train.py (modified); "
                   "changed params: params.yaml:train.lr (modified)"]


def test_changed_section_param_deleted_source_and_unlocked_stage(clone: Path) -> None:
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["data"]["n"] = 4  # ingest reads the whole `data` section
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    (clone / "src/raw.txt").unlink()  # a source deleted, unlike a missing upstream output
    dvc_yaml = yaml.safe_load((clone / "dvc.yaml").read_text())
    dvc_yaml["stages"]["report"] = {"cmd": "cat models/w.txt > report.txt", "deps": ["models"], "outs": ["report.txt"]}
    (clone / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    lines = [s.line() for s in stale_stages(clone)]
    assert lines == ["stage 'ingest': changed deps: src/raw.txt (deleted); changed params: params.yaml:data (modified)",
                     "stage 'report': not in dvc.lock (run `dvc repro report` and commit dvc.lock)"]


def test_bad_repo_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--repo", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'dvc.yaml'}: not found (is repo_dir a DVC project root?)\n"


def test_restore_puts_locked_outputs_back(committed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sh("git", "clone", "-q", str(committed), str(tmp_path / "work"), cwd=tmp_path)
    work = tmp_path / "work"
    _sh(PY, "-m", "dvc", "cache", "dir", str(committed / ".dvc/cache"), cwd=work)  # share the origin's cache
    (work / "models").mkdir()
    (work / "models/w.txt").write_text("half-written by a failed run\n")
    assert restore_main(["--repo", str(work)]) == 0
    assert (work / "models/w.txt").read_text() == "raw\n" and (work / "data/shards/raw.txt").read_text() == "raw\n"
    assert "dvc checkout --force data/shards models" in capsys.readouterr().out
    assert restore_main(["--repo", str(work), "nope"]) == 2
    assert capsys.readouterr().err == "error: unknown stage(s) nope; dvc.yaml has: ingest, train\n"


def test_sweep_removes_what_killed_commands_left_beside_outputs(tmp_path: Path) -> None:
    """A dead process's temporary and a `.old` folder beside a stage output go; a live process's stays."""
    from lpt.utils import temp_prefix
    from pipelines.sweep import main as sweep_main
    from pipelines.sweep import sweep

    repo = tmp_path / "sweep"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {"cmd": "mkdir -p models/out", "outs": ["models/out"]}}}))
    (repo / "models").mkdir()
    dead = repo / "models" / (temp_prefix(repo / "models" / "out", pid=2**22 + 12345) + "abc.tmp")  # no such pid
    live = repo / "models" / (temp_prefix(repo / "models" / "out", pid=os.getpid()) + "def.tmp")
    old = repo / "models" / ".out.old"
    other = repo / "models" / ".notes.tmp"  # not of our pattern for an output: untouched
    for folder in (dead, live, old):
        folder.mkdir()
    other.write_text("keep")
    assert sorted(p.name for p in sweep(repo)) == sorted([dead.name, old.name])
    assert live.is_dir() and other.is_file() and not dead.exists() and not old.exists()
    assert sweep_main(["--repo", str(repo)]) == 0


def test_sweep_repairs_a_dvc_rwlock_file_a_kill_left_corrupted(tmp_path: Path) -> None:
    """A SIGKILL while DVC rewrites .dvc/tmp/rwlock leaves it empty and every dvc command fails; the sweep removes
    it (no DVC process holds the repo), and dvc works again."""
    from pipelines.sweep import sweep

    repo = tmp_path / "rw"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {"cmd": "mkdir -p out", "outs": ["out"]}}}))
    rwlock = repo / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    rwlock.write_text("")  # what the kill leaves
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    broken = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, capture_output=True, text=True, env=env)
    assert broken.returncode != 0 and "RWLock" in broken.stdout + broken.stderr
    assert rwlock in sweep(repo) and not rwlock.exists()
    fixed = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, capture_output=True, text=True, env=env)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    rwlock.write_text('{"read": {}, "write": {}}')  # a valid one is never touched
    assert rwlock not in sweep(repo) and rwlock.exists()


def test_a_zombie_counts_as_dead_for_the_temporaries_it_left() -> None:
    """A killed writer whose parent died is a zombie until init reaps it: its temporaries are stale already."""
    import time

    from lpt.utils import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][:1] != "Z":
        time.sleep(0.05)  # exited, not reaped (no wait() yet): a zombie
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())
    child.wait()
