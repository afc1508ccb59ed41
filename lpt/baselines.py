"""Trivial baselines on raw pixels: no backbone, no training loop (rows of ``lpt compare``).

What a long-tail comparison needs as a sanity floor: if a method on the frozen backbone does not beat a
classifier on the pixels themselves, the backbone (or the method) adds nothing for that data.

``pixel_ncm``
    Nearest class mean: each class is the mean of its training images; an image goes to the class whose
    mean is nearest in Euclidean distance. Class means ignore how many images a class has, so NCM is
    balanced by construction — a hard floor on few-shot classes for any re-balanced method.
``pixel_logreg``
    Multinomial logistic regression on standardised pixels (per-pixel mean/std of the training split),
    full-batch L-BFGS, L2 penalty chosen on the validation split from :data:`LOGREG_L2_GRID` (fitted from
    the strongest penalty down, each fit starting from the previous solution).
    Plain cross-entropy on the long-tailed training split: the pixel counterpart of the CE linear probe.

The pixels are exactly what the methods see: the shards' images through the test-time transform
(``transforms``: resize, centre crop, normalisation), flattened. Both baselines are deterministic (no
seed), so ``lpt compare`` runs them once per data source.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpt import metrics as M
from lpt.config import Params

__all__ = ["PIXEL_BASELINES", "LOGREG_L2_GRID", "PixelData", "BaselineResult", "load_pixels", "ncm_fit",
           "ncm_scores", "logreg_fit", "logreg_scores", "run_pixel_baseline"]

LOGREG_L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
"""L2 penalties (on the mean cross-entropy) tried for ``pixel_logreg``; the best validation accuracy wins
(ties: the stronger penalty)."""


@dataclass
class PixelData:
    """Flattened test-time pixels of the three splits [N, 3 * S * S] (float32) with labels and train counts."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    class_counts: np.ndarray
    num_classes: int


@dataclass
class BaselineResult:
    """What one pixel baseline produced.

    Attributes:
        metrics: :func:`lpt.metrics.summarize` of the test split (+ ``val_acc``, ``trainable_params``).
        fit_seconds: wall time of fitting (including the validation grid), this machine, this load.
        infer_ms_per_image: wall time of scoring the test split per image.
        detail: what was chosen (``l2`` for logistic regression).
    """

    metrics: dict[str, Any]
    fit_seconds: float
    infer_ms_per_image: float
    detail: dict[str, Any] = field(default_factory=dict)


def load_pixels(params: Params, transforms: Any = None) -> PixelData:
    """Every split of ``data.out_dir`` through the test-time transform, flattened.

    ``transforms``: the resolved transforms (:func:`lpt.model.backbone.resolve_transforms`) when
    ``params.transforms`` has nulls (= from the model); default ``params.transforms``.

    Raises:
        FileNotFoundError: no manifest (run ``lpt ingest``).
    """
    from lpt.data.reader import ShardImages, build_transform, load_manifest

    manifest = load_manifest(params.data.out_dir)
    transform = build_transform(params.transforms if transforms is None else transforms, train=False)
    xs, ys = {}, {}
    for split in ("train", "val", "test"):
        images = ShardImages(Path(params.data.out_dir), split, in_memory=True)
        rows = [transform(images[i][0]).numpy().reshape(-1) for i in range(len(images))]  # [3*S*S] each
        xs[split] = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
        ys[split] = np.asarray(images.labels, dtype=np.int64)
    counts = np.asarray(manifest["train_counts"], dtype=np.int64)
    return PixelData(xs, ys, counts, int(manifest["num_classes"]))


