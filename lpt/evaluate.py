"""Test-split evaluation, plots, report and the quality gate; baselines compared in the same harness.

``run_evaluate(params)`` loads the final checkpoint (``load_trained_model``: eval mode, block-reuse
forward), runs the *test* split with the test transform and writes under ``params.evaluate.out_dir``::

    metrics.json                 flat DVC metrics + gate verdict (always written, even when the gate fails)
    plots/per_class_accuracy.json   rows {class, train_count, accuracy, group}
    plots/confusion.json            rows {actual, predicted} (one per test image)
    plots/prompt_usage.json         rows {prompt, count, group} (group of the image's true class)
    figures/*.png                matplotlib renderings of the same, plus training curves from dvclive
    report.md                    tables + figures

The gate (``evaluate.gate``) compares metrics with thresholds; a failing gate makes ``lpt evaluate`` exit
non-zero, so the DVC ``evaluate`` stage fails and ``export`` never runs. Model selection never uses the
test split: training selects on the validation split, this module only reports.

``run_compare(params, methods, out)`` trains every method (``linear_probe``, ``vpt_deep``, ``lpt_phase1``,
``lpt``) with the same backbone, data and epoch budget into ``<evaluate.out_dir>/compare/<source>/<method>/``
and writes one Markdown table.
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
from lpt.config import Params, apply_overrides, parse_params
from lpt.utils import atomic_dir, atomic_path, write_json_atomic

__all__ = [
    "EvaluateResult",
    "Predictions",
    "METHODS",
    "run_evaluate",
    "run_compare",
    "run_results",
    "check_gate",
    "collect_predictions",
    "final_checkpoint_dir",
    "probe_metrics_path",
]

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("linear_probe", "vpt_deep", "lpt_phase1", "lpt")
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
    """

    metrics_path: Path
    report_path: Path
    gate_passed: bool
    gate_failures: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Predictions:
    """Raw model outputs over a split.

    Attributes:
        cos_logits: [N, C] raw cosine logits.
        labels: [N] true classes.
        selected: [N, k] selected pool prompts (None when the model has no pool).
    """

    cos_logits: np.ndarray
    labels: np.ndarray
    selected: np.ndarray | None


# ------------------------------------------------------------------------------------------ helpers
def final_checkpoint_dir(params: Params) -> Path:
    """The checkpoint folder to evaluate: ``phase2`` (the final model of every method: the one-phase
    methods copy their phase-1 model there); ``phase1`` only for a one-phase method whose phase 2 never ran.
    """
    root = Path(params.train.out_dir)
    if params.train.method != "lpt" and not (root / "phase2" / "model.json").is_file():
        return root / "phase1"
    return root / "phase2"


def probe_metrics_path(params: Params) -> Path:
    """Linear-probe ``metrics.json`` the gate's ``max_drop_vs_probe`` compares against."""
    if params.evaluate.gate.probe_metrics is not None:
        return Path(params.evaluate.gate.probe_metrics)
    return _compare_root(params) / "linear_probe" / "eval" / "metrics.json"


def _compare_root(params: Params) -> Path:
    return Path(params.evaluate.out_dir) / "compare" / params.data.source


def _with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    return parse_params(apply_overrides(params.to_dict(), overrides), source="params (overridden)")


def collect_predictions(model: Any, loader: Any, device: str = "cpu") -> Predictions:
    """Run ``model`` (eval mode) over ``loader`` and stack cosine logits, labels and selected prompts.

    Args:
        model: an ``LPTModel`` whose forward returns ``LPTOutput`` (``logits``, ``selected``).
        loader: iterable of ``(images [B,3,H,W], labels [B])``.
        device: torch device string.

    Returns:
        :class:`Predictions` as numpy arrays.
    """
    import torch

    model.eval()
    logits, labels, selected = [], [], []
    with torch.inference_mode():
        for x, y in loader:
            out = model(x.to(device))
            logits.append(out.logits.float().cpu().numpy())
            labels.append(np.asarray(y, dtype=np.int64))
            if out.selected is not None:
                selected.append(out.selected.cpu().numpy().astype(np.int64))
    num_classes = getattr(model, "num_classes", 0)
    return Predictions(
        cos_logits=np.concatenate(logits) if logits else np.zeros((0, num_classes), np.float32),
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        selected=np.concatenate(selected) if selected and len(selected) == len(logits) else None,
    )


