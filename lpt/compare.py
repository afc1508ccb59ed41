"""The same-harness comparison of methods (``lpt compare``): every method on the same frozen backbone,
data, seed and epoch budget, checkpoints selected on the validation split, the test split only reported.

``run_compare(params, methods, out)`` trains every method into ``<evaluate.out_dir>/compare/<source>/<method>/``
and writes one Markdown table; ``run_results`` does it for several sources into one page (docs/results.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lpt.config import Params, apply_overrides, parse_params
from lpt.evaluate import _fmt, run_evaluate
from lpt.gate import compare_root
from lpt.methods import METHODS as METHOD_REGISTRY
from lpt.utils import atomic_path, write_json_atomic

__all__ = ["METHODS", "TABLE_COLUMNS", "compare_table", "target_verdict", "run_compare", "run_results", "NOTES_MARKER"]

METHODS: tuple[str, ...] = tuple(METHOD_REGISTRY)  # table order: weakest baseline first


def _with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    return parse_params(apply_overrides(params.to_dict(), overrides), source="params (overridden)")


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
        from lpt.pretrain import pretrain_backbone

        print(f"[compare] pretraining the backbone -> {params.pretrain.out_dir}", flush=True)
        pretrain_backbone(params)


def _method_params(params: Params, method: str) -> Params:
    root = compare_root(params) / method
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
    out = Path(out) if out is not None else compare_root(params) / "table.md"
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
