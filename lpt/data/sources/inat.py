"""iNaturalist 2018 style COCO-like JSON: ``images`` (id, file_name), ``annotations`` (image_id,
category_id), ``categories`` (id, name).

Classes are the train JSON's categories sorted by id (label = position). ``test_json`` unset (the usual
iNat protocol reports on the official val set): test = ``val_json`` and val is held out of train
(``val_per_class`` per class), so model selection never sees the test images.

Entries are type-checked (integer ids, string ``file_name``): a malformed entry is one IngestError naming
the JSON file and the entry, never a traceback. ``file_name`` values are normalised and must stay inside
``root`` (no absolute or ``../`` escapes, no symlink out) unless ``data.allow_outside_root`` is true.
"""

from __future__ import annotations

import json
from pathlib import Path

from lpt.data.sources.base import BadItems, IngestError, SourceData, require_dir, require_file
from lpt.data.sources.files import Entry, RootGuard, dedupe, normalise, to_items, train_val

__all__ = ["load", "parse_json", "categories"]

SECTIONS = ("images", "annotations", "categories")


def _is_int(value) -> bool:
    """A JSON integer (``true``/``false`` are not ids)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _read(path: Path) -> dict:
    """The JSON document, checked to be an object whose three sections are lists."""
    path = require_file(path, "iNat JSON")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IngestError(f"{path}: not valid JSON ({err})") from None
    except RecursionError:
        raise IngestError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise IngestError(f"{path}: expected a JSON object with lists {', '.join(SECTIONS)}, "
                          f"got a JSON {type(doc).__name__}")
    missing = [k for k in SECTIONS if k not in doc]
    if missing:
        raise IngestError(f"{path}: missing list(s) {', '.join(missing)}")
    wrong = [f"{k} is a {type(doc[k]).__name__}" for k in SECTIONS if not isinstance(doc[k], list)]
    if wrong:
        raise IngestError(f"{path}: expected lists, but {', '.join(wrong)}")
    return doc


def categories(path: Path) -> tuple[list[int], list[str]]:
    """Category ids (sorted) and names from a JSON file.

    Raises:
        IngestError: naming ``categories[i]`` for an entry without an integer ``id``, a non-string
            ``name``, or an id declared twice (it would leave a class without images).
    """
    doc = _read(path)
    cats: dict[int, tuple[str, int]] = {}
    for i, c in enumerate(doc["categories"]):
        where = f"{path}: categories[{i}]"
        if not isinstance(c, dict) or "id" not in c:
            raise IngestError(f"{where}: expected an object with an integer id, got {_short(c)}")
        if not _is_int(c["id"]):
            raise IngestError(f"{where}: category id {_short(c['id'])} is not an integer")
        name = c.get("name", str(c["id"]))
        if not isinstance(name, str):
            raise IngestError(f"{where}: category name {_short(name)} is not a string")
        if c["id"] in cats:
            raise IngestError(f"{where}: duplicate category id {c['id']} (already categories[{cats[c['id']][1]}])")
        cats[c["id"]] = (name, i)
    if not cats:
        raise IngestError(f"{path}: no categories")
    ids = sorted(cats)
    return ids, [cats[c][0] for c in ids]


def _short(value) -> str:
    """A value for a message: its JSON text, cut to 60 characters."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _image_files(path: Path, doc: dict, root: Path, guard: RootGuard, bad: BadItems) -> dict[int, tuple[Path, str]]:
    """``image id -> (normalised file, where)``; malformed entries and duplicate ids go through ``bad``."""
    files: dict[int, tuple[Path, str]] = {}
    for i, im in enumerate(doc["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict):
            bad(where, f"expected an image object with id and file_name, got {_short(im)}")
        elif "id" not in im or "file_name" not in im:
            bad(where, f"image entry without {' and '.join(k for k in ('id', 'file_name') if k not in im)}")
        elif not _is_int(im["id"]):
            bad(where, f"image id {_short(im['id'])} is not an integer")
        elif not isinstance(im["file_name"], str) or not im["file_name"].strip():
            bad(f"{where} (id {im['id']})", f"file_name {_short(im['file_name'])} is not a non-empty string")
        elif im["id"] in files:
            bad(where, f"duplicate key: image id {im['id']} already declared at {files[im['id']][1]}")
        else:
            where = f"{where} (id {im['id']})"
            file = normalise(root, im["file_name"])
            guard.check(file, where)
            files[im["id"]] = (file, where)
    return files


def parse_json(path: Path, root: Path, label_of: dict[int, int], bad: BadItems,
               guard: RootGuard | None = None) -> list[Entry]:
    """Entries of one JSON file; malformed entries, unknown categories, duplicate ids and unlabelled images
    go through ``bad``.

    Args:
        path: the JSON file.
        root: what ``file_name`` resolves against.
        label_of: category id -> label.
        bad: bad-item policy.
        guard: refuses files outside ``root`` (default: a guard that refuses them).

    Raises:
        IngestError: a malformed document, a bad entry (unless skipping), a file outside the root.
    """
    guard = guard if guard is not None else RootGuard(root, allow=False)
    doc = _read(path)
    files = _image_files(path, doc, root, guard, bad)
    entries, labelled = [], set()
    for i, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            bad(where, f"expected an annotation object with image_id and category_id, got {_short(ann)}")
            continue
        image_id, cat = ann.get("image_id"), ann.get("category_id")
        if not _is_int(image_id):
            bad(where, f"image_id {_short(image_id)} is not an integer")
        elif not _is_int(cat):
            bad(where, f"category_id {_short(cat)} is not an integer")
        elif image_id not in files:
            bad(where, f"annotation for unknown image id {image_id!r}")
        elif cat not in label_of:
            bad(where, f"unknown label: category_id {cat!r} not in the train categories")
        elif image_id in labelled:
            bad(where, f"duplicate key: image id {image_id} annotated twice")
        else:
            labelled.add(image_id)
            entries.append(Entry(files[image_id][0], label_of[cat], where))
    for image_id in files.keys() - labelled:
        bad(files[image_id][1], "image has no annotation")
    return dedupe(entries, bad)


def load(cfg, seed: int, bad: BadItems) -> SourceData:
    """Splits from the JSON files of ``data.inat``."""
    ic = cfg.inat
    root = require_dir(ic.root, "data.inat.root image")
    cat_ids, names = categories(ic.train_json)
    label_of = {c: i for i, c in enumerate(cat_ids)}
    guard = RootGuard(root, cfg.allow_outside_root)
    train = parse_json(ic.train_json, root, label_of, bad, guard)
    if ic.test_json is None:
        test = parse_json(ic.val_json, root, label_of, bad, guard)
        train, val = train_val(train, None, len(names), cfg, seed)
    else:
        val = parse_json(ic.val_json, root, label_of, bad, guard)
        test = parse_json(ic.test_json, root, label_of, bad, guard)
    splits = {name: to_items(entries, seed, code) for code, (name, entries) in
              enumerate((("train", train), ("val", val), ("test", test)))}
    return SourceData(class_names=names, splits=splits, image_size=None, val_from_train=ic.test_json is None)
