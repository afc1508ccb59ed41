"""CIFAR-100 (python version) made long-tailed with the standard CIFAR-100-LT protocol.

``data.cifar100.path`` is ``cifar-100-python.tar.gz`` or a folder holding ``train``/``test``/``meta``
(directly or under ``cifar-100-python/``). Train: class ``i`` keeps ``int(max_per_class * (1/IR)^(i/99))``
images chosen by the LDAM recipe (one seeded ``np.random.shuffle`` per class, first n_i); val takes
``val_per_class`` other images of each class from the same pool (a head class whose count does not fit
beside it is capped: 480 instead of 500 with val_per_class 20). Test: the balanced official 10k.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np

from lpt.data.longtail import carve_pool, longtail_counts
from lpt.data.sources.base import BadItems, IngestError, Item, SourceData

__all__ = ["load", "read_cifar"]

MEMBERS = ("train", "test", "meta")


def _read_members(path: Path) -> dict[str, dict]:
    """Unpickle train/test/meta from the tarball or folder (pickles with bytes keys)."""
    found: dict[str, dict] = {}
    if path.is_file():
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    name = Path(member.name).name
                    if member.isfile() and name in MEMBERS:
                        found[name] = _unpickle(tar.extractfile(member).read(), f"{path}:{member.name}")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise IngestError(f"{path}: not a readable CIFAR-100 tarball ({err})") from None
    elif path.is_dir():
        base = path / "cifar-100-python" if (path / "cifar-100-python").is_dir() else path
        for name in MEMBERS:
            if (base / name).is_file():
                found[name] = _unpickle((base / name).read_bytes(), str(base / name))
    else:
        raise IngestError(f"{path}: data.cifar100.path not found (cifar-100-python.tar.gz or its folder)")
    missing = [m for m in MEMBERS if m not in found]
    if missing:
        raise IngestError(f"{path}: CIFAR-100 {', '.join(missing)} not found inside")
    return found


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = pickle.loads(raw, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise IngestError(f"{where}: not a CIFAR pickle ({err})") from None
    if not isinstance(obj, dict):
        raise IngestError(f"{where}: not a CIFAR pickle (a {type(obj).__name__}, expected a dict)")
    return obj


def _images_labels(d: dict, where: str, num_classes: int, bad: BadItems) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"fine_labels"], dtype=np.int64)
    except KeyError as err:
        raise IngestError(f"{where}: missing key {err.args[0]!r} (expected b'data' and b'fine_labels')") from None
    if data.ndim != 2 or data.shape[1] != 3072:
        raise IngestError(f"{where}: data has shape {data.shape}, expected N x 3072")
    n = min(len(data), len(labels))
    if len(data) != len(labels):
        bad(where, f"{len(labels)} labels for {len(data)} images; records from {n} have no partner",
            n=abs(len(data) - len(labels)))
    images = data[:n].reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = labels[:n]
    for i in np.where((labels < 0) | (labels >= num_classes))[0]:
        bad(f"{where}: record {i}", f"unknown label {labels[i]} (expected 0..{num_classes - 1})")
    keep = np.where((labels >= 0) & (labels < num_classes))[0]
    return images, labels, keep


def read_cifar(path: Path, bad: BadItems):
    """``(class_names, (train images, labels, valid idx), (test images, labels, valid idx))``."""
    found = _read_members(Path(path))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in found["meta"].get(b"fine_label_names", [])]
    if not names:
        raise IngestError(f"{path}: meta has no b'fine_label_names'")
    train = _images_labels(found["train"], f"{path}:train", len(names), bad)
    test = _images_labels(found["test"], f"{path}:test", len(names), bad)
    return names, train, test


def load(cfg, seed: int, bad: BadItems) -> SourceData:
    """CIFAR-100-LT splits (IR from ``data.imbalance_ratio``: 100, 50 or 10 in the literature)."""
    names, (x, y, ok), (tx, ty, tok) = read_cifar(cfg.cifar100.path, bad)
    pool_labels = np.where(np.isin(np.arange(len(y)), ok), y, -1)  # invalid records never selected
    counts = longtail_counts(len(names), cfg.max_per_class, cfg.imbalance_ratio)
    train_idx, val_idx = carve_pool(pool_labels, len(names), counts, cfg.val_per_class, seed)
    splits = {}
    for code, (split, xs, ys, idx, origin) in enumerate((("train", x, y, train_idx, "train"), ("val", x, y, val_idx, "train"),
                                                        ("test", tx, ty, tok, "test"))):
        order = idx[np.random.default_rng([seed, code]).permutation(len(idx))]
        splits[split] = [Item(f"cifar100/{origin}[{i}]", int(ys[i]), xs[i]) for i in order]
    return SourceData(class_names=names, splits=splits, image_size=(32, 32))