# ----------------------------------------------------------------------------- nearest class mean
def ncm_fit(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Class means [C, P] (float64); a class without training images gets NaN (never predicted)."""
    sums = np.zeros((num_classes, x.shape[1]), np.float64)
    np.add.at(sums, y, x.astype(np.float64))
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def ncm_scores(means: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Negative squared Euclidean distance to every class mean [N, C] (argmax = nearest mean)."""
    x = x.astype(np.float64)
    d2 = (x * x).sum(1, keepdims=True) - 2.0 * x @ np.nan_to_num(means).T + np.nansum(means * means, 1)[None]
    d2[:, np.isnan(means).any(1)] = np.inf  # empty classes are never nearest
    return -d2


# ---------------------------------------------------------------------------- logistic regression
def logreg_fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, max_iter: int = 100,
               init: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Multinomial logistic regression, full-batch L-BFGS (deterministic).

    Minimises ``mean CE(x_std W^T + b, y) + l2 / 2 * ||W||^2`` on pixels standardised with the training
    split's per-pixel mean and std (kept in the returned model).

    Args:
        x: [N, P] pixels.
        y: [N] labels.
        num_classes: C.
        l2: the penalty.
        max_iter: L-BFGS iterations.
        init: start from this model's weights (a warm start along the penalty grid); None: zeros.

    Returns:
        ``{"mean": [P], "std": [P], "weight": [C, P], "bias": [C]}`` (float32).
    """
    import torch
    import torch.nn.functional as F

    mean = x.mean(0)
    std = x.std(0) + 1e-6  # constant pixels (borders) would divide by zero
    xt = torch.from_numpy((x - mean) / std)  # [N, P] float32: full-batch L-BFGS needs no more
    yt = torch.from_numpy(y)
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float32)  # [C, P]
    bias = torch.zeros(num_classes, dtype=torch.float32)  # [C]
    if init is not None:
        weight.copy_(torch.from_numpy(init["weight"]))
        bias.copy_(torch.from_numpy(init["bias"]))
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ weight.T + bias, yt) + 0.5 * l2 * (weight * weight).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"mean": mean.astype(np.float32), "std": std.astype(np.float32),
            "weight": weight.detach().numpy().astype(np.float32), "bias": bias.detach().numpy().astype(np.float32)}


def logreg_scores(model: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits [N, C] of :func:`logreg_fit`'s model."""
    return ((x - model["mean"]) / model["std"]) @ model["weight"].T + model["bias"]


# ------------------------------------------------------------------------------------------ runner
@dataclass(frozen=True)
class _Baseline:
    label: str
    fit: Callable[[PixelData], tuple[Any, dict[str, Any]]]
    score: Callable[[Any, np.ndarray], np.ndarray]
    params: Callable[[Any], int]
    calibrated: bool  # scores are logits of a probabilistic model (ECE meaningful)


def _fit_ncm(data: PixelData) -> tuple[Any, dict[str, Any]]:
    return ncm_fit(data.x["train"], data.y["train"], data.num_classes), {}


def _fit_logreg(data: PixelData) -> tuple[Any, dict[str, Any]]:
    best: tuple[float, float, Any] | None = None
    tried = {}
    model = None
    for l2 in sorted(LOGREG_L2_GRID, reverse=True):  # strongest first: a tie keeps the stronger penalty
        # each fit starts from the previous (stronger-penalty) solution: the usual regularisation path
        model = logreg_fit(data.x["train"], data.y["train"], data.num_classes, l2, init=model)
        acc = float((logreg_scores(model, data.x["val"]).argmax(1) == data.y["val"]).mean())
        tried[str(l2)] = acc
        if best is None or acc > best[0]:
            best = (acc, l2, model)
    assert best is not None
    return best[2], {"l2": best[1], "val_acc_by_l2": tried}


PIXEL_BASELINES: dict[str, _Baseline] = {
    "pixel_ncm": _Baseline("pixel nearest class mean", _fit_ncm, ncm_scores,
                           lambda m: int(np.isfinite(m).all(1).sum() * m.shape[1]), calibrated=False),
    "pixel_logreg": _Baseline("pixel logistic regression", _fit_logreg, logreg_scores,
                              lambda m: int(m["weight"].size + m["bias"].size), calibrated=True),
}
"""The pixel baselines by name, in table order."""


def run_pixel_baseline(name: str, params: Params, data: PixelData | None = None) -> BaselineResult:
    """Fit baseline ``name`` on the train split (validation for its one choice), score val and test.

    Args:
        name: a key of :data:`PIXEL_BASELINES`.
        params: reads ``data.out_dir`` and ``transforms`` (via :func:`load_pixels`) and ``evaluate.ece_bins``.
        data: already loaded pixels (one load for several baselines).

    Returns:
        :class:`BaselineResult`; ``metrics`` has the keys of :func:`lpt.metrics.summarize` plus ``val_acc``
        and ``trainable_params`` (numbers the classifier stores: class means, or weights + biases).

    Raises:
        KeyError: unknown name (the message lists the baselines).
    """
    if name not in PIXEL_BASELINES:
        raise KeyError(f"pixel baseline {name!r} is not one of {', '.join(PIXEL_BASELINES)}")
    spec = PIXEL_BASELINES[name]
    data = data if data is not None else load_pixels(params)
    started = time.perf_counter()
    model, detail = spec.fit(data)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    test_scores = spec.score(model, data.x["test"])  # [N, C]
    infer_ms = 1000.0 * (time.perf_counter() - started) / max(1, len(data.y["test"]))
    val_acc = float((spec.score(model, data.x["val"]).argmax(1) == data.y["val"]).mean()) if len(data.y["val"]) else None
    # ECE from softmax(logits) for the probabilistic model; negative distances are not logits
    metrics: dict[str, Any] = M.summarize(test_scores, data.y["test"], data.class_counts, 1.0, params.evaluate.ece_bins)
    if not spec.calibrated:
        metrics["ece"] = None
    metrics.update(val_acc=val_acc, trainable_params=spec.params(model))
    return BaselineResult(metrics, fit_seconds, infer_ms, detail)
