"""ImageNet-LT / Places-LT style list files: one ``relative/path label`` per line.

``data.list``: ``root`` (paths resolve against it), ``train_list``, ``test_list``, optional ``val_list``
(else ``val_per_class`` images per class are held out of train) and optional ``class_names`` (one name
per line; else classes are ``0..max label`` of the train list). Blank lines and ``#`` comments are ignored;
the path may contain spaces (the label is the last field).
"""

from __future__ import annotations

from pathlib import Path

from lpt.data.sources.base import BadItems, IngestError, SourceData, require_dir, require_file
from lpt.data.sources.files import Entry, dedupe, to_items, train_val

__all__ = ["load", "parse_list"]


def parse_list(list_path: Path, root: Path, num_classes: int | None, bad: BadItems) -> list[Entry]:
    """Parse a list file; bad lines (no label, non-integer or unknown label) go through ``bad``."""
    list_path = require_file(list_path, "image list")
    entries = []
    for lineno, line in enumerate(list_path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{list_path}:{lineno}"
        parts = text.rsplit(maxsplit=1)
        if len(parts) != 2:
            bad(where, f"expected 'relative/path label', got {text!r}")
            continue
        rel, label_text = parts
        try:
            label = int(label_text)
        except ValueError:
            bad(where, f"unknown label {label_text!r} (not an integer)")
            continue
        if label < 0 or (num_classes is not None and label >= num_classes):
            bad(where, f"unknown label {label} (expected 0..{(num_classes or 1) - 1})")
            continue
        entries.append(Entry(root / rel, label, where))
    return dedupe(entries, bad)


def _class_names(cfg_list, train: list[Entry]) -> list[str]:
    if cfg_list.class_names is not None:
        path = require_file(cfg_list.class_names, "class names")
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not names:
            raise IngestError(f"{path}: no class names")
        return names
    if not train:
        raise IngestError(f"{cfg_list.train_list}: no usable lines")
    return [str(c) for c in range(max(e.label for e in train) + 1)]


def load(cfg, seed: int, bad: BadItems) -> SourceData:
    """Splits from the list files of ``data.list``."""
    lc = cfg.list
    root = require_dir(lc.root, "data.list.root image")
    known = None
    if lc.class_names is not None:
        known = len(_class_names(lc, []))
    train = parse_list(lc.train_list, root, known, bad)
    names = _class_names(lc, train)
    val = parse_list(lc.val_list, root, len(names), bad) if lc.val_list is not None else None
    test = parse_list(lc.test_list, root, len(names), bad)
    train, val = train_val(train, val, len(names), cfg.val_per_class, seed)
    splits = {name: to_items(entries, seed, code) for code, (name, entries) in
              enumerate((("train", train), ("val", val), ("test", test)))}
    return SourceData(class_names=names, splits=splits, image_size=None)
