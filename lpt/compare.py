"""The same-harness comparison of methods (``lpt compare``): every method on the same frozen backbone, data
split and epoch budget, several seeds, checkpoints selected on the validation split, the test split only
reported.

What stays fixed and what a seed changes:

- fixed for every method and seed: the data split (ingested once with the base ``seed``: train subset,
  validation carve, test), the frozen backbone (pretrained once, or the same file/hub weights), every
  params value except the method's own knobs, and the epoch budget;
- per seed (``--seeds``): the training trajectory — initial prompts/adapters/head, sampler order and
  augmentation draws. (With ``backbone.weights: none`` the random backbone is drawn from the seed too.)

Epoch budget: ``train.phase1.epochs + train.phase2.epochs`` for every method, and likewise the step floor
``train.phase1.min_steps + train.phase2.min_steps``. LPT spends it as phase 1 + phase 2; a one-phase method
(everything else) trains its single phase for the whole budget (the phase-1 warm-up and patience apply).

Layout: ``<evaluate.out_dir>/compare/<source>/<method>/seed<k>/`` holds ``models/``, ``eval/`` and
``cell.json`` (metrics, train wall time, inference cost, and the key of the inputs that produced them);
a cell whose key still matches is reused by a later run (its times are from the run that trained it; the
page says how many cells were reused). The trivial pixel baselines (:mod:`lpt.baselines`) need no backbone
and no seed: they run once per source into ``<method>/cell.json``.

Statistics: each cell of the tables is the mean ± sample standard deviation over seeds. LPT is compared
with every other row on ``overall`` and ``few``: a difference whose size is within the spread of the
difference (``sqrt(sd_a^2 + sd_b^2)``) is reported as a tie, never as a win or a loss; with one seed
there is no spread and nothing is called.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lpt.baselines import PIXEL_BASELINES
from lpt.config import Params, apply_overrides, parse_params
from lpt.compare_layout import cell_metrics_path, compare_cell_dir, compare_root  # noqa: F401
from lpt.metrics import format_value
from lpt.methods import METHODS as METHOD_REGISTRY
from lpt.methods import PROBE_METHOD, REFERENCE_METHOD, get_method
from lpt.utils import atomic_path, read_json, sha256_file, sha256_json, write_json_atomic

__all__ = ["CompareError", "METHODS", "BASELINES", "ALL_ROWS", "ACCURACY_COLUMNS", "CALLED_METRICS", "CELL_FILE", "NOTES_MARKER",
           "budget", "run_cell", "run_baseline", "aggregate", "call_difference", "verdict_lines", "accuracy_table",
           "cost_table", "compare_table", "target_verdict", "run_compare", "run_results", "readme_table",
           "update_readme", "inference_ms_per_image", "compare_root", "compare_cell_dir", "cell_metrics_path"]

class CompareError(ValueError):
    """A comparison cannot run as asked (unknown row, bad seeds, a README without the results block)."""


METHODS: tuple[str, ...] = tuple(METHOD_REGISTRY)  # the trained methods, table order
BASELINES: tuple[str, ...] = tuple(PIXEL_BASELINES)  # the pixel baselines (no backbone, no seed)
ALL_ROWS: tuple[str, ...] = BASELINES + METHODS
"""Every row ``lpt compare`` can run, in table order: pixel baselines, then the methods (LPT last)."""
CELL_FILE = "cell.json"
CELL_FORMAT = 1
REFERENCE = REFERENCE_METHOD
"""The row the verdicts compare every other row with."""
CALLED_METRICS: tuple[str, ...] = ("overall", "few")
"""Metrics the verdicts call win / tie / loss on."""

ACCURACY_COLUMNS: tuple[tuple[str, str], ...] = (
    ("overall", "overall"), ("many", "many"), ("medium", "medium"), ("few", "few (<20)"),
    ("medium_authors", "medium (auth.)"), ("few_authors", "few (<=20, auth.)"), ("ece", "ECE"), ("val_acc", "val acc"),
)
TABLE_COLUMNS = ACCURACY_COLUMNS  # backwards-compatible name


def _with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    return parse_params(apply_overrides(params.to_dict(), overrides), source="params (overridden)")


def _label(row: str) -> str:
    if row in PIXEL_BASELINES:
        return PIXEL_BASELINES[row].label
    return get_method(row).label or row


# ------------------------------------------------------------------------------------------ inputs
def _ensure_inputs(params: Params, needs_backbone: bool = True) -> None:
    """Ingest the data and (when a trained method needs it) pretrain the embedded backbone, if missing."""
    from lpt.model.backbone import pretrained_backbone_path

    if not (Path(params.data.out_dir) / "manifest.json").is_file():
        from lpt.data.ingest import run_ingest

        print(f"[compare] ingesting {params.data.source} into {params.data.out_dir}", flush=True)
        run_ingest(params)
    manifest_path = Path(params.data.out_dir) / "manifest.json"
    found = read_json(manifest_path, "shards manifest").get("source")
    if found != params.data.source:  # e.g. `-S data.source=fashion_mnist` over the default's synthetic shards
        raise CompareError(f"{manifest_path}: the shards are of data.source {found!r}, not {params.data.source!r}; "
                           f"compare another source with --sources {params.data.source} (its own shards under "
                           f"data/compare/), or point data.out_dir at shards of that source")
    if (needs_backbone and params.backbone.weights == "pretrain"
            and not pretrained_backbone_path(params.pretrain.out_dir).is_file()):
        from lpt.pretrain import pretrain_backbone

        print(f"[compare] pretraining the backbone -> {params.pretrain.out_dir}", flush=True)
        pretrain_backbone(params)


def _inputs_key(params: Params) -> dict[str, str]:
    """What a cell's numbers depend on besides its params: the data manifest and the backbone weights file."""
    from lpt.model.backbone import pretrained_backbone_path

    key = {"manifest": sha256_file(Path(params.data.out_dir) / "manifest.json")}
    weights = params.backbone.weights
    path = pretrained_backbone_path(params.pretrain.out_dir) if weights == "pretrain" else Path(weights)
    key["backbone"] = sha256_file(path) if weights not in ("hub", "none") and path.is_file() else str(weights)
    return key