def _param_counts(model: Any) -> dict[str, int]:
    """Tuned tensors over all phases (prompts + keys + head), the same without the head, and the backbone."""
    report = model.parameter_report()
    comps = report.get("components", {})
    tuned = int(report["tuned_total"])
    head = int(comps.get("head", {}).get("params", 0))
    return {"trainable": tuned, "prompt": tuned - head, "backbone": int(report["backbone"])}


def check_gate(metrics: dict[str, Any], params: Params, probe: dict[str, Any] | None = None,
               probe_source: str | None = None) -> list[str]:
    """Compare metrics with ``evaluate.gate``; return one message per missed threshold (empty: pass).

    Args:
        metrics: the scalar metrics (``overall``, ``few``, ...).
        params: the params (``evaluate.gate``).
        probe: the linear probe's metrics (for ``max_drop_vs_probe``), or None when unavailable.
        probe_source: where ``probe`` came from (named in the message).

    Returns:
        Messages like ``"overall = 0.4120 < min_overall = 0.5000"``.
    """
    gate = params.evaluate.gate
    failures: list[str] = []

    def below(key: str, threshold: float, name: str) -> None:
        value = metrics.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            if threshold > 0:
                failures.append(f"{key} = n/a (no test images in that group) but {name} = {threshold:.4f} is required")
        elif value < threshold:
            failures.append(f"{key} = {value:.4f} < {name} = {threshold:.4f}")

    below("overall", gate.min_overall, "min_overall")
    below("few", gate.min_few, "min_few")
    if gate.max_drop_vs_probe is not None and probe is not None and probe.get("overall") is not None:
        drop = float(probe["overall"]) - float(metrics["overall"])
        if drop > gate.max_drop_vs_probe:
            failures.append(
                f"overall drop vs linear probe = {drop:.4f} (probe {probe['overall']:.4f} -> {metrics['overall']:.4f}) "
                f"> max_drop_vs_probe = {gate.max_drop_vs_probe:.4f} (probe metrics: {probe_source})"
            )
    return failures


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.2f}" if pct else f"{v:.4f}"


# ---------------------------------------------------------------------------------- plot data / figs
def _plot_rows(preds: Predictions, counts: np.ndarray, class_names: list[str],
               pool_size: int) -> dict[str, list[dict[str, Any]]]:
    num_classes = len(counts)
    pred = preds.cos_logits.argmax(axis=1) if len(preds.labels) else np.zeros(0, np.int64)
    acc = M.per_class_accuracy(pred, preds.labels, num_classes)
    groups = M.class_groups(counts, "standard")
    per_class = [
        {"class": class_names[c], "train_count": int(counts[c]),
         "accuracy": None if math.isnan(acc[c]) else float(acc[c]), "group": str(groups[c])}
        for c in range(num_classes)
    ]
    confusion = [{"actual": class_names[a], "predicted": class_names[p]} for a, p in zip(preds.labels, pred)]
    usage = M.prompt_usage(preds.selected, preds.labels, counts, pool_size)
    prompt_rows = [
        {"prompt": f"p{p:02d}", "count": int(usage[g][p]), "group": g}
        for p in range(pool_size) for g in M.GROUPS
    ]
    return {"per_class_accuracy": per_class, "confusion": confusion, "prompt_usage": prompt_rows}


