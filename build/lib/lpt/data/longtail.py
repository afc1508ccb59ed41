"""The exponential long-tail profile (CIFAR-100-LT protocol), pool splitting and many/medium/few groups.

Class ``i`` of ``C`` keeps ``int(max_per_class * (1 / IR) ** (i / (C - 1)))`` training images
(Cao et al., LDAM; 500 -> 5 and 10,847 images in total for C = 100, IR = 100).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["longtail_counts", "carve_pool", "holdout", "group_labels", "imbalance_ratio", "profile_applies"]

Convention = Literal["standard", "authors"]


def longtail_counts(num_classes: int, max_per_class: int, imbalance_ratio: float) -> list[int]:
    """Per-class training counts of the exponential profile.

    Args:
        num_classes: C.
        max_per_class: count of class 0 (the head).
        imbalance_ratio: ``n_0 / n_{C-1}``; 1 gives a balanced set.

    Returns:
        ``[n_0, ..., n_{C-1}]``, non-increasing, each at least 1.
    """
    if num_classes == 1:
        return [max_per_class]
    factor = 1.0 / imbalance_ratio
    return [max(1, int(max_per_class * factor ** (i / (num_classes - 1)))) for i in range(num_classes)]


def carve_pool(labels: np.ndarray, num_classes: int, train_counts: list[int], val_per_class: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a balanced pool into a long-tailed train subset and a balanced val subset, disjoint.

    Each class's pool indices are shuffled with a seeded RNG (the LDAM/CIFAR-100-LT recipe: one
    ``np.random.shuffle`` per class in class order); val takes the last ``val_per_class``, train the first
    ``min(n_c, available - val_per_class)``. With seed 0 and no val carve this is exactly the standard
    CIFAR-100-LT subset; a head class whose count does not fit beside the val carve is capped.

    Args:
        labels: pool labels (N,).
        num_classes: C.
        train_counts: wanted train count per class.
        val_per_class: val images per class (0 for none).
        seed: RNG seed.

    Returns:
        ``(train_idx, val_idx)`` index arrays into the pool, each in class order.
    """
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        keep = max(0, len(idx) - val_per_class)
        train.append(idx[: min(train_counts[c], keep)])
        val.append(idx[keep:] if val_per_class else idx[:0])
    return np.concatenate(train).astype(np.int64), np.concatenate(val).astype(np.int64)


def group_labels(train_counts: list[int], convention: Convention = "standard") -> list[str]:
    """Many/medium/few group of each class from its training count.

    Standard: many > 100, medium 20..100, few < 20. The authors' code counts n = 20 as few.
    """
    few_max = 20 if convention == "authors" else 19
    return ["many" if n > 100 else "few" if n <= few_max else "medium" for n in train_counts]


def imbalance_ratio(train_counts: list[int]) -> float:
    """``max / min`` of the per-class counts (inf if a class is empty)."""
    lo = min(train_counts)
    return float("inf") if lo == 0 else max(train_counts) / lo


def profile_applies(data_cfg) -> bool:
    """Whether ``data.imbalance_ratio`` shapes the train split (else the source's own counts are kept)."""
    if data_cfg.source in ("synthetic", "fashion_mnist", "cifar100"):
        return True
    return data_cfg.source == "imagefolder" and data_cfg.imagefolder is not None and data_cfg.imagefolder.longtail


def holdout(labels: np.ndarray, num_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a val split from a given (already long-tailed) train list.

    Each class gives ``min(per_class, n_c // 2)`` images (a single-image class keeps it for training and
    has no val image, which validation reports).

    Returns:
        ``(train_idx, val_idx)`` into ``labels``.
    """
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        v = min(per_class, len(idx) // 2)
        train.append(idx[v:])
        val.append(idx[:v])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)