def _cell_key(recipe: dict[str, Any], inputs: dict[str, str]) -> str:
    """Hash of everything a cell's numbers depend on: its recipe (the cell's params) and input files."""
    return sha256_json({"format": CELL_FORMAT, "recipe": recipe, "inputs": inputs}, compact=False, length=20)


def _reusable(path: Path, key: str) -> dict[str, Any] | None:
    """The cell record at ``path`` when it was made from exactly these inputs (else None: train again)."""
    from lpt.utils import JsonFileError

    if not path.is_file():
        return None
    try:
        cell = read_json(path, "compare cell")
    except JsonFileError:
        return None
    return cell if cell.get("key") == key and isinstance(cell.get("metrics"), dict) else None


# ------------------------------------------------------------------------------------- one method
def _split(params: Params, method: str, key: str) -> tuple[int, int]:
    """``train.phase1.<key>, train.phase2.<key>`` for a two-phase method; their sum in phase 1 for the rest."""
    first, second = getattr(params.train.phase1, key), getattr(params.train.phase2, key)
    return (first, second) if get_method(method).trains_phase2 else (first + second, 0)


def budget(params: Params, method: str) -> tuple[int, int]:
    """Epochs ``(phase 1, phase 2)`` of ``method`` under the common budget ``phase1.epochs + phase2.epochs``."""
    return _split(params, method, "epochs")


def _floor_note(min_steps1: int, min_steps2: int) -> str:
    """The page's words for the step floor (nothing when there is none)."""
    if not min_steps1 + min_steps2:
        return ""
    return f", at least {min_steps1 + min_steps2} optimizer steps (LPT: {min_steps1} + {min_steps2})"


