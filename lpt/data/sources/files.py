"""Helpers shared by the file-based sources (list, imagefolder, inat): entries -> split items.

Every image path a source declares goes through :class:`RootGuard`: a file whose real location (after
symlinks, ``..`` and absolute paths) is outside the source's root is refused unless
``data.allow_outside_root`` is true, so a list file or a JSON cannot make ingest read (and copy into shards)
an arbitrary file of the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lpt.data.longtail import holdout
from lpt.data.sources.base import BadItems, IngestError, Item

if TYPE_CHECKING:
    from lpt.config import DataConfig

__all__ = ["Entry", "RootGuard", "normalise", "dedupe", "to_items", "train_val"]

ALLOW_HINT = "set data.allow_outside_root: true to read files outside the root"


@dataclass(frozen=True)
class Entry:
    """An image file with its label and where it was declared (``list.txt:12``, ``train.json: image 7``)."""

    path: Path
    label: int
    where: str


def normalise(root: Path, declared: str) -> Path:
    """``root / declared`` with ``.``, ``..`` and repeated separators collapsed (``a/../a/x.png`` -> ``a/x.png``).

    The normalised path is both the duplicate key and the file that is read, so the path that is checked
    against the root is the one that is opened.
    """
    return Path(os.path.normpath(Path(root) / declared))


class RootGuard:
    """Refuses image paths whose real location is outside the dataset root (unless allowed).

    Args:
        root: the source's root folder (``data.<source>.root``).
        allow: ``data.allow_outside_root``: when true every path is accepted.

    Real locations of folders are cached, so a file that is not itself a symlink costs one ``lstat``.
    """

    def __init__(self, root: Path, allow: bool) -> None:
        self.root, self.allow = Path(root), allow
        self.real_root = Path(os.path.realpath(root))
        self._real_dirs: dict[Path, Path] = {}

    def _real(self, path: Path) -> Path:
        parent = self._real_dirs.get(path.parent)
        if parent is None:
            parent = self._real_dirs[path.parent] = Path(os.path.realpath(path.parent))
        return Path(os.path.realpath(path)) if os.path.islink(path) else parent / path.name

    def _symlink_on_the_way(self, path: Path) -> Path | None:
        """The first symlink among ``path`` and its ancestors below the root, if any."""
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return None
        current = self.root
        for part in parts:
            current = current / part
            if os.path.islink(current):
                return current
        return None

    def check(self, path: Path, where: str) -> None:
        """Raise unless ``path`` is inside the root (or outside paths are allowed).

        Args:
            path: the (normalised) path that will be read.
            where: the declaring entry (``list.txt:12``, ``train.json: images[3] (id 7)``, a folder path).

        Raises:
            IngestError: naming ``where``, the path, its real location and how to allow it.
        """
        if self.allow:
            return
        real = self._real(path)
        if real == self.real_root or self.real_root in real.parents:
            return
        link = self._symlink_on_the_way(path)
        via = f" via symlink {link} -> {os.readlink(link)}" if link is not None else ""
        raise IngestError(f"{where}: {path} resolves to {real}{via}, outside the dataset root {self.root} "
                          f"({ALLOW_HINT})")


def dedupe(entries: list[Entry], bad: BadItems) -> list[Entry]:
    """Drop (or fail on) entries whose normalised image path was already declared in the same split."""
    seen: dict[Path, str] = {}
    out = []
    for e in entries:
        key = Path(os.path.normpath(e.path))
        if key in seen:
            bad(e.where, f"duplicate key: {key} already declared at {seen[key]}")
            continue
        seen[key] = e.where
        out.append(e)
    return out


def to_items(entries: list[Entry], seed: int, code: int) -> list[Item]:
    """Items in a seeded shuffled order (shards mix classes)."""
    order = np.random.default_rng([seed, code]).permutation(len(entries))
    return [Item(f"{entries[i].where} {entries[i].path}", entries[i].label, entries[i].path) for i in order]


def train_val(train: list[Entry], val: list[Entry] | None, num_classes: int, cfg: DataConfig,
              seed: int) -> tuple[list[Entry], list[Entry]]:
    """Use the given val entries, or hold some of each class out of train (:func:`lpt.data.longtail.holdout`:
    ``data.val_per_class``, at most ``data.val_max_fraction`` of a class, never below
    ``data.min_train_per_class`` training images)."""
    if val is not None:
        return train, val
    labels = np.array([e.label for e in train], dtype=np.int64)
    tr, va = holdout(labels, num_classes, cfg.val_per_class, seed, cfg.val_max_fraction, cfg.min_train_per_class)
    return [train[i] for i in tr], [train[i] for i in va]
