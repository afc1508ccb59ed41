"""Put back the outputs ``dvc.lock`` names after a failed or killed ``dvc repro``:
``python -m pipelines.restore [--repo DIR] [STAGE ...]``.

``dvc repro`` removes a stage's outputs before running its command. When the command fails or the run
is killed, the previous outputs are still in DVC's cache and ``dvc.lock`` still names them: this runs
``dvc checkout --force`` on the restorable outputs (:attr:`pipelines.dvc_stages.DvcStage.restorable`:
locked, cached, not ``persist: true``) of the given stages, or of every stage. Outputs that already
match the lock are left as they are; ``persist: true`` outputs (a training run's resume state) are never
touched. ``make repro`` calls it when ``dvc repro`` fails, then exits with ``dvc repro``'s status.

Exit status: DVC's (0 when everything named is back), 2 (one line) for a bad repo or an unknown stage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipelines.dvc_stages import DvcYamlError, checkout_outputs, read_stages

__all__ = ["restore_targets", "main"]


def restore_targets(repo_dir: str | Path, stages: Sequence[str] = ()) -> list[str]:
    """The outputs to check out for ``stages`` (default: every stage), in stage order.

    Args:
        repo_dir: the DVC repository root.
        stages: stage names; empty means all.

    Raises:
        DvcYamlError: a bad repo, or a name that is not a stage (the message names the stages).
    """
    known = read_stages(repo_dir)
    unknown = [name for name in stages if name not in {s.name for s in known}]
    if unknown:
        raise DvcYamlError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has: {', '.join(s.name for s in known)}")
    return [out for s in known if not stages or s.name in stages for out in s.restorable]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.restore [--repo DIR] [STAGE ...]``."""
    ap = argparse.ArgumentParser(prog="python -m pipelines.restore", description="dvc checkout --force the "
                                 "outputs dvc.lock names (persist outputs excluded).")
    ap.add_argument("stages", nargs="*", help="stage names (default: every stage)")
    ap.add_argument("--repo", type=Path, default=Path("."), help="DVC repository root (default: .)")
    args = ap.parse_args(argv)
    try:
        targets = restore_targets(args.repo, args.stages)
    except DvcYamlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not targets:
        print("nothing to restore: no stage has cached, non-persistent outputs in dvc.lock")
        return 0
    print(f"restoring the outputs dvc.lock names: dvc checkout --force {' '.join(targets)}", flush=True)
    return checkout_outputs(args.repo, targets, on_line=print).returncode


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