def _cell_params(params: Params, method: str, seed: int) -> Params:
    root = compare_cell_dir(params, method, seed)
    epochs1, _ = budget(params, method)
    min_steps1, _ = _split(params, method, "min_steps")  # the step floor is shared out like the epochs
    return _with_overrides(params, {
        "seed": int(seed),
        "train.method": method,
        "train.phase1.epochs": epochs1,
        "train.phase1.min_steps": min_steps1,
        "train.out_dir": str(root / "models"),
        "evaluate.out_dir": str(root / "eval"),
        # the gate does not decide a comparison; each method is reported as it is
        "evaluate.gate.min_overall": 0.0,
        "evaluate.gate.min_few": 0.0,
        "evaluate.gate.max_drop_vs_probe": None,
        "evaluate.gate.pixel_baselines": [],  # the page has its own pixel rows
    })


def inference_ms_per_image(model: Any, input_size: int, batch: int = 32, reps: int = 5, device: str = "cpu") -> float:
    """Median wall time of the model's eval forward per image (ms), ``reps`` timed batches after one warm-up.

    The input is random: no method's compute depends on the pixel values. The figure depends on the
    machine, its load and the thread count; compare rows measured in the same run only.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, input_size, input_size, generator=gen).to(device)
    model.eval()
    times = []
    with torch.inference_mode():
        model(x)  # warm-up: allocator, lazy inits
        for _ in range(reps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            model(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(times) / batch


def run_cell(params: Params, method: str, seed: int, inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """Train (both phases), evaluate and time one method at one seed; reuse the cell if already done.

    Args:
        params: the base params (data split and backbone as ingested/pretrained for them).
        method: a name of :data:`METHODS`.
        seed: the training seed of this cell.
        inputs: :func:`_inputs_key` of ``params`` (computed when None).

    Returns:
        The cell record written to ``cell.json``: ``metrics`` (test metrics + ``val_acc`` + parameter counts),
        ``train_seconds`` (both phases, including validation), ``infer_ms_per_image``, ``epochs``,
        ``reused`` (True when read back from an earlier run).
    """
    from lpt.evaluate import run_evaluate
    from lpt.model.lpt import load_trained_model
    from lpt.train import run_phase
    from lpt.utils import resolve_device, seed_everything

    mp = _cell_params(params, method, seed)
    key = _cell_key(mp.to_dict(), inputs if inputs is not None else _inputs_key(params))
    path = compare_cell_dir(params, method, seed) / CELL_FILE
    cell = _reusable(path, key)
    if cell is not None:
        print(f"[compare] {params.data.source} / {method} / seed {seed}: reused {path}", flush=True)
        return {**cell, "reused": True}
    # training rewrites this cell's models: an earlier run's record must not outlive them if this run dies
    path.unlink(missing_ok=True)
    started = time.perf_counter()
    val_acc = None
    for phase in (1, 2):  # phase 2 of the one-phase methods copies the phase-1 model
        res = run_phase(mp, phase) or {}
        if res.get("best_val_acc") is not None:
            val_acc = res["best_val_acc"]
    train_seconds = time.perf_counter() - started
    result = run_evaluate(mp)
    metrics = dict(result.metrics)
    if val_acc is not None:
        metrics["val_acc"] = val_acc
    device = resolve_device(mp.train.device)
    seed_everything(mp.seed)  # backbone.weights=none: the same random backbone as training
    model, _ = load_trained_model(mp, device=device)
    infer_ms = inference_ms_per_image(model, mp.transforms.input_size, device=device)
    cell = {"format": CELL_FORMAT, "key": key, "method": method, "seed": int(seed), "epochs": list(budget(params, method)),
            "metrics": metrics, "train_seconds": train_seconds, "infer_ms_per_image": infer_ms}
    write_json_atomic(path, cell)
    print(f"[compare] {params.data.source} / {method} / seed {seed}: overall "
          f"{format_value(metrics['overall'], pct=True)} few {format_value(metrics['few'], pct=True)} (test, %); "
          f"train {train_seconds:.0f} s, {infer_ms:.3f} ms/img", flush=True)
    return {**cell, "reused": False}


def run_baseline(params: Params, name: str, inputs: dict[str, str] | None = None, data: Any = None) -> dict[str, Any]:
    """Fit and test one pixel baseline (:mod:`lpt.baselines`) once for ``data.source``; same record as
    :func:`run_cell` (``seed`` None, ``epochs`` None)."""
    from lpt.baselines import LOGREG_L2_GRID, run_pixel_baseline

    recipe = {"baseline": name, "grid": list(LOGREG_L2_GRID), "data": str(params.data.out_dir),
              "transforms": params.transforms.model_dump(mode="json"), "ece_bins": params.evaluate.ece_bins}
    key = _cell_key(recipe, inputs if inputs is not None else _inputs_key(params))
    path = compare_root(params) / name / CELL_FILE
    cell = _reusable(path, key)
    if cell is not None:
        print(f"[compare] {params.data.source} / {name}: reused {path}", flush=True)
        return {**cell, "reused": True}
    result = run_pixel_baseline(name, params, data)
    cell = {"format": CELL_FORMAT, "key": key, "method": name, "seed": None, "epochs": None, "metrics": result.metrics,
            "train_seconds": result.fit_seconds, "infer_ms_per_image": result.infer_ms_per_image, "detail": result.detail}
    write_json_atomic(path, cell)
    print(f"[compare] {params.data.source} / {name}: overall {format_value(result.metrics['overall'], pct=True)} "
          f"few {format_value(result.metrics['few'], pct=True)} (test, %)", flush=True)
    return {**cell, "reused": False}


# --------------------------------------------------------------------------------------- statistics
def aggregate(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample std (None for one value) and count of every numeric metric and cost over ``cells``.

    Returns:
        ``{"n": seeds, "seeds": [...], "mean": {...}, "std": {...}, "epochs": ..., "reused": count}``; the
        keys of ``mean``/``std`` are the metrics plus ``train_seconds`` and ``infer_ms_per_image``.
    """
    values: dict[str, list[float]] = {}
    for cell in cells:
        flat = {**cell["metrics"], "train_seconds": cell["train_seconds"], "infer_ms_per_image": cell["infer_ms_per_image"]}
        for k, v in flat.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v):
                values.setdefault(k, []).append(float(v))
    mean = {k: statistics.fmean(v) for k, v in values.items()}
    std = {k: (statistics.stdev(v) if len(v) > 1 else None) for k, v in values.items()}
    return {"n": len(cells), "seeds": [c.get("seed") for c in cells], "mean": mean, "std": std,
            "epochs": cells[0].get("epochs") if cells else None, "reused": sum(bool(c.get("reused")) for c in cells)}