def _read_dvclive_curves(train_out: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{metric name: {"phase1": (steps, values), ...}}`` from ``phase*/live/plots/metrics/**/*.tsv``."""
    import csv

    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for phase in (1, 2):
        root = train_out / f"phase{phase}" / "live" / "plots" / "metrics"
        if not root.is_dir():
            continue
        for tsv in sorted(root.rglob("*.tsv")):
            name = tsv.relative_to(root).with_suffix("").as_posix()
            try:
                with open(tsv, newline="") as fh:
                    rows = list(csv.DictReader(fh, delimiter="\t"))
                col = next(k for k in rows[0] if k not in ("step", "timestamp"))
                steps = np.array([float(r["step"]) for r in rows])
                vals = np.array([float(r[col]) for r in rows])
            except (StopIteration, IndexError, KeyError, ValueError):
                continue
            curves.setdefault(name, {})[f"phase{phase}"] = (steps, vals)
    return curves


def _write_figures(fig_dir: Path, rows: dict[str, list[dict[str, Any]]], cm: np.ndarray,
                   usage: dict[str, np.ndarray], has_pool: bool, train_out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}

    # per-class accuracy vs training count (log x), coloured by group, boundaries at 20 and 100
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for g in M.GROUPS:
        pts = [(r["train_count"], r["accuracy"]) for r in rows["per_class_accuracy"]
               if r["group"] == g and r["accuracy"] is not None]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, s=14, alpha=0.75, color=colors[g], label=g)
    for b in (20, 100):
        ax.axvline(b, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Per-class test accuracy vs training count")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside: the points fill the axes
    fig.tight_layout()
    fig.savefig(fig_dir / "per_class_accuracy.png", dpi=110)
    plt.close(fig)
    written.append("per_class_accuracy.png")

    # confusion matrix, rows normalised (classes ordered by index = by training count)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("actual class")
    ax.set_title("Confusion matrix (test, row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(fig_dir / "confusion.png", dpi=110)
    plt.close(fig)
    written.append("confusion.png")

    # prompt usage: stacked bars per pool prompt, split by the group of the image's class
    pool = len(usage["all"])
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    if has_pool and pool:
        bottom = np.zeros(pool)
        for g in M.GROUPS:
            ax.bar(np.arange(pool), usage[g], bottom=bottom, color=colors[g], label=g)
            bottom += usage[g]
        ax.set_xticks(np.arange(pool))
        ax.set_xticklabels([f"p{p:02d}" for p in range(pool)], rotation=90, fontsize=7)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "this model has no group-prompt pool", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("selections (test)")
    ax.set_title("Group-prompt selections per pool prompt")
    fig.tight_layout()
    fig.savefig(fig_dir / "prompt_usage.png", dpi=110)
    plt.close(fig)
    written.append("prompt_usage.png")

    curves = _read_dvclive_curves(train_out)
    if curves:
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
        fig.savefig(fig_dir / "training_curves.png", dpi=100)
        plt.close(fig)
        written.append("training_curves.png")
    return written


def _report_markdown(metrics: dict[str, Any], counts: np.ndarray, figures: list[str],
                     checkpoint: Path) -> str:
    gate = metrics["gate"]
    lines = [
        f"# Evaluation report — {metrics['method']} on {metrics['source']} (test split)",
        "",
        f"Checkpoint: `{checkpoint}` (phase {metrics.get('phase')}); {metrics['num_samples']} test images, "
        f"{len(counts)} classes. Model selection used the validation split only "
        f"(best val acc {_fmt(metrics.get('val_acc'))}).",
        "",
        f"**Quality gate: {'PASSED' if gate['passed'] else 'FAILED'}**",
        "",
    ]
    lines += [f"- {f}" for f in gate["failures"]] + ([""] if gate["failures"] else [])
    lines += ["| metric | value (%) |", "|---|---|"]
    for key in ("overall", "top5", "mean_per_class"):
        lines.append(f"| {METRIC_LABELS[key]} | {_fmt(metrics.get(key))} |")
    lines.append(f"| expected calibration error ({metrics['ece_bins']} bins, scale {metrics['ece_scale']:g}) "
                 f"| {_fmt(metrics.get('ece'))} |")
    lines += ["", "| group | standard (few < 20) | classes | authors' (few <= 20) | classes |", "|---|---|---|---|---|"]
    std, auth = M.class_groups(counts, "standard"), M.class_groups(counts, "authors")
    for g in M.GROUPS:
        lines.append(f"| {g} | {_fmt(metrics.get(g))} | {int((std == g).sum())} | "
                     f"{_fmt(metrics.get(g + '_authors'))} | {int((auth == g).sum())} |")
    lines += [
        "",
        f"Trainable parameters (prompts, keys, head): {metrics['trainable_params']:,} = "
        f"{100 * metrics['trainable_share']:.2f} % of the frozen backbone ({metrics['backbone_params']:,}); "
        f"without the head {metrics['prompt_params']:,} = {100 * metrics['prompt_share']:.2f} %.",
        "",
    ]
    titles = {"per_class_accuracy.png": "Per-class accuracy vs training count", "confusion.png": "Confusion matrix",
              "prompt_usage.png": "Group-prompt usage", "training_curves.png": "Training curves (dvclive)"}
    for f in figures:
        lines += [f"## {titles.get(f, f)}", "", f"![{titles.get(f, f)}](figures/{f})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- evaluate
def run_evaluate(params: Params, phase_dir: Path | None = None) -> EvaluateResult:
    """Evaluate the final model on the test split, write metrics/plots/figures/report, apply the gate.

    Args:
        params: validated params (reads ``data``, ``transforms``, ``loss.scale``, ``train.out_dir``,
            ``evaluate``).
        phase_dir: checkpoint folder; default :func:`final_checkpoint_dir`.

    Returns:
        :class:`EvaluateResult`. ``metrics.json`` is written even when the gate fails.
    """
    import torch
    from torch.utils.data import DataLoader

    from lpt.data.reader import ShardImages, TransformedDataset, build_transform, load_manifest
    from lpt.model.lpt import load_trained_model
    from lpt.utils import resolve_device, seed_everything

    if params.train.threads > 0:
        torch.set_num_threads(params.train.threads)
    device = resolve_device(params.train.device)
    phase_dir = Path(phase_dir) if phase_dir is not None else final_checkpoint_dir(params)
    # backbone.weights == "none" draws a random backbone: seed exactly as training did so it is the same one
    seed_everything(params.seed)
    model, meta = load_trained_model(params, phase_dir, device=device)
    model.eval()

    manifest = load_manifest(params.data.out_dir)
    counts = np.asarray(manifest["train_counts"], dtype=np.int64)
    class_names = [str(c) for c in manifest.get("class_names") or range(len(counts))]

    test = ShardImages(Path(params.data.out_dir), "test", in_memory=True)
    loader = DataLoader(TransformedDataset(test, build_transform(params.transforms, train=False)),
                        batch_size=params.evaluate.batch_size, shuffle=False,
                        num_workers=params.train.num_workers)
    preds = collect_predictions(model, loader, device)
    if preds.cos_logits.shape[1] != len(counts):
        raise ValueError(f"model has {preds.cos_logits.shape[1]} classes but the manifest {len(counts)}")

    scalars = M.summarize(preds.cos_logits, preds.labels, counts, params.loss.scale, params.evaluate.ece_bins)
    pc = _param_counts(model)
    method = str(meta.get("method", params.train.method))
    metrics: dict[str, Any] = {
        "method": method,
        "source": params.data.source,
        "phase": meta.get("phase"),
        **scalars,
        "val_acc": meta.get("best_val_acc"),
        "ece_bins": params.evaluate.ece_bins,
        "ece_scale": params.loss.scale,
        "trainable_params": pc["trainable"],
        "backbone_params": pc["backbone"],
        "trainable_share": M.trainable_share(pc["trainable"], pc["backbone"]) if pc["backbone"] else None,
        "prompt_params": pc["prompt"],
        "prompt_share": M.trainable_share(pc["prompt"], pc["backbone"]) if pc["backbone"] else None,
    }

    probe, probe_src = None, None
    if params.evaluate.gate.max_drop_vs_probe is not None:
        path = probe_metrics_path(params)
        if path.is_file():
            probe, probe_src = json.loads(path.read_text()), str(path)
        else:
            log.warning("gate.max_drop_vs_probe set but no linear-probe metrics at %s: check skipped", path)
    failures = check_gate(metrics, params, probe, probe_src)
    metrics["gate"] = {
        "passed": not failures,
        "failures": failures,
        "min_overall": params.evaluate.gate.min_overall,
        "min_few": params.evaluate.gate.min_few,
        "max_drop_vs_probe": params.evaluate.gate.max_drop_vs_probe,
        "probe_overall": None if probe is None else probe.get("overall"),
    }

    out = Path(params.evaluate.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pool_size = model.cfg.pool_size  # the checkpoint's own model config (load_trained_model uses it)
    rows = _plot_rows(preds, counts, class_names, pool_size)
    with atomic_dir(out / "plots") as tmp:
        for name, data in rows.items():
            (tmp / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    pred_top1 = preds.cos_logits.argmax(axis=1) if len(preds.labels) else np.zeros(0, np.int64)
    cm = M.confusion_matrix(pred_top1, preds.labels, len(counts))
    usage = M.prompt_usage(preds.selected, preds.labels, counts, pool_size)
    with atomic_dir(out / "figures") as tmp:
        figures = _write_figures(tmp, rows, cm, usage, preds.selected is not None, Path(params.train.out_dir))
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text(_report_markdown(metrics, counts, figures, phase_dir))
    metrics_path = write_json_atomic(out / "metrics.json", metrics)
    return EvaluateResult(metrics_path=metrics_path, report_path=report, gate_passed=not failures,
                          gate_failures=failures, metrics=metrics)


# -------------------------------------------------------------------------------------------- compare
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("overall", "overall"), ("many", "many"), ("medium", "medium"), ("few", "few (<20)"),
    ("medium_authors", "medium (auth.)"), ("few_authors", "few (<=20, auth.)"),
    ("mean_per_class", "mean/class"), ("ece", "ECE"), ("val_acc", "val acc"),
)


def _ensure_inputs(params: Params) -> None:
    """Ingest the data and pretrain the embedded backbone when their outputs are missing."""
    from lpt.model.backbone import pretrained_backbone_path

    if not (Path(params.data.out_dir) / "manifest.json").is_file():
        from lpt.data.ingest import run_ingest

        print(f"[compare] ingesting {params.data.source} into {params.data.out_dir}", flush=True)
        run_ingest(params)
    if params.backbone.weights == "pretrain" and not pretrained_backbone_path(params.pretrain.out_dir).is_file():
        from lpt.train import pretrain_backbone

        print(f"[compare] pretraining the backbone -> {params.pretrain.out_dir}", flush=True)
        pretrain_backbone(params)


def _method_params(params: Params, method: str) -> Params:
    root = _compare_root(params) / method
    return _with_overrides(params, {
        "train.method": method,
        "train.out_dir": str(root / "models"),
        "evaluate.out_dir": str(root / "eval"),
        # the gate does not decide a comparison; each method is reported as it is
        "evaluate.gate.min_overall": 0.0,
        "evaluate.gate.min_few": 0.0,
        "evaluate.gate.max_drop_vs_probe": None,
    })


def compare_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table (values in %) of the per-method metrics."""
    head = "| method | " + " | ".join(c for _, c in TABLE_COLUMNS) + " |"
    lines = [head, "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for method, m in rows.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(m.get(k)) for k, _ in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def target_verdict(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison target: LPT few >= linear probe few + 10 points and LPT overall >= linear probe overall."""
    if "lpt" not in rows or "linear_probe" not in rows:
        return "Target check needs both `lpt` and `linear_probe` rows."
    lpt, lp = rows["lpt"], rows["linear_probe"]
    out = []
    for key, margin in (("few", 0.10), ("overall", 0.0)):
        a, b = lpt.get(key), lp.get(key)
        if a is None or b is None:
            out.append(f"{key}: n/a")
            continue
        diff = a - b
        ok = diff >= margin - 1e-12
        want = f">= +{100 * margin:.0f} points" if margin else ">= 0 points"
        out.append(f"{key}: LPT − linear probe = {100 * diff:+.2f} points (target {want}) — "
                   f"{'met' if ok else f'missed by {100 * (margin - diff):.2f} points'}")
    return "; ".join(out)


def run_compare(params: Params, methods: list[str], out: Path | None = None) -> Path:
    """Train and test each method in the same harness; write a Markdown table.

    Every method gets the same backbone (and pretrain checkpoint), data, seed and epoch budget; only
    ``train.method`` and the output folders differ (``<evaluate.out_dir>/compare/<source>/<method>/``
    with ``models/`` and ``eval/``). ``run_phase`` selects checkpoints on the validation split; the test
    split is only reported. Phases already trained in those folders are resumed/reused by ``run_phase``.

    Args:
        params: the base params (``data.source`` picks the dataset).
        methods: subset of :data:`METHODS`, in table order.
        out: Markdown path; default ``<evaluate.out_dir>/compare/<source>/table.md``.

    Returns:
        The path of the written table.
    """
    from lpt.train import run_phase

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    _ensure_inputs(params)
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        mp = _method_params(params, method)
        val_acc = None
        for phase in (1, 2):  # phase 2 of the one-phase methods copies the phase-1 model
            res = run_phase(mp, phase) or {}
            if res.get("best_val_acc") is not None:
                val_acc = res["best_val_acc"]
        result = run_evaluate(mp)
        rows[method] = dict(result.metrics)
        if val_acc is not None:
            rows[method]["val_acc"] = val_acc
        print(f"[compare] {params.data.source} / {method}: overall {_fmt(rows[method]['overall'])} "
              f"few {_fmt(rows[method]['few'])} (test, %)", flush=True)
    out = Path(out) if out is not None else _compare_root(params) / "table.md"
    text = _compare_section(params, rows)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    write_json_atomic(out.with_suffix(".json"), rows)
    return out


def _compare_section(params: Params, rows: dict[str, dict[str, Any]]) -> str:
    p1, p2 = params.train.phase1, params.train.phase2
    any_row = next(iter(rows.values()))
    lines = [
        f"### {params.data.source} (imbalance ratio {params.data.imbalance_ratio:g})",
        "",
        f"Test split, {any_row.get('num_samples')} images; top-1 accuracy in %. Backbone `{params.backbone.name}` "
        f"(weights: {params.backbone.weights}); epochs phase 1 / 2: {p1.epochs} / {p2.epochs}; seed {params.seed}. "
        "Checkpoints selected on the validation split only.",
        "",
        compare_table(rows),
        "",
        f"Target (LPT vs linear probe): {target_verdict(rows)}.",
        "",
    ]
    return "\n".join(lines)


NOTES_MARKER = "<!-- notes below are kept when `lpt compare --sources` regenerates this file -->"


def run_results(params: Params, methods: list[str], sources: list[str], out: Path) -> Path:
    """Run :func:`run_compare` for several data sources and assemble one Markdown file.

    Non-default sources get their own shard folder (``data/compare/<source>/shards``); the backbone and
    its pretrain checkpoint stay those of ``params`` so every source uses the same frozen backbone.

    Args:
        params: base params.
        methods: methods for every table.
        sources: ``data.source`` values, e.g. ``["synthetic", "fashion_mnist"]``.
        out: the Markdown file (e.g. ``docs/results.md``).

    Returns:
        ``out``.
    """
    sections = []
    for source in sources:
        sp = params
        if source != params.data.source:
            shards = Path("data/compare") / source / "shards"
            sp = _with_overrides(params, {"data.source": source, "data.out_dir": str(shards)})
        table = run_compare(sp, methods, None)
        sections.append(table.read_text())
    notes = ""
    if Path(out).is_file() and NOTES_MARKER in Path(out).read_text():  # hand-written analysis survives a rerun
        notes = Path(out).read_text().split(NOTES_MARKER, 1)[1]
    text = "\n".join([
        "# Results: LPT vs baselines in one harness",
        "",
        "Generated by `lpt compare --sources " + ",".join(sources) + " --out " + str(out) + "` (see "
        "docs/evaluation.md). Every method: same frozen backbone, data, seed and epoch budget; numbers are "
        "test-split top-1 accuracy (%) with many/medium/few by training count (standard: few < 20; "
        "authors': few <= 20).",
        "",
        *sections,
        NOTES_MARKER + (notes or "\n"),
    ])
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return Path(out)
