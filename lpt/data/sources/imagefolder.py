"""One sub-folder per class: ``root/train/<class>/*``, ``root/test/<class>/*``, optional ``root/val/<class>/*``.

Classes are the sorted sub-folders of ``root/train``. Without ``root/val``, ``val_per_class`` images
per class are held out of train. With ``longtail: true`` a balanced train folder is subsampled with the
exponential profile (``imbalance_ratio``, ``max_per_class``; class order = sorted folder names), val
carved from the same pool first. Hidden files are ignored; anything else that is not an image is a bad
item, and so is an entry that is not a regular file (a FIFO, socket or device: reported, never opened). A
file whose real location is outside ``root`` (a symlinked file, class folder or split folder that points
elsewhere) is refused, naming the symlink, unless ``data.allow_outside_root`` is true. Symlinks to folders
*inside* a class folder are not followed (Python's ``rglob``), as before.
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

from lpt.data.imageio import file_kind
from lpt.data.longtail import carve_pool, longtail_counts
from lpt.data.sources.base import BadItems, IngestError, SourceData, require_dir
from lpt.data.sources.files import Entry, RootGuard, to_items, train_val

__all__ = ["load", "scan_split"]


def _scan(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The regular files below ``folder``, and its entries that are neither a file nor a folder (FIFOs,
    sockets, devices: ``(path, kind)``), both sorted; hidden names and broken symlinks are left out."""
    files, special = [], []
    for p in folder.rglob("*"):
        if p.name.startswith("."):
            continue
        try:
            mode = p.stat().st_mode  # follows symlinks, as is_file() did; never opens the entry
        except OSError:
            continue
        if stat.S_ISREG(mode):
            files.append(p)
        elif not stat.S_ISDIR(mode):
            special.append((p, file_kind(mode)))
    return sorted(files), sorted(special)


def _files(folder: Path) -> list[Path]:
    return _scan(folder)[0]


def scan_split(split_dir: Path, class_names: list[str], bad: BadItems, guard: RootGuard | None = None) -> list[Entry]:
    """Entries of one split folder; a class folder unknown to train goes through ``bad``.

    Raises:
        IngestError: a file outside the root (``guard``; default: the split folder's parent refuses it).
    """
    guard = guard if guard is not None else RootGuard(split_dir.parent, allow=False)
    index = {name: i for i, name in enumerate(class_names)}
    entries = []
    for sub in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in index:
            bad(str(sub), f"unknown label: class folder {sub.name!r} does not exist under train/")
            continue
        files, special = _scan(sub)
        for path, kind in special:  # a FIFO would block the reader: never opened, reported by name
            bad(str(path), f"not a regular file ({kind}): an image must be a regular file")
        for path in files:
            guard.check(path, str(path))
            entries.append(Entry(path, index[sub.name], str(path.relative_to(split_dir.parent))))
    return entries


def load(cfg, seed: int, bad: BadItems) -> SourceData:
    """Splits from ``data.imagefolder.root``."""
    root = require_dir(cfg.imagefolder.root, "data.imagefolder.root")
    train_dir, test_dir = require_dir(root / "train", "train split"), require_dir(root / "test", "test split")
    class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise IngestError(f"{train_dir}: no class sub-folders")
    for name in class_names:
        if not _files(train_dir / name):
            raise IngestError(f"{train_dir / name}: empty class folder (class {name!r} has no images)")
    guard = RootGuard(root, cfg.allow_outside_root)
    train = scan_split(train_dir, class_names, bad, guard)
    val = scan_split(root / "val", class_names, bad, guard) if (root / "val").is_dir() else None
    test = scan_split(test_dir, class_names, bad, guard)
    carved = False  # val held out of an (already long-tailed) train folder
    if cfg.imagefolder.longtail:
        labels = np.array([e.label for e in train], dtype=np.int64)
        counts = longtail_counts(len(class_names), cfg.max_per_class, cfg.imbalance_ratio)
        tr, va = carve_pool(labels, len(class_names), counts, 0 if val is not None else cfg.val_per_class, seed)
        train, val = [train[i] for i in tr], (val if val is not None else [train[i] for i in va])
    else:
        carved = val is None
        train, val = train_val(train, val, len(class_names), cfg, seed)
    splits = {name: to_items(entries, seed, code) for code, (name, entries) in
              enumerate((("train", train), ("val", val), ("test", test)))}
    return SourceData(class_names=class_names, splits=splits, image_size=None,
                      val_from_train=carved)