def call_difference(a: dict[str, Any], b: dict[str, Any], metric: str) -> dict[str, Any]:
    """Row ``a`` vs row ``b`` (aggregates) on ``metric``: difference of means, spread, and the call.

    The spread is ``sqrt(sd_a^2 + sd_b^2)`` (the standard deviation of a difference of two independent
    per-seed values; a deterministic row contributes 0). ``|diff| <= spread`` is a tie. Without any spread
    (one seed on both sides) nothing is called.

    Returns:
        ``{"diff", "spread", "call"}`` with ``call`` one of ``win``, ``loss``, ``tie``, ``not called``, ``n/a``.
    """
    ma, mb = a["mean"].get(metric), b["mean"].get(metric)
    if ma is None or mb is None:
        return {"diff": None, "spread": None, "call": "n/a"}
    diff = ma - mb
    sa = a["std"].get(metric) if a["n"] > 1 else None
    sb = b["std"].get(metric) if b["n"] > 1 else None
    if sa is None and sb is None:
        return {"diff": diff, "spread": None, "call": "not called"}
    spread = math.sqrt((sa or 0.0) ** 2 + (sb or 0.0) ** 2)
    call = "tie" if abs(diff) <= spread else ("win" if diff > 0 else "loss")
    return {"diff": diff, "spread": spread, "call": call}


