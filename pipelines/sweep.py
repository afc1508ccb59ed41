"""Remove what killed stage commands left beside the outputs: ``python -m pipelines.sweep [--repo DIR]``.

A stage command killed while writing (SIGKILL, a power cut) leaves its temporary folder
(``.NAME.HOST-PID.RANDOM.tmp``, :func:`lpt.utils.temp_prefix`) or a ``.NAME.old`` beside the output. The
stage's own next run removes them first; but when DVC brings the output back from its run cache, the command
never runs, and the temporary would stay. ``make repro`` and the flow ``lpt`` call this after ``dvc repro``:
it removes, beside every output of every stage, temporaries whose process is dead and ``.NAME.old`` folders,
and DVC's own ``.dvc/tmp/rwlock`` when a killed ``dvc`` left it corrupted (:func:`repair_rwlock`).
Only names of our own patterns are touched (``bench.faults`` measures it).

Exit status 0; 2 (one line) for a bad repo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from lpt.utils import remove_stale_temps
from pipelines.dvc_stages import DvcYamlError, read_stages

__all__ = ["sweep", "main"]


def repair_rwlock(repo_dir: str | Path) -> Path | None:
    """Remove DVC's ``.dvc/tmp/rwlock`` when a kill left it corrupted (empty or not JSON) and no DVC process holds
    the repository; DVC writes a fresh one. Returns the path removed, or None.

    DVC rewrites that file in place; a SIGKILL of ``dvc`` at that moment leaves it empty, and every later
    ``dvc`` command then fails ("Unable to read RWLock-file ... JSON structure is corrupted") until it is
    removed (``bench.faults`` hit it).
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    root = Path(repo_dir).resolve()
    path = root / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(path.read_text())
        return None  # missing (FileNotFoundError is an OSError) or valid
    except OSError:
        return None
    except ValueError:
        pass
    try:
        with Repo(str(root)) as repo, repo.lock:  # DVC's own repo lock: no other dvc command is running
            path.unlink(missing_ok=True)
    except DvcException:  # LockError: a dvc command runs; it is not ours to touch
        return None
    return path


def sweep(repo_dir: str | Path) -> list[Path]:
    """Remove dead processes' temporaries and ``.old`` folders beside each stage output, and a corrupted DVC
    rwlock file (:func:`repair_rwlock`); the paths removed."""
    root = Path(repo_dir).resolve()
    removed: list[Path] = []
    rwlock = repair_rwlock(root)
    if rwlock is not None:
        removed.append(rwlock)
    for stage in read_stages(root):
        for out in stage.outs:
            path = root / out
            removed += remove_stale_temps(path)
            old = path.with_name(f".{path.name}.old")  # lpt.utils._swap_in's, left by a kill mid-swap
            if old.exists() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
                removed.append(old)
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=".", help="the DVC project root")
    args = ap.parse_args(argv)
    try:
        removed = sweep(args.repo)
    except DvcYamlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in removed:
        print(f"removed {path} (left by a killed stage command)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
