"""ImageNet-LT / Places-LT style list files: one ``relative/path label`` per line.

``data.list``: ``root`` (paths resolve against it), ``train_list``, ``test_list``, optional ``val_list``
(else ``val_per_class`` images per class are held out of train) and optional ``class_names`` (one name
per line; else classes are ``0..max label`` of the train list). Blank lines and ``#`` comments are ignored;
the path may contain spaces (the label is the last field). Paths are normalised (``a/../a/x.png`` is
``a/x.png``, also for duplicate detection); a path that leads outside ``root`` (absolute, ``../`` or
through a symlink) is refused unless ``data.allow_outside_root`` is true.
"""

from __future__ import annotations

from pathlib import Path

from lpt.data.sources.base import BadItems, IngestError, SourceData, require_dir, require_file
from lpt.data.sources.files import Entry, RootGuard, dedupe, normalise, to_items, train_val

__all__ = ["load", "parse_list"]


def _read_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; an undecodable file is one IngestError naming it."""
    path = require_file(path, what)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise IngestError(f"{path}: {what} file is not UTF-8 text ({err})") from None
    except OSError as err:
        raise IngestError(f"{path}: cannot read the {what} file ({err})") from None


def _label_problem(label: int, num_classes: int | None) -> str | None:
    """Why ``label`` is not a class index of ``num_classes`` classes (None when it is fine)."""
    valid = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
    if label < 0:
        return f"negative label {label} (labels are 0-based class indices, expected {valid})"
    if num_classes is not None and label >= num_classes:
        return f"unknown label {label} (labels are 0-based class indices, expected {valid} for {num_classes} classes)"
    return None


def parse_list(list_path: Path, root: Path, num_classes: int | None, bad: BadItems,
               guard: RootGuard | None = None) -> list[Entry]:
    """Parse a list file; bad lines (no label, non-integer or unknown label) go through ``bad``.

    Args:
        list_path: the list file.
        root: what relative paths resolve against.
        num_classes: known number of classes (None: any label >= 0).
        bad: bad-item policy.
        guard: refuses paths outside ``root`` (default: a guard that refuses them).

    Raises:
        IngestError: a bad line (unless skipping), or a path outside the root (always, unless allowed).
    """
    guard = guard if guard is not None else RootGuard(root, allow=False)
    entries = []
    for lineno, line in enumerate(_read_lines(list_path, "image list"), start=1):
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
        problem = _label_problem(label, num_classes)
        if problem is not None:
            bad(where, problem)
            continue
        path = normalise(root, rel)
        guard.check(path, where)
        entries.append(Entry(path, label, where))
    return dedupe(entries, bad)


def _inferred_class_names(train_list: Path, train: list[Entry]) -> list[str]:
    """Classes ``0..max label`` of the train list; a label gap is an error naming the largest label's line.

    A gap is usually one mistyped label (``9`` typed as ``99``) that silently creates dozens of empty
    classes, so the message points at the line that set the number of classes.
    """
    if not train:
        raise IngestError(f"{train_list}: no usable lines")
    top = max(train, key=lambda e: e.label)
    present = {e.label for e in train}
    empty = [c for c in range(top.label + 1) if c not in present]
    if empty:
        shown = ", ".join(f"{c} ({c})" for c in empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise IngestError(
            f"{top.where}: label {top.label} makes {top.label + 1} classes (without data.list.class_names the classes "
            f"are 0..{top.label}: labels are 0-based class indices), but {len(empty)} class(es) have no train image: "
            f"{shown}; fix that label or give data.list.class_names")
    return [str(c) for c in range(top.label + 1)]


def _class_names(cfg_list, train: list[Entry]) -> list[str]:
    if cfg_list.class_names is not None:
        names = [ln.strip() for ln in _read_lines(cfg_list.class_names, "class names") if ln.strip()]
        if not names:
            raise IngestError(f"{cfg_list.class_names}: no class names")
        return names
    return _inferred_class_names(cfg_list.train_list, train)


def load(cfg, seed: int, bad: BadItems) -> SourceData:
    """Splits from the list files of ``data.list``."""
    lc = cfg.list
    root = require_dir(lc.root, "data.list.root image")
    guard = RootGuard(root, cfg.allow_outside_root)
    known = None
    if lc.class_names is not None:
        known = len(_class_names(lc, []))
    train = parse_list(lc.train_list, root, known, bad, guard)
    names = _class_names(lc, train)
    val = parse_list(lc.val_list, root, len(names), bad, guard) if lc.val_list is not None else None
    test = parse_list(lc.test_list, root, len(names), bad, guard)
    carved = val is None  # no val list: val is held out of train
    train, val = train_val(train, val, len(names), cfg, seed)
    splits = {name: to_items(entries, seed, code) for code, (name, entries) in
              enumerate((("train", train), ("val", val), ("test", test)))}
    return SourceData(class_names=names, splits=splits, image_size=None, val_from_train=carved)