def verdict_lines(rows: dict[str, dict[str, Any]], reference: str = REFERENCE,
                  metrics: Sequence[str] = CALLED_METRICS) -> list[str]:
    """One Markdown bullet per other row: the reference's difference on each metric and its call."""
    if reference not in rows:
        return [f"- no `{reference}` row: nothing to compare with"]
    ref = rows[reference]
    out = []
    for name, row in rows.items():
        if name == reference:
            continue
        parts = []
        for metric in metrics:
            c = call_difference(ref, row, metric)
            if c["diff"] is None:
                parts.append(f"{metric}: n/a")
                continue
            spread = "no spread (one seed)" if c["spread"] is None else f"spread ±{100 * c['spread']:.2f}"
            call = {"win": "**win**", "loss": "**loss**", "tie": "tie (within the spread)",
                    "not called": "not called"}[c["call"]]
            parts.append(f"{metric} {100 * c['diff']:+.2f} points ({spread}): {call}")
        out.append(f"- vs {_label(name)} (`{name}`): " + "; ".join(parts))
    return out


# ------------------------------------------------------------------------------------------ tables
def _pm(row: dict[str, Any], key: str, pct: bool = True, digits: int = 2) -> str:
    m, s = row["mean"].get(key), row["std"].get(key)
    if m is None:
        return "–"
    scale = 100.0 if pct else 1.0
    text = f"{scale * m:.{digits}f}"
    return text + (f" ± {scale * s:.{digits}f}" if s is not None else "")


def accuracy_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: test accuracy (%) per row, mean ± std over seeds."""
    lines = ["| method | seeds | " + " | ".join(c for _, c in ACCURACY_COLUMNS) + " |",
             "|---" * (len(ACCURACY_COLUMNS) + 2) + "|"]
    for name, row in rows.items():
        seeds = "–" if row["seeds"] == [None] else str(row["n"])
        lines.append(f"| {_label(name)} | {seeds} | " + " | ".join(_pm(row, k) for k, _ in ACCURACY_COLUMNS) + " |")
    return "\n".join(lines)


TTE_COLUMNS = (("tte_overall", "overall"), ("tte_many", "many"), ("tte_medium", "medium"), ("tte_few", "few (<20)"),
               ("tte_ece", "ECE"))
"""The five-crop test-time ensembling columns (``evaluate.tte: five_crop``): a table of their own."""


def tte_table(rows: dict[str, dict[str, Any]]) -> str | None:
    """Markdown: the test metrics under five-crop test-time ensembling (%), or None when no row has them.

    Kept apart from :func:`accuracy_table` so a TTE figure is never read as a single-crop one; rows
    without TTE (the pixel baselines) are left out.
    """
    if not any("tte_overall" in row["mean"] for row in rows.values()):
        return None
    lines = ["| method | seeds | " + " | ".join(c for _, c in TTE_COLUMNS) + " |",
             "|---" * (len(TTE_COLUMNS) + 2) + "|"]
    for name, row in rows.items():
        if "tte_overall" not in row["mean"]:
            continue
        lines.append(f"| {_label(name)} | {row['n']} | " + " | ".join(_pm(row, k) for k, _ in TTE_COLUMNS) + " |")
    return "\n".join(lines)


def _epochs(row: dict[str, Any]) -> str:
    e = row.get("epochs")
    if not e:
        return "–"
    return f"{e[0]} + {e[1]}" if e[1] else str(e[0])


def cost_table(rows: dict[str, dict[str, Any]], plain: str = PROBE_METHOD) -> str:
    """Markdown: trainable parameters, epochs, train wall time and inference cost per row.

    ``× plain`` divides a row's inference time by the ``plain`` row's (the frozen backbone + a head: one
    plain ViT forward), both measured in this run.
    """
    base = rows.get(plain, {}).get("mean", {}).get("infer_ms_per_image")
    lines = ["| method | trainable params | % of backbone | epochs | train time (s) | inference (ms/img) | × plain forward |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        mean = row["mean"]
        params = mean.get("trainable_params")
        share = mean.get("trainable_share")
        infer = mean.get("infer_ms_per_image")
        ratio = f"{infer / base:.2f}" if infer is not None and base else "–"
        lines.append(f"| {_label(name)} | {'–' if params is None else f'{params:,.0f}'} | "
                     f"{'–' if share is None else f'{100 * share:.2f}'} | {_epochs(row)} | "
                     f"{_pm(row, 'train_seconds', pct=False, digits=1)} | {_pm(row, 'infer_ms_per_image', pct=False, digits=3)} | "
                     f"{ratio} |")
    return "\n".join(lines)


def compare_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table (values in %) of single-run metrics per method (one value per cell, no spread)."""
    head = "| method | " + " | ".join(c for _, c in ACCURACY_COLUMNS) + " |"
    lines = [head, "|---" * (len(ACCURACY_COLUMNS) + 1) + "|"]
    for method, m in rows.items():
        lines.append(f"| {method} | " + " | ".join(format_value(m.get(k), pct=True) for k, _ in ACCURACY_COLUMNS)
                     + " |")
    return "\n".join(lines)


