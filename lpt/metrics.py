"""Pure evaluation metrics over numpy arrays (no torch, no I/O).

Everything here takes predictions/scores and labels as arrays and returns numbers or arrays, so every
metric is testable against hand-computed cases. :mod:`lpt.evaluate` runs the model and calls these.

Class groups follow the long-tail literature, by *training* count ``n`` of each class:

* ``standard``: many ``n > 100``, medium ``20 <= n <= 100``, few ``n < 20``.
* ``authors``: as the LPT authors' code counts — few ``n <= 20`` (a class with exactly 20 training
  images is *medium* under the standard convention and *few* under the authors').

Group accuracy is the mean of the per-class accuracies of the classes in the group (the decoupling /
LPT ``shot_acc`` definition); with a balanced test set it equals the sample accuracy of the group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "format_value",
    "GROUPS",
    "CONVENTIONS",
    "class_groups",
    "topk_accuracy",
    "topk_hits",
    "per_class_accuracy",
    "mean_per_class_accuracy",
    "group_accuracy",
    "softmax",
    "expected_calibration_error",
    "calibration",
    "ece_from_confidence",
    "confusion_matrix",
    "group_confusion",
    "prompt_usage",
    "trainable_share",
    "summarize",
    "sample_stats",
    "summarize_stats",
]

GROUPS: tuple[str, str, str] = ("many", "medium", "few")
CONVENTIONS: tuple[str, str] = ("standard", "authors")
Convention = Literal["standard", "authors"]


def class_groups(train_counts: Sequence[int] | np.ndarray, convention: Convention = "standard") -> np.ndarray:
    """Assign each class to ``many`` / ``medium`` / ``few`` by its training count.

    Args:
        train_counts: training images per class, length C.
        convention: ``standard`` (few < 20) or ``authors`` (few <= 20). Many is ``> 100`` in both.

    Returns:
        Array of C strings (dtype ``<U6``).
    """
    counts = np.asarray(train_counts, dtype=np.int64)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    few_max = 19 if convention == "standard" else 20
    out = np.full(counts.shape, "medium", dtype="<U6")
    out[counts > 100] = "many"
    out[counts <= few_max] = "few"
    return out


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be 1-D with {n} entries, got shape {labels.shape}")
    return labels


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose label is among the ``k`` highest scores.

    Ties are broken by class index (a stable sort on the negated scores), so the result is
    deterministic. ``k`` larger than the number of classes is clipped (accuracy 1.0).

    Args:
        scores: [N, C] logits, cosines or probabilities (any monotone score).
        labels: [N] int class indices.
        k: how many top classes count as a hit.

    Returns:
        Accuracy in [0, 1]; NaN for N = 0.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    labels = _check_labels(labels, scores.shape[0])
    if scores.shape[0] == 0:
        return float("nan")
    k = max(1, min(k, scores.shape[1]))
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def topk_hits(scores: np.ndarray, labels: np.ndarray, k: int = 1) -> np.ndarray:
    """Per sample: is the label among the ``k`` highest scores (ties broken by class index)?

    The same decision as :func:`topk_accuracy`'s stable sort, from the label's rank: the classes scored
    higher, plus the equal-scored ones with a smaller index. O(N x C) compares, no [N, C] sort, so a batch
    of an 8k-class model costs milliseconds.

    Returns:
        bool array of length N.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [N, C], got shape {scores.shape}")
    labels = _check_labels(labels, scores.shape[0])
    if scores.shape[0] == 0:
        return np.zeros(0, bool)
    k = max(1, min(k, scores.shape[1]))
    own = scores[np.arange(len(labels)), labels][:, None]  # [N, 1]
    before = (scores > own).sum(axis=1) + ((scores == own) & (np.arange(scores.shape[1]) < labels[:, None])).sum(axis=1)
    return before < k


