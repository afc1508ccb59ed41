"""Test-split evaluation: metrics, plots, report, and the quality gate verdict (:mod:`lpt.gate`).

``run_evaluate(params)`` loads the final checkpoint (``load_trained_model``: eval mode, block-reuse
forward), runs the *test* split with the test transform and writes under ``params.evaluate.out_dir``::

    metrics.json                 flat DVC metrics (numbers only; always written, even when the gate fails)
    gate.json                    the gate verdict for this checkpoint: passed, failures, thresholds and the
                                 checkpoint's sha256 (``lpt export`` refuses a checkpoint without a pass)
    plots/per_class_accuracy.json   rows {class, train_count, accuracy, group}
    plots/confusion.json            rows {actual, predicted} (one per test image)
    plots/prompt_usage.json         rows {prompt, count, group} (group of the image's true class)
    figures/*.png                matplotlib renderings of the same, plus training curves from dvclive
    report.md                    tables + figures

The gate (``evaluate.gate``) compares metrics with thresholds; a failing gate makes ``lpt evaluate`` exit
non-zero, so the DVC ``evaluate`` stage fails and ``export`` never runs. Model selection never uses the
test split: training selects on the validation split, this module only reports.

The same-harness comparison of methods lives in :mod:`lpt.compare`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpt import metrics as M
from lpt.config import Params
from lpt.methods import own
from lpt.escaping import markdown_cell
from lpt.gate import GATE_FILE, check_gate, gate_verdict, probe_metrics_path, read_gate_verdict  # noqa: F401
from lpt.utils import atomic_dir, atomic_path, check_output_dir, refuse_protected, write_json_atomic

__all__ = [
    "EvaluateResult",
    "GATE_FILE",
    "METRICS_FILE",
    "read_gate_verdict",
    "run_evaluate",
    "check_gate",
    "collect_stats",
    "PredictionStats",
    "count_bins",
    "worst_classes",
    "ClassView",
    "class_view",
    "plot_rows",
    "training_curves",
    "figure_per_class_accuracy",
    "figure_confusion",
    "figure_prompt_usage",
    "figure_training_curves",
    "write_figures",
    "final_checkpoint_dir",
    "nonfinite_tensors",
    "probe_metrics_path",
    "pixel_baseline_accuracy",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
METRIC_LABELS: dict[str, str] = {
    "overall": "top-1 overall",
    "top5": "top-5 overall",
    "mean_per_class": "mean per-class accuracy",
    "many": "many (n > 100)",
    "medium": "medium (20 <= n <= 100)",
    "few": "few (n < 20)",
    "many_authors": "many, authors' convention",
    "medium_authors": "medium (20 < n <= 100), authors' convention",
    "few_authors": "few (n <= 20), authors' convention",
    "ece": "expected calibration error",
}


@dataclass
class EvaluateResult:
    """What :func:`run_evaluate` wrote and the gate verdict.

    Attributes:
        metrics_path: ``metrics.json`` (written whether or not the gate passes).
        report_path: ``report.md``.
        gate_passed: False when any gate threshold is missed.
        gate_failures: one line per missed threshold: metric, value, threshold.
        metrics: the dict written to ``metrics.json``.
        gate_notes: one line per thresholded group absent from this data set (not a failure).
    """

    metrics_path: Path
    report_path: Path
    gate_passed: bool
    gate_failures: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    gate_notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ helpers
def final_checkpoint_dir(params: Params) -> Path:
    """The checkpoint folder to evaluate: ``<train.out_dir>/phase2``, the final model of every method (the
    one-phase methods copy their phase-1 model there)."""
    from lpt.model.lpt import final_model_dir

    return final_model_dir(params.train.out_dir)


@dataclass
class PredictionStats:
    """Per-sample results over a split, without the [N, C] logits (:func:`lpt.metrics.sample_stats`).

    Attributes:
        labels: [N] true classes.
        pred: [N] argmax of the cosine logits.
        topk: [N] label among the 5 best.
        confidence: [N] max softmax(scale * cosine).
        calibrated_pred: [N] class of that confidence.
        selected: [N, k] selected pool prompts (None when the model has no pool).
    """

    labels: np.ndarray
    pred: np.ndarray
    topk: np.ndarray
    confidence: np.ndarray
    calibrated_pred: np.ndarray
    selected: np.ndarray | None

    def as_stats(self) -> dict[str, np.ndarray]:
        return {"pred": self.pred, "topk": self.topk, "confidence": self.confidence,
                "calibrated_pred": self.calibrated_pred}


def collect_stats(model: Any, loader: Any, scale: float, device: str = "cpu") -> PredictionStats:
    """Run ``model`` (eval mode) over ``loader``, keeping per-sample results only.

    Memory is O(N) small numbers whatever the number of classes: each batch's logits are reduced to
    :func:`lpt.metrics.sample_stats` before the next one (the full logits of iNat's 24k test images over
    8,142 classes would be 0.8 GB of float32).

    Args:
        model: an ``LPTModel`` whose forward returns ``LPTOutput`` (``logits``, ``selected``).
        loader: iterable of ``(images [B,3,H,W], labels [B])``, or ``[B,V,3,H,W]`` views whose cosines are
            averaged per image (test-time ensembling; no prompt selection is kept then).
        scale: ``loss.scale`` (softmax temperature of the confidence).
        device: torch device string.
    """
    import torch

    model.eval()
    parts: dict[str, list[np.ndarray]] = {"labels": [], "pred": [], "topk": [], "confidence": [], "calibrated_pred": []}
    selected: list[np.ndarray] = []
    batches = 0
    with torch.inference_mode():
        for x, y in loader:
            views = x.shape[1] if x.dim() == 5 else 0  # [B, V, 3, H, W]: test-time ensembling views
            out = model(x.flatten(0, 1).to(device) if views else x.to(device))
            logits = out.logits.float()
            if views:  # the V views' cosines averaged (LIFT's TTE); the prompt selection is per view: dropped
                logits = logits.reshape(x.shape[0], views, -1).mean(dim=1)  # [B, C]
                out = out._replace(selected=None)
            labels = np.asarray(y, dtype=np.int64)
            stats = M.sample_stats(logits.cpu().numpy(), labels, scale, 5)  # [B, C] -> [B] each
            parts["labels"].append(labels)
            for key, value in stats.items():
                parts[key].append(value)
            if out.selected is not None:
                selected.append(out.selected.cpu().numpy().astype(np.int64))
            batches += 1
    empty = {"labels": np.zeros(0, np.int64), "pred": np.zeros(0, np.int64), "topk": np.zeros(0, bool),
             "confidence": np.zeros(0), "calibrated_pred": np.zeros(0, np.int64)}
    arrays = {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}
    return PredictionStats(**arrays, selected=np.concatenate(selected) if selected and len(selected) == batches else None)


def tte_metrics(model: Any, images: Any, transforms: Any, counts: np.ndarray, scale: float, bins: int,
                batch_size: int, num_workers: int, device: str) -> dict[str, Any]:
    """The test metrics under LIFT's five-crop test-time ensembling, each key prefixed ``tte_``.

    Args:
        model: the trained model.
        images: the test split (``(PIL image, label)`` items).
        transforms: the resolved test-time ``transforms``.
        counts: training images per class (the groups).
        scale: the logit scale of the confidence (ECE).
        bins: ECE bins.
        batch_size: images per batch (each brings 5 views).
        num_workers: DataLoader workers.
        device: torch device string.
    """
    from torch.utils.data import DataLoader

    from lpt.data.reader import TransformedDataset, five_crop_transform

    loader = DataLoader(TransformedDataset(images, five_crop_transform(transforms)), batch_size=max(1, batch_size // 5),
                        shuffle=False, num_workers=num_workers)
    preds = collect_stats(model, loader, scale, device)
    scalars = M.summarize_stats(preds.as_stats(), preds.labels, counts, bins)
    return {f"tte_{k}": v for k, v in scalars.items()}


def nonfinite_tensors(tensors: dict[str, Any]) -> list[str]:
    """Names of the tensors (a checkpoint's trained ones) holding any nan or inf, in name order."""
    import torch

    return sorted(name for name, t in tensors.items() if not bool(torch.isfinite(t).all()))


def _param_counts(model: Any) -> dict[str, int]:
    """Tuned tensors over all phases (prompts, keys, adapters, head), the same without the head, and the backbone."""
    report = model.parameter_report()
    comps = report.get("components", {})
    tuned = int(report["tuned_total"])
    head = int(comps.get("head", {}).get("params", 0))
    return {"trainable": tuned, "prompt": tuned - head, "backbone": int(report["backbone"])}


def _pct(value: Any) -> str:
    """A rate as a percentage for the report (:func:`lpt.metrics.format_value`)."""
    return M.format_value(value, pct=True)


# ---------------------------------------------------------------------------------- class-level results
@dataclass
class ClassView:
    """The class-level results that the DVC plots, the figures and the report are drawn from.

    Attributes:
        counts: training images per class (the groups' counts) [C].
        acc: per-class test accuracy (NaN for a class without test images) [C].
        groups: per-class group, standard convention [C].
        confusion: C x C counts, or the 3 x 3 group confusion when summarised.
        usage: group-prompt selections per pool prompt: ``all`` and per group.
        has_pool: the model selects group prompts.
        bins: the training-count bins (:func:`count_bins`) when there are more classes than plots show one by
            one (``evaluate.max_plot_classes``); ``None``: one row per class.
        worst: the classes with the lowest test accuracy (:func:`worst_classes`), when summarised.
    """

    counts: np.ndarray
    acc: np.ndarray
    groups: np.ndarray
    confusion: np.ndarray
    usage: dict[str, np.ndarray]
    has_pool: bool
    bins: list[dict[str, Any]] | None = None
    worst: list[dict[str, Any]] | None = None

    @property
    def summarised(self) -> bool:
        return self.bins is not None


def class_view(preds: PredictionStats, counts: np.ndarray, class_names: list[str], pool_size: int,
               max_classes: int) -> ClassView:
    """:class:`ClassView` of a model's test predictions: per-class accuracy and groups, confusion (by group
    above ``max_classes`` classes: a C x C matrix at 8,142 classes is 0.5 GB of int64 and an unreadable figure),
    prompt usage, and the count bins and worst classes when summarised."""
    num_classes = len(counts)
    acc = M.per_class_accuracy(preds.pred, preds.labels, num_classes)
    groups = M.class_groups(counts, "standard")
    usage = M.prompt_usage(preds.selected, preds.labels, counts, pool_size)
    has_pool = preds.selected is not None
    if num_classes <= max_classes:
        return ClassView(counts, acc, groups, M.confusion_matrix(preds.pred, preds.labels, num_classes), usage,
                         has_pool)
    return ClassView(counts, acc, groups, M.group_confusion(preds.pred, preds.labels, counts), usage, has_pool,
                     bins=count_bins(counts, acc), worst=worst_classes(preds.pred, preds.labels, counts, class_names))


def plot_rows(view: ClassView, preds: PredictionStats, class_names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Rows of the three DVC plots. One per class (accuracy vs training count) and one per test image with
    its class names (confusion); summarised (iNat: 8,142 classes), so ``dvc plots show`` stays renderable: one
    row per training-count bin (its classes' mean accuracy at the bin's geometric-mean count) and the
    confusion between many/medium/few groups (the group of the true vs the predicted class)."""
    acc, groups, counts = view.acc, view.groups, view.counts
    if view.bins is None:
        per_class = [
            {"class": class_names[c], "train_count": int(counts[c]),
             "accuracy": None if math.isnan(acc[c]) else float(acc[c]), "group": str(groups[c])}
            for c in range(len(counts))
        ]
        confusion = [{"actual": class_names[a], "predicted": class_names[p]} for a, p in zip(preds.labels, preds.pred)]
    else:
        per_class = [{"class": f"{b['low']}-{b['high']} images ({b['classes']} classes)", "train_count": b["count"],
                      "accuracy": b["accuracy"], "group": b["group"], "classes": b["classes"]}
                     for b in view.bins]
        confusion = [{"actual": str(groups[a]), "predicted": str(groups[p])} for a, p in zip(preds.labels, preds.pred)]
    pool_size = len(view.usage["all"])
    prompt_rows = [
        {"prompt": f"p{p:02d}", "count": int(view.usage[g][p]), "group": g}
        for p in range(pool_size) for g in M.GROUPS
    ]
    return {"per_class_accuracy": per_class, "confusion": confusion, "prompt_usage": prompt_rows}


COUNT_BINS = 24
"""Log-spaced training-count bins of the summarised per-class plot (plus the group boundaries 20 and 101)."""


def count_bins(counts: np.ndarray, acc: np.ndarray, bins: int = COUNT_BINS) -> list[dict[str, Any]]:
    """Classes grouped by training count: log-spaced bins that never straddle a group boundary.

    Args:
        counts: training images per class (group counts).
        acc: per-class test accuracy (NaN for a class without test images).
        bins: about how many log-spaced bins between the smallest and largest count.

    Returns:
        One dict per non-empty bin, in increasing count: ``low``/``high`` (counts covered, inclusive),
        ``count`` (geometric mean of its classes' counts), ``accuracy`` (mean over its tested classes, None
        if none), ``group`` (standard convention), ``classes``.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lo, hi = max(1, int(counts.min())), int(counts.max()) + 1
    edges = set(np.unique(np.round(np.geomspace(lo, hi, bins + 1)).astype(np.int64)).tolist()) | {lo, hi, 20, 101}
    edges_arr = np.array(sorted(e for e in edges if lo <= e <= hi))
    which = np.searchsorted(edges_arr, counts, side="right") - 1  # bin i covers [edges[i], edges[i+1])
    groups = M.class_groups(counts, "standard")
    out = []
    for i in range(len(edges_arr) - 1):
        members = np.flatnonzero(which == i)
        if not len(members):
            continue
        tested = acc[members][~np.isnan(acc[members])]
        out.append({"low": int(edges_arr[i]), "high": int(edges_arr[i + 1]) - 1,
                    "count": float(np.exp(np.log(counts[members]).mean())),
                    "accuracy": float(tested.mean()) if len(tested) else None, "group": str(groups[members[0]]),
                    "classes": int(len(members))})
    return out


WORST_CLASSES = 20
"""Classes listed in the report's worst-classes table (summarised reports)."""


def worst_classes(pred: np.ndarray, labels: np.ndarray, counts: np.ndarray, class_names: list[str],
                  limit: int = WORST_CLASSES) -> list[dict[str, Any]]:
    """The ``limit`` tested classes with the lowest test accuracy (ties: fewer training images first), each
    with the class its images are most often taken for.

    Returns:
        Dicts with ``class``, ``index``, ``train_count``, ``test_images``, ``accuracy``, ``confused_with``
        (name or None) and ``confused_share`` (share of its test images predicted as that class).
    """
    num_classes = len(counts)
    acc = M.per_class_accuracy(pred, labels, num_classes)
    tested = np.flatnonzero(~np.isnan(acc))
    order = tested[np.lexsort((tested, np.asarray(counts)[tested], acc[tested]))][:limit]
    wrong = pred != labels
    pairs, pair_counts = np.unique(labels[wrong] * num_classes + pred[wrong], return_counts=True)
    top: dict[int, tuple[int, int]] = {}
    for pair, n in zip(pairs.tolist(), pair_counts.tolist()):  # ascending pair: first max per class wins
        actual, predicted = divmod(pair, num_classes)
        if actual not in top or n > top[actual][1]:
            top[actual] = (predicted, n)
    test_images = np.bincount(labels, minlength=num_classes)
    rows = []
    for c in order.tolist():
        other = top.get(c)
        rows.append({"class": class_names[c], "index": c, "train_count": int(counts[c]),
                     "test_images": int(test_images[c]), "accuracy": float(acc[c]),
                     "confused_with": class_names[other[0]] if other else None,
                     "confused_share": other[1] / int(test_images[c]) if other else 0.0})
    return rows


def training_curves(train_out: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{metric name: {"phase1": (steps, values), ...}}``: each phase's dvclive curves, read with dvclive's own
    reader (``dvclive.utils.parse_metrics``: every metric file under its ``plots/metrics``)."""
    from types import SimpleNamespace

    from dvclive.plots import Metric
    from dvclive.utils import parse_metrics

    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for phase in (1, 2):
        live = train_out / f"phase{phase}" / "live"
        root = live / "plots" / Metric.subfolder
        if not root.is_dir():
            continue
        try:
            history, _ = parse_metrics(SimpleNamespace(plots_dir=str(live / "plots"),
                                                       metrics_file=str(live / "metrics.json")))
        except (OSError, ValueError):
            continue
        for path in sorted(history):
            rows = history[path]
            name = Path(path).relative_to(root).with_suffix("").as_posix()
            try:
                col = next(k for k in rows[0] if k not in ("step", "timestamp"))
                steps = np.array([float(r["step"]) for r in rows])
                vals = np.array([float(r[col]) for r in rows])
            except (StopIteration, IndexError, KeyError, ValueError, TypeError):
                continue
            curves.setdefault(name, {})[f"phase{phase}"] = (steps, vals)
    return curves


_GROUP_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_per_class_accuracy(path: Path, rows: dict[str, list[dict[str, Any]]], view: ClassView) -> None:
    """Per-class accuracy vs training count (log x), coloured by group, boundaries at 20 and 100; summarised:
    one point per count bin (size ~ its classes) and the distribution of per-class accuracy per group."""
    plt = _pyplot()
    if not view.summarised:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        hist_ax = None
    else:
        fig, (ax, hist_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for g in M.GROUPS:
        pts = [(r["train_count"], r["accuracy"], r.get("classes", 1)) for r in rows["per_class_accuracy"]
               if r["group"] == g and r["accuracy"] is not None]
        if pts:
            x, y, n = zip(*pts)
            size = 14 if not view.summarised else 10 + 140 * np.sqrt(np.asarray(n) / max(n))
            ax.scatter(x, y, s=size, alpha=0.75, color=_GROUP_COLORS[g], label=g)
    for b in (20, 100):
        ax.axvline(b, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("test accuracy" if not view.summarised else "mean test accuracy of the bin's classes")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Per-class test accuracy vs training count" if not view.summarised else
                 f"Accuracy by training-count bin ({sum(r['classes'] for r in rows['per_class_accuracy'])} classes)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: the points fill the axes
    if hist_ax is not None:
        edges = np.linspace(0.0, 1.0, 11)
        for g in M.GROUPS:
            values = view.acc[(view.groups == g) & ~np.isnan(view.acc)]
            if len(values):
                hist_ax.hist(values, bins=edges, histtype="step", lw=1.5, color=_GROUP_COLORS[g],
                             label=f"{g} ({len(values)})")
        hist_ax.set_xlabel("per-class test accuracy")
        hist_ax.set_ylabel("classes")
        hist_ax.set_title("Distribution of per-class accuracy")
        hist_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_confusion(path: Path, view: ClassView) -> None:
    """The confusion matrix, rows normalised (classes ordered by index = by training count); summarised: the
    3 x 3 group confusion with its shares and counts written in."""
    plt = _pyplot()
    cm = view.confusion
    fig, ax = plt.subplots(figsize=(5.5, 5) if not view.summarised else (4.5, 4))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if not view.summarised:
        ax.set_xlabel("predicted class")
        ax.set_ylabel("actual class")
        ax.set_title("Confusion matrix (test, row-normalised)")
    else:
        ticks = np.arange(len(M.GROUPS))
        ax.set_xticks(ticks, M.GROUPS)
        ax.set_yticks(ticks, M.GROUPS)
        for i in ticks:
            for j in ticks:
                ax.text(j, i, f"{norm[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] < 0.5 else "black")
        ax.set_xlabel("group of the predicted class")
        ax.set_ylabel("group of the actual class")
        ax.set_title("Group confusion (test, row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_prompt_usage(path: Path, view: ClassView) -> None:
    """Stacked bars per pool prompt, split by the group of the image's class (a note for a model without a pool)."""
    plt = _pyplot()
    usage = view.usage
    pool = len(usage["all"])
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    if view.has_pool and pool:
        bottom = np.zeros(pool)
        for g in M.GROUPS:
            ax.bar(np.arange(pool), usage[g], bottom=bottom, color=_GROUP_COLORS[g], label=g)
            bottom += usage[g]
        ax.set_xticks(np.arange(pool))
        ax.set_xticklabels([f"p{p:02d}" for p in range(pool)], rotation=90, fontsize=7)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "this model has no group-prompt pool", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("selections (test)")
    ax.set_title("Group-prompt selections per pool prompt")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_training_curves(path: Path, curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    """One panel per dvclive metric, a line per phase (:func:`training_curves`)."""
    plt = _pyplot()
    names = sorted(curves)
    ncol = min(3, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 2.8 * nrow), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        for phase, (s, v) in sorted(curves[name].items()):
            ax.plot(s, v, label=phase, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_figures(fig_dir: Path, rows: dict[str, list[dict[str, Any]]], view: ClassView,
                  train_out: Path) -> list[str]:
    """Every figure of the report into ``fig_dir`` (the training curves only when there are some); their names."""
    figure_per_class_accuracy(fig_dir / "per_class_accuracy.png", rows, view)
    figure_confusion(fig_dir / "confusion.png", view)
    figure_prompt_usage(fig_dir / "prompt_usage.png", view)
    written = ["per_class_accuracy.png", "confusion.png", "prompt_usage.png"]
    curves = training_curves(train_out)
    if curves:
        figure_training_curves(fig_dir / "training_curves.png", curves)
        written.append("training_curves.png")
    return written


def _summary_markdown(view: ClassView) -> list[str]:
    """The report's class-level section when plots are summarised: accuracy per training-count bin, the
    distribution of per-class accuracy per group, and the worst classes."""
    acc, groups = view.acc, view.groups
    lines = ["## Classes by training count", "",
             f"{len(acc)} classes: the plots summarise them by training-count bin and by group "
             "(`evaluate.max_plot_classes`).", "",
             "| training images | group | classes | mean accuracy (%) |", "|---|---|---|---|"]
    for b in view.bins or []:
        lines.append(f"| {b['low']}–{b['high']} | {b['group']} | {b['classes']} | {_pct(b['accuracy'])} |")
    edges = np.linspace(0.0, 1.0, 6)
    lines += ["", "Per-class accuracy, classes per range:", "",
              "| group | " + " | ".join(f"{100 * a:.0f}–{100 * b:.0f} %" for a, b in zip(edges, edges[1:]))
              + " | untested |", "|---|" + "---|" * (len(edges) + 0)]
    for g in M.GROUPS:
        values = acc[groups == g]
        tested = values[~np.isnan(values)]
        hist = np.histogram(tested, bins=edges)[0] if len(tested) else np.zeros(len(edges) - 1, np.int64)
        lines.append(f"| {g} | " + " | ".join(str(int(h)) for h in hist) + f" | {int(np.isnan(values).sum())} |")
    worst = view.worst or []
    lines += ["", f"The {len(worst)} classes with the lowest test accuracy (ties: fewer training images first):", "",
              "| class | training images | test images | accuracy (%) | most often taken for | share (%) |",
              "|---|---|---|---|---|---|"]
    for w in worst:
        confused = markdown_cell(w["confused_with"]) if w["confused_with"] is not None else "–"
        lines.append(f"| {markdown_cell(w['class'])} | {w['train_count']} | {w['test_images']} | "
                     f"{_pct(w['accuracy'])} | {confused} | {_pct(w['confused_share'])} |")
    return lines + [""]


def _report_markdown(metrics: dict[str, Any], gate: dict[str, Any], context: dict[str, Any], counts: np.ndarray,
                     figures: list[str], checkpoint: Path, summary: list[str] | None = None) -> str:
    lines = [
        f"# Evaluation report — {context['method']} on {context['source']} (test split)",
        "",
        f"Checkpoint: `{checkpoint}` (phase {context['phase']}); {metrics['num_samples']} test images, "
        f"{len(counts)} classes. Model selection used the validation split only "
        f"(best val acc {_pct(metrics.get('val_acc'))}).",
        "",
        f"**Quality gate: {'PASSED' if gate['passed'] else 'FAILED'}**",
        "",
    ]
    lines += [f"- {f}" for f in gate["failures"]] + ([""] if gate["failures"] else [])
    lines += [f"- note: {n}" for n in gate.get("notes", [])] + ([""] if gate.get("notes") else [])
    if gate.get("pixel_overall"):
        lines += ["Trivial baselines on the same split's raw pixels (the gate requires beating each): " + ", ".join(
            f"{name} {_pct(acc)}" for name, acc in gate["pixel_overall"].items()), ""]
    lines += ["| metric | value (%) |", "|---|---|"]
    for key in ("overall", "top5", "mean_per_class"):
        lines.append(f"| {METRIC_LABELS[key]} | {_pct(metrics.get(key))} |")
    lines.append(f"| expected calibration error ({context['ece_bins']} bins, scale {context['ece_scale']:g}) "
                 f"| {_pct(metrics.get('ece'))} |")
    lines += ["", "| group | standard (few < 20) | classes | authors' (few <= 20) | classes |", "|---|---|---|---|---|"]
    std, auth = M.class_groups(counts, "standard"), M.class_groups(counts, "authors")
    for g in M.GROUPS:
        lines.append(f"| {g} | {_pct(metrics.get(g))} | {int((std == g).sum())} | "
                     f"{_pct(metrics.get(g + '_authors'))} | {int((auth == g).sum())} |")
    lines += [
        "",
        f"Trainable parameters (prompts, keys, adapters, head): {metrics['trainable_params']:,} = "
        f"{100 * metrics['trainable_share']:.2f} % of the frozen backbone ({metrics['backbone_params']:,}); "
        f"without the head {metrics['prompt_params']:,} = {100 * metrics['prompt_share']:.2f} %.",
        "",
    ]
    lines += summary or []
    titles = {"per_class_accuracy.png": "Per-class accuracy vs training count", "confusion.png": "Confusion matrix",
              "prompt_usage.png": "Group-prompt usage", "training_curves.png": "Training curves (dvclive)"}
    for f in figures:
        lines += [f"## {titles.get(f, f)}", "", f"![{titles.get(f, f)}](figures/{f})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- evaluate
PIXEL_GATE_MAX_BYTES = 4 << 30
"""Above this many bytes of float32 pixels (every split), the pixel baselines are skipped with a warning."""


def pixel_baseline_accuracy(params: Params, manifest: dict[str, Any], transforms: Any) -> dict[str, float]:
    """Overall test accuracy of each ``evaluate.gate.pixel_baselines`` entry, fitted on this split's pixels.

    Args:
        params: ``evaluate.gate.pixel_baselines``, ``data.out_dir``.
        manifest: the shards' manifest (split sizes, to skip a set too large to hold as pixels).
        transforms: the resolved test-time transforms the model was evaluated with (the pixels see the same).
    """
    names = params.evaluate.gate.pixel_baselines
    if not names:
        return {}
    from lpt.baselines import load_pixels, run_pixel_baseline

    need = 4 * 3 * transforms.input_size ** 2 * sum(int(s.get("count", 0)) for s in manifest["splits"].values())
    if need > PIXEL_GATE_MAX_BYTES:
        log.warning("evaluate.gate.pixel_baselines skipped: %.1f GiB of pixels (set it to [] for this data)",
                    need / 2**30)
        return {}
    data = load_pixels(params, transforms)
    return {name: float(run_pixel_baseline(name, params, data).metrics["overall"]) for name in names}


_PLOTS = {"what": "evaluate.out_dir plots", "own": ("per_class_accuracy.json", "confusion.json", "prompt_usage.json")}
_FIGURES = {"what": "evaluate.out_dir figures", "own": ("per_class_accuracy.png", "confusion.png", "prompt_usage.png",
                                                      "training_curves.png")}
"""What ``plots/`` and ``figures/`` hold: a folder with anything else is never replaced
(:func:`lpt.utils.check_output_dir`)."""


def check_evaluate_outputs(out: Path) -> None:
    """Refuse ``evaluate.out_dir`` before any work when it is protected or its ``plots/`` / ``figures/`` are
    not this stage's (:func:`lpt.utils.check_output_dir`)."""
    refuse_protected(out, "evaluate.out_dir")
    check_output_dir(out / "plots", **_PLOTS)
    check_output_dir(out / "figures", **_FIGURES)


def run_evaluate(params: Params, phase_dir: Path | None = None) -> EvaluateResult:
    """Evaluate the final model on the test split, write metrics/gate/plots/figures/report, apply the gate.

    Args:
        params: validated params (reads ``seed``, ``data.out_dir``, ``backbone.weights``, ``pretrain.out_dir``,
            the test-time ``transforms``, ``loss.scale``, ``train.out_dir`` / ``device`` / ``threads`` /
            ``num_workers`` and ``evaluate``).
        phase_dir: checkpoint folder; default :func:`final_checkpoint_dir`.

    Returns:
        :class:`EvaluateResult`. ``metrics.json`` and ``gate.json`` are written even when the gate fails.

    Raises:
        OutputDirError: ``evaluate.out_dir`` is ``.``, a repository root, ... or its ``plots/`` / ``figures/``
            hold files this project did not write (checked before any work).
    """
    import torch

    from lpt.data.reader import ShardImages, group_counts, load_manifest
    from lpt.model.backbone import resolve_transforms
    from lpt.model.lpt import load_trained_model
    from lpt.utils import resolve_device, seed_everything

    check_evaluate_outputs(Path(params.evaluate.out_dir))
    if params.train.threads > 0:
        torch.set_num_threads(params.train.threads)
    device = resolve_device(params.train.device)
    phase_dir = Path(phase_dir) if phase_dir is not None else final_checkpoint_dir(params)
    # backbone.weights == "none" draws a random backbone: seed exactly as training did so it is the same one
    seed_everything(params.seed)
    model, meta = load_trained_model(params, phase_dir, device=device)
    model.eval()

    manifest = load_manifest(params.data.out_dir)
    counts = np.asarray(group_counts(manifest), dtype=np.int64)  # the groups' counts (train_counts, docs/data.md)
    class_names = [str(c) for c in manifest.get("class_names") or range(len(counts))]
    if model.num_classes != len(counts):
        raise ValueError(f"model has {model.num_classes} classes but the manifest {len(counts)}")

    test = ShardImages(Path(params.data.out_dir), "test", in_memory=True)
    # params.transforms with its nulls (= from the model) filled from the trained model's backbone
    transforms = resolve_transforms(params.transforms, model.backbone)
    scale = own(params.loss.scale, model.spec.recipe, "scale")  # null: the method's own
    preds, metrics = _test_metrics(params, model, meta, test, transforms, counts, scale, device)
    gate = gate_verdict(params, metrics, meta, nonfinite_tensors(model.trainable_state_dict()),
                        pixel_baseline_accuracy(params, manifest, transforms))
    metrics["gate_passed"] = gate["passed"]

    out = Path(params.evaluate.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool_size = int(meta["model_config"].get("pool_size", 0))  # the checkpoint's own geometry
    view = class_view(preds, counts, class_names, pool_size, params.evaluate.max_plot_classes)
    figures = _write_plots_and_figures(out, view, preds, class_names, Path(params.train.out_dir))
    report = out / "report.md"
    context = {"method": meta["method"], "source": manifest.get("source", "?"), "phase": meta["phase"],
               "ece_bins": params.evaluate.ece_bins, "ece_scale": scale}
    with atomic_path(report) as tmp:
        tmp.write_text(_report_markdown(metrics, gate, context, counts, figures, phase_dir,
                                        _summary_markdown(view) if view.summarised else None))
    write_json_atomic(out / GATE_FILE, gate)
    metrics_path = write_json_atomic(out / METRICS_FILE, metrics)
    return EvaluateResult(metrics_path=metrics_path, report_path=report, gate_passed=gate["passed"],
                          gate_failures=gate["failures"], metrics=metrics, gate_notes=gate["notes"])


def _test_metrics(params: Params, model: Any, meta: dict[str, Any], test: Any, transforms: Any, counts: np.ndarray,
                  scale: float, device: str) -> tuple[PredictionStats, dict[str, Any]]:
    """The model's per-sample test predictions and the metrics (``metrics.json`` less the gate's verdict):
    accuracy by group, top-5, ECE, TTE when ``evaluate.tte`` asks, parameter counts."""
    from torch.utils.data import DataLoader

    from lpt.data.reader import TransformedDataset, build_transform

    bins = params.evaluate.ece_bins
    loader = DataLoader(TransformedDataset(test, build_transform(transforms, train=False)),
                        batch_size=params.evaluate.batch_size, shuffle=False,
                        num_workers=params.train.num_workers)
    preds = collect_stats(model, loader, scale, device)
    scalars = M.summarize_stats(preds.as_stats(), preds.labels, counts, bins)
    if params.evaluate.tte == "five_crop":  # beside the single-crop metrics, never instead of them
        scalars.update(tte_metrics(model, test, transforms, counts, scale, bins, params.evaluate.batch_size,
                                   params.train.num_workers, device))
    pc = _param_counts(model)
    return preds, {
        **scalars,
        "val_acc": meta.get("best_val_acc"),
        "trainable_params": pc["trainable"],
        "backbone_params": pc["backbone"],
        "trainable_share": M.trainable_share(pc["trainable"], pc["backbone"]) if pc["backbone"] else None,
        "prompt_params": pc["prompt"],
        "prompt_share": M.trainable_share(pc["prompt"], pc["backbone"]) if pc["backbone"] else None,
    }


def _write_plots_and_figures(out: Path, view: ClassView, preds: PredictionStats, class_names: list[str],
                             train_out: Path) -> list[str]:
    """``plots/`` (the DVC plots' rows) and ``figures/`` (PNGs), each folder replaced atomically; the figures' names."""
    rows = plot_rows(view, preds, class_names)
    with atomic_dir(out / "plots", **_PLOTS) as tmp:
        for name, data in rows.items():
            (tmp / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    with atomic_dir(out / "figures", **_FIGURES) as tmp:
        return write_figures(tmp, rows, view, train_out)