def target_verdict(rows: dict[str, dict[str, Any]]) -> str:
    """The comparison target on mean metrics: LPT few >= linear probe few + 10 points and LPT overall >= linear
    probe overall (the CE probe: the project's original floor; the verdict lines compare every row)."""
    if REFERENCE not in rows or PROBE_METHOD not in rows:
        return f"target check needs both `{REFERENCE}` and `{PROBE_METHOD}` rows"
    lpt, lp = rows[REFERENCE], rows[PROBE_METHOD]
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


# --------------------------------------------------------------------------------------------- run
def _check_rows(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in ALL_ROWS]
    if unknown or not methods:
        raise CompareError(f"unknown methods {unknown}; choose from {', '.join(ALL_ROWS)}")
    return [m for m in ALL_ROWS if m in methods]  # table order, whatever order they were given in


def run_compare(params: Params, methods: list[str], out: Path | None = None,
                seeds: Sequence[int] | None = None) -> Path:
    """Train and test each method for every seed in the same harness; write the tables of one data source.

    Args:
        params: the base params (``data.source`` picks the dataset; ``seed`` is the split's and backbone's).
        methods: names from :data:`ALL_ROWS` (table order is the registry's).
        out: Markdown path; default ``<evaluate.out_dir>/compare/<source>/table.md`` (+ ``table.json``).
        seeds: training seeds; default ``[params.seed]``.

    Returns:
        The path of the written Markdown section.

    Raises:
        CompareError: an unknown method, an empty list or repeated seeds.
    """
    rows_wanted = _check_rows(methods)
    seeds = [int(s) for s in (seeds if seeds is not None else [params.seed])]
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompareError(f"seeds must be distinct integers, got {seeds}")
    _ensure_inputs(params, needs_backbone=any(name in METHOD_REGISTRY for name in rows_wanted))
    inputs = _inputs_key(params)
    rows: dict[str, dict[str, Any]] = {}
    pixels = None
    for name in rows_wanted:
        if name in PIXEL_BASELINES:
            if pixels is None:
                from lpt.baselines import load_pixels

                pixels = load_pixels(params)
            cells = [run_baseline(params, name, inputs, pixels)]
        else:
            cells = [run_cell(params, name, seed, inputs) for seed in seeds]
        rows[name] = {**aggregate(cells), "cells": cells}
    out = Path(out) if out is not None else compare_root(params) / "table.md"
    with atomic_path(out) as tmp:
        tmp.write_text(_compare_section(params, rows, seeds))
    write_json_atomic(out.with_suffix(".json"), {"source": params.data.source, "seeds": seeds, "rows": rows})
    return out


