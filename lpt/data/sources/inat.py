"""iNaturalist 2018 style COCO-like JSON: ``images`` (id, file_name), ``annotations`` (image_id,
category_id), ``categories`` (id, name).

Classes are the train JSON's categories sorted by id (label = position). ``test_json`` unset (the usual
iNat protocol reports on the official val set): test = ``val_json`` and val is held out of train
(``val_per_class`` per class), so model selection never sees the test images.
"""

from __future__ import annotations

import json
from pathlib import Path

from lpt.data.sources.base import BadItems, IngestError, SourceData, require_dir, require_file
from lpt.data.sources.files import Entry, dedupe, to_items, train_val

__all__ = ["load", "parse_json"]


def _read(path: Path) -> dict:
    path = require_file(path, "iNat JSON")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IngestError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
    if missing:
        raise IngestError(f"{path}: missing list(s) {', '.join(missing)}")
    return doc


def categories(path: Path) -> tuple[list[int], list[str]]:
    """Category ids (sorted) and names from a JSON file."""
    doc = _read(path)
    try:
        cats = sorted((int(c["id"]), str(c.get("name", c["id"]))) for c in doc["categories"])
    except (KeyError, TypeError, ValueError) as err:
        raise IngestError(f"{path}: bad category entry ({err})") from None
    if not cats:
        raise IngestError(f"{path}: no categories")
    return [c for c, _ in cats], [n for _, n in cats]


def parse_json(path: Path, root: Path, label_of: dict[int, int], bad: BadItems) -> list[Entry]:
    """Entries of one JSON file; unknown categories, duplicate ids and unlabelled images go through ``bad``."""
    doc = _read(path)
    files: dict[int, str] = {}
    for i, im in enumerate(doc["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            bad(where, "image entry without id/file_name")
        elif im["id"] in files:
            bad(where, f"duplicate key: image id {im['id']} already declared")
        else:
            files[im["id"]] = im["file_name"]
    entries, labelled = [], set()
    for i, ann in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{i}]"
        image_id, cat = (ann.get("image_id"), ann.get("category_id")) if isinstance(ann, dict) else (None, None)
        if image_id not in files:
            bad(where, f"annotation for unknown image id {image_id!r}")
        elif cat not in label_of:
            bad(where, f"unknown label: category_id {cat!r} not in the train categories")
        elif image_id in labelled:
            bad(where, f"duplicate key: image id {image_id} annotated twice")
        else:
            labelled.add(image_id)
            entries.append(Entry(root / files[image_id], label_of[cat], where))
    for image_id in files.keys() - labelled:
        bad(f"{path}: image id {image_id}", "image has no annotation")
    return dedupe(entries, bad)


def load(cfg, seed: int, bad: BadItems) -> SourceData:
    """Splits from the JSON files of ``data.inat``."""
    ic = cfg.inat
    root = require_dir(ic.root, "data.inat.root image")
    cat_ids, names = categories(ic.train_json)
    label_of = {c: i for i, c in enumerate(cat_ids)}
    train = parse_json(ic.train_json, root, label_of, bad)
    if ic.test_json is None:
        test = parse_json(ic.val_json, root, label_of, bad)
        train, val = train_val(train, None, len(names), cfg.val_per_class, seed)
    else:
        val = parse_json(ic.val_json, root, label_of, bad)
        test = parse_json(ic.test_json, root, label_of, bad)
    splits = {name: to_items(entries, seed, code) for code, (name, entries) in
              enumerate((("train", train), ("val", val), ("test", test)))}
    return SourceData(class_names=names, splits=splits, image_size=None)
