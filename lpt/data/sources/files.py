"""Helpers shared by the file-based sources (list, imagefolder, inat): entries -> split items."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpt.data.longtail import holdout
from lpt.data.sources.base import BadItems, Item

__all__ = ["Entry", "dedupe", "to_items", "train_val"]


@dataclass(frozen=True)
class Entry:
    """An image file with its label and where it was declared (``list.txt:12``, ``train.json: image 7``)."""

    path: Path
    label: int
    where: str


def dedupe(entries: list[Entry], bad: BadItems) -> list[Entry]:
    """Drop (or fail on) entries whose image path was already declared in the same split."""
    seen: dict[Path, str] = {}
    out = []
    for e in entries:
        if e.path in seen:
            bad(e.where, f"duplicate key: {e.path} already declared at {seen[e.path]}")
            continue
        seen[e.path] = e.where
        out.append(e)
    return out


def to_items(entries: list[Entry], seed: int, code: int) -> list[Item]:
    """Items in a seeded shuffled order (shards mix classes)."""
    order = np.random.default_rng([seed, code]).permutation(len(entries))
    return [Item(f"{entries[i].where} {entries[i].path}", entries[i].label, entries[i].path) for i in order]


def train_val(train: list[Entry], val: list[Entry] | None, num_classes: int, val_per_class: int,
              seed: int) -> tuple[list[Entry], list[Entry]]:
    """Use the given val entries, or hold ``min(val_per_class, n_c // 2)`` per class out of train."""
    if val is not None:
        return train, val
    labels = np.array([e.label for e in train], dtype=np.int64)
    tr, va = holdout(labels, num_classes, val_per_class, seed)
    return [train[i] for i in tr], [train[i] for i in va]