def _compare_section(params: Params, rows: dict[str, dict[str, Any]], seeds: Sequence[int]) -> str:
    p1, p2 = params.train.phase1, params.train.phase2
    num = next((r["mean"].get("num_samples") for r in rows.values() if r["mean"].get("num_samples")), None)
    reused = sum(r["reused"] for r in rows.values())
    total = sum(r["n"] for r in rows.values())
    means = {name: r["mean"] for name, r in rows.items()}
    seed_text = f"seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"one seed ({seeds[0]}): no spread"
    lines = [
        f"### {params.data.source} (imbalance ratio {params.data.imbalance_ratio:g})",
        "",
        f"Test split, {'?' if num is None else int(num)} images; top-1 accuracy in %, mean ± standard deviation "
        f"over {seed_text}. Backbone `{params.backbone.name}` (weights: {params.backbone.weights}), frozen and "
        f"the same for every row; data split fixed (seed {params.seed}); the seed changes initialisation, "
        f"sampling and augmentation. Budget: {p1.epochs + p2.epochs} epochs per method (LPT: {p1.epochs} + "
        f"{p2.epochs}){_floor_note(p1.min_steps, p2.min_steps)}. Checkpoints selected on the validation split only. Pixel rows: no backbone, no seed.",
        "",
        accuracy_table(rows),
        "",
        "Cost (same run, same machine; times depend on the machine and its load, ratios less so):",
        "",
        cost_table(rows),
        "",
        f"LPT against every other row (difference of means; a tie when within the spread "
        f"sqrt(sd² + sd²) over seeds):",
        "",
        *verdict_lines(rows),
        "",
        f"Target (LPT vs the CE linear probe, means): {target_verdict(means)}.",
        "",
    ]
    tte = tte_table(rows)
    if tte is not None:
        with_tte = {name: row for name, row in rows.items() if "tte_overall" in row["mean"]}
        lines += [
            "With test-time ensembling (`evaluate.tte: five_crop`, LIFT's: the shorter side resized to input size "
            "x 248/224, four corner crops and the centre, cosines averaged); the same trained models as above, a "
            "separate measurement, never mixed with the single-crop table (the gate and the export are single-crop):",
            "",
            tte,
            "",
            "LPT against every other row, both with TTE:",
            "",
            *verdict_lines(with_tte, metrics=("tte_overall", "tte_few")),
            "",
        ]
    if reused:
        lines += [f"{reused} of {total} cells were reused from an earlier run with the same inputs (their times "
                  "come from that run).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- results page
NOTES_MARKER = "<!-- notes below are kept when `lpt compare --sources` regenerates this file -->"
_NOTES_STAMP = re.compile(r"<!-- notes written for tables ([^\s>]+) -->")
_STALE_START = "<!-- stale-notes warning (managed by lpt compare) -->"
_STALE_END = "<!-- /stale-notes warning -->"
README_START = "<!-- results table: generated by `lpt compare --readme` -->"
README_END = "<!-- /results table -->"


def _notes_with_status(notes: str, tables_sha: str) -> str:
    """``notes`` with the managed warning removed, and put back when the notes were written for other tables."""
    notes = re.sub(re.escape(_STALE_START) + r".*?" + re.escape(_STALE_END) + r"\n?", "", notes, flags=re.S)
    stamp = _NOTES_STAMP.search(notes)
    if stamp is not None and stamp.group(1) == tables_sha:
        return notes
    written_for = f"tables `{stamp.group(1)}`" if stamp else "tables without a recorded hash"
    warning = (f"{_STALE_START}\n> **Stale notes:** they were written for {written_for}; the tables above are "
               f"`{tables_sha}`. Rewrite them from the tables and verdicts above, then set the stamp line to "
               f"`<!-- notes written for tables {tables_sha} -->`.\n{_STALE_END}\n")
    return "\n" + warning + notes.lstrip("\n")


def run_results(params: Params, methods: list[str], sources: list[str], out: Path,
                seeds: Sequence[int] | None = None, readme: Path | None = None) -> Path:
    """Run :func:`run_compare` for several data sources and assemble one Markdown page.

    Non-default sources get their own shard folder (``data/compare/<source>/shards``); the backbone and
    its pretrain checkpoint stay those of ``params`` so every source uses the same frozen backbone.
    Everything below :data:`NOTES_MARKER` in an existing page is kept; when the notes carry a stamp
    (``<!-- notes written for tables SHA -->``) other than the new tables' hash, a warning that they are
    stale is put at their top (and removed again once the stamp matches).

    Args:
        params: base params.
        methods: rows for every table (:data:`ALL_ROWS`).
        sources: ``data.source`` values, e.g. ``["synthetic", "fashion_mnist"]``.
        out: the Markdown file (e.g. ``docs/results.md``).
        seeds: training seeds (default ``[params.seed]``).
        readme: a file with the :data:`README_START` / :data:`README_END` block to refresh with
            :func:`readme_table` (e.g. ``README.md``).

    Returns:
        ``out``.
    """
    sections, data = [], {}
    for source in sources:
        sp = params
        if source != params.data.source:
            shards = Path("data/compare") / source / "shards"
            sp = _with_overrides(params, {"data.source": source, "data.out_dir": str(shards)})
        table = run_compare(sp, methods, None, seeds)
        sections.append(table.read_text())
        data[source] = json.loads(table.with_suffix(".json").read_text())
    seeds_text = ",".join(str(s) for s in (seeds if seeds is not None else [params.seed]))
    tte = f" -S evaluate.tte={params.evaluate.tte}" if params.evaluate.tte else ""  # its table is in the page
    command = (f"lpt compare --sources {','.join(sources)} --seeds {seeds_text}{tte} --out {out}"
               + (f" --readme {readme}" if readme is not None else ""))
    body = "\n".join(sections)
    tables_sha = hashlib.sha256(body.encode()).hexdigest()[:12]
    notes = "\n"
    if Path(out).is_file() and NOTES_MARKER in Path(out).read_text():  # hand-written analysis survives a rerun
        notes = Path(out).read_text().split(NOTES_MARKER, 1)[1]
    text = "\n".join([
        "# Results: LPT vs baselines in one harness",
        "",
        f"Generated by `{command}` (see docs/evaluation.md). Every method: same frozen backbone, data split and "
        "epoch budget; test-split top-1 accuracy (%) with many/medium/few by training count (standard: few < 20; "
        "authors': few <= 20), mean ± std over the training seeds. Train and inference times were measured in the "
        "same run and depend on the machine and its load.",
        "",
        body,
        f"Tables `{tables_sha}`.",
        "",
        NOTES_MARKER + _notes_with_status(notes, tables_sha),
    ])
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    if readme is not None:
        update_readme(readme, readme_table(data, command))
    return Path(out)


_SOURCE_NAMES = {"synthetic": "synthetic", "fashion_mnist": "Fashion-MNIST-LT"}


def readme_table(results: dict[str, dict[str, Any]], command: str) -> str:
    """The README's compact table: overall and few (mean ± std) per source, trainable parameters and the
    inference cost relative to a plain forward (the first source's run)."""
    sources = list(results)
    first = results[sources[0]]["rows"]
    names = list(first)
    head = "| method | " + " | ".join(f"{_SOURCE_NAMES.get(s, s)} overall | few" for s in sources) \
        + " | trainable params | inference × plain |"
    lines = [head, "|---" * (2 * len(sources) + 3) + "|"]
    base = first.get(PROBE_METHOD, {}).get("mean", {}).get("infer_ms_per_image")
    for name in names:
        cells = []
        for s in sources:
            row = results[s]["rows"].get(name)
            cells += [_pm(row, "overall"), _pm(row, "few")] if row else ["–", "–"]
        mean = first[name]["mean"]
        params = mean.get("trainable_params")
        infer = mean.get("infer_ms_per_image")
        label = f"**{_label(name)}**" if name == REFERENCE else _label(name)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'–' if params is None else f'{params:,.0f}'} | "
                     f"{f'{infer / base:.2f}' if infer is not None and base else '–'} |")
    seeds = results[sources[0]]["seeds"]
    return "\n".join([*lines, "", f"Mean ± std over seeds {', '.join(map(str, seeds))}; regenerate with "
                      f"`{command}`."])


def update_readme(path: Path, table: str) -> Path:
    """Replace the block between :data:`README_START` and :data:`README_END` in ``path`` with ``table``.

    Raises:
        CompareError: the file lacks the markers (the message says which to add).
    """
    text = Path(path).read_text()
    if README_START not in text or README_END not in text:
        raise CompareError(f"{path}: no results block; add the lines {README_START!r} and {README_END!r} where the "
                         "table goes")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with atomic_path(path) as tmp:
        tmp.write_text(head + README_START + "\n" + table + "\n" + README_END + tail)
    return Path(path)
