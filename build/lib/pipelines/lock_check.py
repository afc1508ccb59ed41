"""Is the committed ``dvc.lock`` what the committed code and params would produce?
``python -m pipelines.lock_check [--repo DIR]``.

Asks DVC (``Repo.status()``, the same as ``dvc status --json``) and fails (exit 1, one line per stage)
when a stage's recorded inputs differ from the workspace's:

* a dependency reported ``modified``, or ``deleted`` while no stage produces it (a source file removed);
* a param reported ``modified``, ``new`` or ``deleted`` (``dvc status`` lists them under
  ``changed deps`` as ``{"params.yaml": {"train.lr": "modified"}}``);
* a changed command (``dvc.yaml``'s ``cmd``, templating resolved, differs from the lock's);
* a stage missing from ``dvc.lock``.

What a fresh clone lacks is fine: outputs never produced or not checked out (``not in cache``,
``deleted``) and, as dependencies, the missing outputs of upstream stages (``deleted``). Nothing is run
or hashed beyond the dependencies, so it takes seconds. Exit 2 (one line) when the repo or its
``dvc.yaml`` is unusable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.dvc_stages import DvcStage, DvcYamlError, stage_status

__all__ = ["StaleStage", "stale_stages", "main"]

_CHANGED_PARAM = {"modified", "new", "deleted"}


@dataclass
class StaleStage:
    """One stage whose ``dvc.lock`` entry does not describe the workspace's inputs.

    Attributes:
        stage: the stage name.
        deps: ``(path, status)`` of changed dependencies.
        params: ``(file:key, status)`` of changed params.
        command_changed: ``cmd`` differs from the lock's.
        not_locked: the stage has no entry in ``dvc.lock``.
    """

    stage: str
    deps: list[tuple[str, str]] = field(default_factory=list)
    params: list[tuple[str, str]] = field(default_factory=list)
    command_changed: bool = False
    not_locked: bool = False

    def line(self) -> str:
        """One line naming the stage and what changed."""
        if self.not_locked:
            return f"stage '{self.stage}': not in dvc.lock (run `dvc repro {self.stage}` and commit dvc.lock)"
        parts = []
        if self.deps:
            parts.append("changed deps: " + ", ".join(f"{p} ({s})" for p, s in self.deps))
        if self.params:
            parts.append("changed params: " + ", ".join(f"{k} ({s})" for k, s in self.params))
        if self.command_changed:
            parts.append("changed command")
        return f"stage '{self.stage}': " + "; ".join(parts)


def _produced(path: str, stages: Sequence[DvcStage]) -> bool:
    """Some stage's output is or contains ``path``."""
    return any(s.owns(path) for s in stages)


def _stale(name: str, entries: Sequence[Any], stages: Sequence[DvcStage]) -> StaleStage:
    """Read one stage's ``dvc status`` entries (strings and ``{"changed deps"/"changed outs": {...}}``)."""
    found = StaleStage(stage=name)
    for entry in entries:
        if entry == "changed command":
            found.command_changed = True
        if not isinstance(entry, Mapping):
            continue
        for path, status in (entry.get("changed deps") or {}).items():
            if isinstance(status, Mapping):  # a params file: {key: status}
                found.params += [(f"{path}:{key}", s) for key, s in status.items() if s in _CHANGED_PARAM]
            elif status == "modified" or (status == "deleted" and not _produced(path, stages)):
                found.deps.append((path, status))
            elif status == "new":  # a params file the lock has no values for
                found.params.append((path, status))
    return found


def stale_stages(repo_dir: str | Path) -> list[StaleStage]:
    """The stages whose ``dvc.lock`` entry no longer matches their deps, params or command.

    Args:
        repo_dir: the DVC repository root (holds ``dvc.yaml`` and the committed ``dvc.lock``).

    Returns:
        One :class:`StaleStage` per such stage, in DVC's order; empty when the lock is current.

    Raises:
        DvcYamlError: not a DVC repository, no ``dvc.yaml``, or one DVC refuses (one line).
    """
    statuses = stage_status(repo_dir)
    stages = [st.stage for st in statuses]
    out: list[StaleStage] = []
    for st in statuses:
        if not st.locked:
            out.append(StaleStage(stage=st.stage.name, not_locked=True))
            continue
        found = _stale(st.stage.name, st.entries, stages)
        if found.deps or found.params or found.command_changed:
            out.append(found)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.lock_check [--repo DIR]``: exit 0 when ``dvc.lock`` is current, 1 when stale, 2 for
    a repo DVC cannot read."""
    ap = argparse.ArgumentParser(prog="python -m pipelines.lock_check",
                                 description="Fail when dvc.lock no longer matches the deps, params or commands "
                                             "(missing outputs are fine).")
    ap.add_argument("--repo", type=Path, default=Path("."), help="DVC repository root (default: .)")
    args = ap.parse_args(argv)
    try:
        stale = stale_stages(args.repo)
    except DvcYamlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for found in stale:
        print(f"dvc.lock is out of date: {found.line()}", file=sys.stderr)
    if stale:
        return 1
    print(f"dvc.lock matches dvc.yaml, params and deps ({args.repo.resolve() / 'dvc.lock'})")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
