"""Fashion-MNIST from its IDX ``.gz`` files (Debian ``dataset-fashion-mnist``), made long-tailed.

Train: the exponential profile over the official train set (val carved from the same pool first,
disjoint); test: the whole official test set (balanced, 1,000 per class). Images are 28x28 grayscale,
stored as RGB PNG.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from lpt.data.longtail import carve_pool, longtail_counts
from lpt.data.sources.base import BadItems, IngestError, Item, SourceData, require_dir, require_file

__all__ = ["load", "read_idx", "CLASS_NAMES", "FILES"]

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPE = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into an array.

    Raises:
        IngestError: not an IDX file, unsupported dtype, or fewer bytes than the header declares.
    """
    path = require_file(path, "IDX")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise IngestError(f"{path}: cannot read ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPE:
        raise IngestError(f"{path}: not an IDX file of unsigned bytes (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    need = int(np.prod(shape)) if shape else 0
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size < need:
        raise IngestError(f"{path}: truncated: header declares {shape} ({need} bytes) but {data.size} follow")
    return data[:need].reshape(shape)


def _read_pair(root: Path, split: str, bad: BadItems) -> tuple[np.ndarray, np.ndarray]:
    img_file, lab_file = (root / f for f in FILES[split])
    images, labels = read_idx(img_file), read_idx(lab_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise IngestError(f"{img_file}: expected images N x H x W and labels N, got {images.shape} / {labels.shape}")
    n = min(len(images), len(labels))
    if len(images) != len(labels):
        short = lab_file if len(labels) < len(images) else img_file
        where = f"{short}: {len(labels)} labels for {len(images)} images"
        bad(where, f"count mismatch; records {n}..{max(len(images), len(labels)) - 1} have no partner",
            n=abs(len(images) - len(labels)))
    images, labels = images[:n], labels[:n]
    for i in np.where(labels >= len(CLASS_NAMES))[0]:
        bad(f"{lab_file}: record {i}", f"unknown label {labels[i]} (expected 0..{len(CLASS_NAMES) - 1})")
    ok = labels < len(CLASS_NAMES)
    return images[ok], labels[ok].astype(np.int64)


def load(cfg, seed: int, bad: BadItems) -> SourceData:
    """Long-tailed Fashion-MNIST splits from ``data.fashion_mnist.root``."""
    root = require_dir(cfg.fashion_mnist.root, "data.fashion_mnist.root (Fashion-MNIST IDX)")
    pool_x, pool_y = _read_pair(root, "train", bad)
    test_x, test_y = _read_pair(root, "test", bad)
    counts = longtail_counts(len(CLASS_NAMES), cfg.max_per_class, cfg.imbalance_ratio)
    train_idx, val_idx = carve_pool(pool_y, len(CLASS_NAMES), counts, cfg.val_per_class, seed)
    splits = {}
    for name, (xs, ys, idx) in {"train": (pool_x, pool_y, train_idx), "val": (pool_x, pool_y, val_idx),
                                "test": (test_x, test_y, np.arange(len(test_y)))}.items():
        order = idx[np.random.default_rng([seed, len(splits)]).permutation(len(idx))]
        origin = "train" if name != "test" else "t10k"
        splits[name] = [Item(f"fashion-mnist/{origin}[{i}]", int(ys[i]), xs[i]) for i in order]
    return SourceData(class_names=list(CLASS_NAMES), splits=splits, image_size=tuple(pool_x.shape[1:3]))
