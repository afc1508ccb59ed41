"""Long-tail count profiles, pool splitting and many/medium/few groups.

``exponential`` (CIFAR-100-LT protocol): class ``i`` of ``C`` keeps
``int(max_per_class * (1 / IR) ** (i / (C - 1)))`` training images (Cao et al., LDAM; 500 -> 5 and 10,847
images in total for C = 100, IR = 100).

``inat2018`` (the synthetic iNaturalist stand-in): the same two ends, ``max_per_class`` down to
``max_per_class / IR``, through iNat-2018's group boundaries. In log-count space (``y = log(max / n) / log(IR)``)
against the rank (``x = i / (C - 1)``) the curve has three stretched segments ``y = ya + (yb - ya) * t ** p``
(``t`` the position inside the segment), one per many / medium / few group, joined where iNat-2018's groups
meet: the 842nd class still has 101 images, the 843rd 100; the 4,918th 20, the 4,919th 19
(:data:`INAT2018_GROUPS`: 842 many, 4,076 medium, 3,224 few classes under the standard thresholds > 100,
20-100, < 20, as the long-tail literature reports iNat-2018). The one shape ``p`` is solved so that 8,142
classes from 1,000 to 2 hold exactly iNat-2018's 437,513 training images (:func:`inat2018_shape`); other
class counts or ends keep the knots at the same relative ranks and log-counts. It matches iNat's class count,
ends, total and group sizes; it is *not* iNat's per-class histogram (that cannot be reconstructed from
published figures here). A single stretched exponential through the ends alone (the profile before
2026-12-06) gave 1,181 / 2,141 / 4,820 classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

__all__ = ["PROFILES", "INAT2018", "INAT2018_GROUPS", "longtail_counts", "stretched_counts", "knotted_counts",
           "solve_shape", "inat2018_shape",
           "profile_counts", "carve_pool", "holdout", "holdout_size", "group_labels", "imbalance_ratio", "profile_applies"]

Convention = Literal["standard", "authors"]
Profile = Literal["exponential", "inat2018"]
PROFILES: tuple[str, ...] = ("exponential", "inat2018")

INAT2018 = {"classes": 8142, "train": 437_513, "val": 24_426, "max_per_class": 1000, "min_per_class": 2}
"""iNaturalist 2018's shape (the competition's published figures): classes, train and val images, the
largest and smallest class. Its val set (3 images per class) is the usual test split."""

INAT2018_GROUPS = {"many": 842, "medium": 4076, "few": 3224}
"""iNat-2018's classes per group under the standard thresholds (> 100, 20-100, < 20 training images), as
commonly reported in the long-tail literature (the figures given in issue 26; no source the project can
cite offline confirms them, so they are recorded here as the figures used)."""


def _inat_knots() -> list[tuple[float, float]]:
    """The ``inat2018`` curve's knots ``(x, y)``: relative rank and log-count (see the module docstring)."""
    i, g = INAT2018, INAT2018_GROUPS
    last, log_ir = i["classes"] - 1, np.log(i["max_per_class"] / i["min_per_class"])

    def y(n: int) -> float:
        return float(np.log(i["max_per_class"] / n) / log_ir)

    many_end, medium_end = g["many"] - 1, g["many"] + g["medium"] - 1  # ranks of each group's last class
    return [(0.0, 0.0), (many_end / last, y(101)), ((many_end + 1) / last, y(100)),
            (medium_end / last, y(20)), ((medium_end + 1) / last, y(19)), (1.0, 1.0)]


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


def stretched_counts(num_classes: int, max_per_class: int, imbalance_ratio: float, shape: float) -> list[int]:
    """Per-class counts ``floor(max_per_class * (1 / IR) ** ((i / (C - 1)) ** shape))``, each at least 1.

    Args:
        num_classes: C.
        max_per_class: count of class 0 (the head).
        imbalance_ratio: ``n_0 / n_{C-1}`` (the tail class keeps ``max_per_class / IR``).
        shape: the stretch ``p`` (> 0); 1 is the exponential profile, smaller falls faster from the head.

    Returns:
        ``[n_0, ..., n_{C-1}]``, non-increasing.
    """
    if num_classes == 1:
        return [max_per_class]
    x = np.arange(num_classes, dtype=np.float64) / (num_classes - 1)  # rank in [0, 1]
    counts = np.floor(max_per_class * (1.0 / imbalance_ratio) ** (x ** shape))
    return [int(c) for c in np.maximum(counts, 1)]