def per_class_accuracy(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Top-1 accuracy of each class (NaN for a class without test samples).

    Args:
        preds: [N] predicted class indices.
        labels: [N] true class indices.
        num_classes: C.

    Returns:
        float64 array of length C.
    """
    preds = np.asarray(preds, dtype=np.int64)
    labels = _check_labels(labels, preds.shape[0])
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels[preds == labels], minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def mean_per_class_accuracy(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean of the per-class accuracies over classes that have test samples (balanced accuracy)."""
    acc = per_class_accuracy(preds, labels, num_classes)
    return float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else float("nan")


def group_accuracy(
    preds: np.ndarray,
    labels: np.ndarray,
    train_counts: Sequence[int] | np.ndarray,
    convention: Convention = "standard",
) -> dict[str, float]:
    """Many / medium / few accuracy: mean per-class accuracy of each group's classes.

    Args:
        preds: [N] predicted class indices.
        labels: [N] true class indices.
        train_counts: training images per class (defines C and the groups).
        convention: ``standard`` or ``authors`` (see module docstring).

    Returns:
        ``{"many": a, "medium": b, "few": c}``; a group with no (tested) class is NaN.
    """
    groups = class_groups(train_counts, convention)
    acc = per_class_accuracy(preds, labels, len(groups))
    out: dict[str, float] = {}
    for g in GROUPS:
        sel = acc[(groups == g) & ~np.isnan(acc)]
        out[g] = float(sel.mean()) if sel.size else float("nan")
    return out


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def expected_calibration_error(
    cos_logits: np.ndarray, labels: np.ndarray, scale: float, n_bins: int = 15
) -> float:
    """Expected calibration error of ``softmax(scale * cosine)`` with equal-width confidence bins.

    Bins are ``(0, 1/B], (1/B, 2/B], ..., ((B-1)/B, 1]`` (Guo et al. 2017); a confidence of exactly 0
    cannot occur for a softmax. ECE = sum over bins of ``|bin| / N * |accuracy(bin) - confidence(bin)|``.

    Args:
        cos_logits: [N, C] raw cosine logits (what the model outputs).
        labels: [N] true class indices.
        scale: the loss scale ``s`` (params ``loss.scale``) that turns cosines into logits.
        n_bins: number of equal-width bins (params ``evaluate.ece_bins``).

    Returns:
        ECE in [0, 1]; NaN for N = 0.
    """
    cos_logits = np.asarray(cos_logits, dtype=np.float64)
    labels = _check_labels(labels, cos_logits.shape[0])
    if cos_logits.shape[0] == 0:
        return float("nan")
    conf, pred = calibration(cos_logits, scale)
    return ece_from_confidence(conf, pred == labels, n_bins)


def calibration(cos_logits: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Confidence ``max softmax(scale * cosine)`` and its class, per sample (what ECE needs from the logits).

    Returns:
        ``(confidence float64 [N], predicted class int64 [N])``.
    """
    probs = softmax(scale * np.asarray(cos_logits, dtype=np.float64), axis=1)
    return probs.max(axis=1), probs.argmax(axis=1)


def ece_from_confidence(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE from per-sample confidences and hits (:func:`expected_calibration_error` without the logits).

    Returns:
        ECE in [0, 1]; NaN for no samples.
    """
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct).astype(np.float64)
    if conf.shape[0] == 0:
        return float("nan")
    # (lo, hi] bins: index = ceil(conf * B) - 1, clipped for float round-off.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    n = conf.shape[0]
    ece = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            ece += m.sum() / n * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``M[actual, predicted]`` as an int64 [C, C] array (rows: true class)."""
    preds = np.asarray(preds, dtype=np.int64)
    labels = _check_labels(labels, preds.shape[0])
    flat = labels * num_classes + preds
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def group_confusion(preds: np.ndarray, labels: np.ndarray, train_counts: Sequence[int] | np.ndarray,
                    convention: Convention = "standard") -> np.ndarray:
    """Counts ``M[group of the true class, group of the predicted class]`` over :data:`GROUPS` (3 x 3): how often
    a few-shot image is taken for a head class, at any number of classes."""
    groups = class_groups(train_counts, convention)
    code = {g: i for i, g in enumerate(GROUPS)}
    per_class = np.array([code[g] for g in groups], dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    labels = _check_labels(labels, preds.shape[0])
    return confusion_matrix(per_class[preds], per_class[labels], len(GROUPS))


def prompt_usage(
    selected: np.ndarray | None,
    labels: np.ndarray,
    train_counts: Sequence[int] | np.ndarray,
    pool_size: int,
    convention: Convention = "standard",
) -> dict[str, np.ndarray]:
    """How often each pool prompt is selected, in total and per class group of the sample's true class.

    Args:
        selected: [N, k] int indices of the group prompts each test sample took (None: the model has
            no pool, e.g. phase 1 / linear probe — every count is zero).
        labels: [N] true class indices (decide the sample's group).
        train_counts: training images per class.
        pool_size: P, the number of pool prompts.
        convention: which grouping to split the counts by.

    Returns:
        ``{"all": [P], "many": [P], "medium": [P], "few": [P]}`` int64 counts; each sample contributes
        k selections, so ``all.sum() == N * k``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    out = {g: np.zeros(pool_size, dtype=np.int64) for g in ("all", *GROUPS)}
    if selected is None or pool_size == 0:
        return out
    selected = np.asarray(selected, dtype=np.int64)
    if selected.ndim != 2 or selected.shape[0] != labels.shape[0]:
        raise ValueError(f"selected must be [N, k] with N = {labels.shape[0]}, got shape {selected.shape}")
    if selected.size and (selected.min() < 0 or selected.max() >= pool_size):
        raise ValueError(f"selected prompt indices must lie in [0, {pool_size}), got {selected.min()}..{selected.max()}")
    sample_group = class_groups(train_counts, convention)[labels]
    out["all"] = np.bincount(selected.ravel(), minlength=pool_size)
    for g in GROUPS:
        out[g] = np.bincount(selected[sample_group == g].ravel(), minlength=pool_size)
    return out


def trainable_share(trainable: int, backbone: int) -> float:
    """Trainable parameters as a fraction of the frozen backbone's (the paper's "≈ 1.2 % of ViT-B/16")."""
    if backbone <= 0:
        raise ValueError(f"backbone parameter count must be positive, got {backbone}")
    return trainable / backbone


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def sample_stats(cos_logits: np.ndarray, labels: np.ndarray, scale: float, k: int = 5) -> dict[str, np.ndarray]:
    """Everything the scalar metrics need from one batch of logits, per sample (a few bytes each).

    Evaluation keeps these instead of the [N, C] logits (24k x 8,142 float32 is 0.8 GB at iNat scale).

    Returns:
        ``pred`` (argmax of the cosines), ``topk`` (label among the ``k`` best, :func:`topk_hits`),
        ``confidence`` and ``calibrated_pred`` (:func:`calibration`).
    """
    cos_logits = np.asarray(cos_logits)
    labels = _check_labels(labels, cos_logits.shape[0])
    if cos_logits.shape[0] == 0:
        empty = np.zeros(0, np.int64)
        return {"pred": empty, "topk": np.zeros(0, bool), "confidence": np.zeros(0), "calibrated_pred": empty}
    conf, cal_pred = calibration(cos_logits, scale)
    return {"pred": np.argmax(cos_logits, axis=1).astype(np.int64), "topk": topk_hits(cos_logits, labels, k),
            "confidence": conf, "calibrated_pred": cal_pred.astype(np.int64)}


def summarize_stats(stats: dict[str, np.ndarray], labels: np.ndarray, train_counts: Sequence[int] | np.ndarray,
                    ece_bins: int = 15) -> dict[str, float | None]:
    """:func:`summarize` from :func:`sample_stats` (concatenated over batches, with ``k = 5``)."""
    labels = _check_labels(labels, len(stats["pred"]))
    num_classes = len(train_counts)
    preds = stats["pred"]
    n = labels.shape[0]
    out: dict[str, float | None] = {
        "overall": float(np.mean(preds == labels)) if n else float("nan"),
        "top5": float(np.mean(stats["topk"])) if n else float("nan"),
        "mean_per_class": mean_per_class_accuracy(preds, labels, num_classes),
        "ece": ece_from_confidence(stats["confidence"], stats["calibrated_pred"] == labels, ece_bins),
    }
    for conv in CONVENTIONS:
        suffix = "" if conv == "standard" else "_authors"
        for g, v in group_accuracy(preds, labels, train_counts, conv).items():
            out[g + suffix] = v
    out = {k: _nan_to_none(v) for k, v in out.items()}
    out["num_samples"] = int(n)
    return out


def summarize(
    cos_logits: np.ndarray,
    labels: np.ndarray,
    train_counts: Sequence[int] | np.ndarray,
    scale: float,
    ece_bins: int = 15,
) -> dict[str, float | None]:
    """All scalar test metrics in one flat dict (NaN becomes None so the dict is valid JSON).

    Keys: ``overall``, ``top5``, ``mean_per_class``, ``ece``, ``many``, ``medium``, ``few`` (standard
    convention), ``many_authors``, ``medium_authors``, ``few_authors``, ``num_samples``.
    """
    cos_logits = np.asarray(cos_logits)
    labels = _check_labels(labels, cos_logits.shape[0])
    return summarize_stats(sample_stats(cos_logits, labels, scale, 5), labels, train_counts, ece_bins)


def format_value(value: Any, pct: bool = False) -> str:
    """A value for a report or table cell: ``–`` when missing (None, NaN), ``true`` / ``false``, a number as a
    percentage with 2 decimals (``pct``), a float with 4 decimals, anything else as ``str``.

    Example:
        >>> format_value(0.71234, pct=True), format_value(0.71234), format_value(None), format_value(True), format_value(7)
        ('71.23', '0.7123', '–', 'true', '7')
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if pct:
        return f"{100 * value:.2f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