def knotted_counts(num_classes: int, max_per_class: int, imbalance_ratio: float, shape: float,
                   knots: Sequence[tuple[float, float]] | None = None) -> list[int]:
    """Per-class counts of the ``inat2018`` curve: stretched segments between knots (module docstring).

    Segments 0, 2, 4 (the many / medium / few groups) are stretched by ``shape``; 1 and 3 (between the last
    class of a group and the first of the next) are straight.

    Args:
        num_classes: C.
        max_per_class: count of class 0 (the head).
        imbalance_ratio: ``n_0 / n_{C-1}``.
        shape: the stretch ``p`` (> 0); smaller falls faster at the start of each group.
        knots: ``(x, y)`` pairs from ``(0, 0)`` to ``(1, 1)``; default iNat-2018's.

    Returns:
        ``[n_0, ..., n_{C-1}]``, non-increasing, each at least 1.
    """
    if num_classes == 1:
        return [max_per_class]
    pts = knots if knots is not None else _inat_knots()
    x = np.arange(num_classes, dtype=np.float64) / (num_classes - 1)
    y = np.zeros_like(x)
    for k, ((xa, ya), (xb, yb)) in enumerate(zip(pts, pts[1:])):
        inside = (x >= xa) & (x <= xb)
        t = (x[inside] - xa) / (xb - xa) if xb > xa else np.ones(int(inside.sum()))
        y[inside] = ya + (yb - ya) * (t ** shape if k % 2 == 0 else t)
    counts = np.floor(max_per_class * (1.0 / imbalance_ratio) ** y + 1e-6)  # 1e-6: 100.99999... is 101
    return [int(c) for c in np.maximum(counts, 1)]


def solve_shape(num_classes: int, max_per_class: int, imbalance_ratio: float, total: int,
                counts: Callable[[int, int, float, float], list[int]] | None = None) -> float:
    """The stretch ``p`` for which ``counts`` (default :func:`stretched_counts`) holds exactly ``total`` images.

    The total is a step function of ``p`` (non-decreasing); the result is the middle of the interval of
    ``p`` where it equals ``total``, so floating-point differences between machines cannot move a class
    across a step.

    Raises:
        ValueError: ``total`` is out of reach for these ends, or no ``p`` gives it exactly (a step of the
            total jumps over it).
    """
    curve = counts if counts is not None else stretched_counts

    def total_at(p: float) -> int:
        return sum(curve(num_classes, max_per_class, imbalance_ratio, p))

    lo_p, hi_p = 1e-4, 1e4
    if not total_at(lo_p) <= total <= total_at(hi_p):
        raise ValueError(f"{total} images cannot be spread over {num_classes} classes from {max_per_class} down to "
                         f"{max_per_class / imbalance_ratio:g} (reachable: {total_at(lo_p)}..{total_at(hi_p)})")

    def edge(below: bool) -> float:
        """Geometric bisection for the first p whose total is >= total (below) or > total (not below)."""
        a, b = lo_p, hi_p
        for _ in range(200):
            mid = (a * b) ** 0.5
            n = total_at(mid)
            if n > total or (below and n == total):
                b = mid
            else:
                a = mid
        return b

    start, end = edge(True), edge(False)
    p = (start * end) ** 0.5
    if total_at(p) != total:
        raise ValueError(f"no stretch gives exactly {total} images over {num_classes} classes "
                         f"({max_per_class} -> {max_per_class / imbalance_ratio:g})")
    return p


@functools.cache
def inat2018_shape() -> float:
    """The stretch that puts iNat-2018's 437,513 images on 8,142 classes from 1,000 down to 2 through its
    group boundaries (:func:`knotted_counts`)."""
    i = INAT2018
    return solve_shape(i["classes"], i["max_per_class"], i["max_per_class"] / i["min_per_class"], i["train"],
                       counts=knotted_counts)


def profile_counts(profile: Profile, num_classes: int, max_per_class: int, imbalance_ratio: float) -> list[int]:
    """Per-class train counts of a named profile (see the module docstring).

    ``inat2018`` with 8,142 classes, 1,000 per head class and ratio 500 is iNat-2018's 437,513 images.

    Raises:
        ValueError: an unknown profile.
    """
    if profile == "exponential":
        return longtail_counts(num_classes, max_per_class, imbalance_ratio)
    if profile == "inat2018":
        return knotted_counts(num_classes, max_per_class, imbalance_ratio, inat2018_shape())
    raise ValueError(f"unknown long-tail profile {profile!r}; expected one of {PROFILES}")


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


def holdout_size(n: int, per_class: int, max_fraction: float = 0.2, min_train: int = 5) -> int:
    """Val images a class of ``n`` gives: ``min(per_class, floor(max_fraction * n), n - min_train)``, >= 0.

    A small class is never carved below ``min_train`` training images (a class of ``min_train`` or fewer gives
    none: validation reports it as absent from val), and no class gives more than ``max_fraction`` of itself.

    Example:
        >>> [holdout_size(n, 20) for n in (240, 86, 31, 11, 7, 5, 2)]
        [20, 17, 6, 2, 1, 0, 0]
    """
    return max(0, min(per_class, int(max_fraction * n + 1e-9), n - min_train))


def holdout(labels: np.ndarray, num_classes: int, per_class: int, seed: int, max_fraction: float = 0.2,
            min_train: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a val split from a given (already long-tailed) train list.

    Each class of ``n_c`` images gives :func:`holdout_size` of them (``data.val_per_class``,
    ``data.val_max_fraction``, ``data.min_train_per_class``).

    Returns:
        ``(train_idx, val_idx)`` into ``labels``.
    """
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        v = holdout_size(len(idx), per_class, max_fraction, min_train)
        train.append(idx[v:])
        val.append(idx[:v])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)
