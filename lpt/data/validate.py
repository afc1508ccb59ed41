"""``lpt validate``: Great Expectations checks over a table of the shards.

Three tables are built from the shards (never from the source): one row per image (key, split, label,
width, height, channels, bytes, decodes_ok, meta_ok, content hash, shared_with_train), one row per
(split, class) with observed and manifest counts, and one row per shard with its actual and manifest
sha256/count. Each table is a dataframe asset of an ephemeral GX context, validated whole with
``batch.validate(suite)``. Results go to ``validate.report_dir``: ``report.md`` for people and
``summary.json`` (a flat list of ``{expectation, column, success, unexpected_count, details}``) for tools.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from lpt.data.longtail import profile_applies
from lpt.data.reader import IMAGE_EXTS, iter_shard_samples, load_manifest
from lpt.utils import atomic_path, sha256_file, write_json_atomic

__all__ = ["ValidationResult", "run_validation", "image_table", "class_table", "shard_table"]

TARGET_SPLITS = ("train", "val", "test")


@dataclass
class ValidationResult:
    """Outcome of ``run_validation``: ``failures`` names every failed check (empty when ``success``)."""

    success: bool
    failures: list[str]
    report_path: Path
    summary_path: Path
    checks: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ tables
def _image_row(key: str, split: str, parts: dict[str, bytes]) -> dict[str, Any]:
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    data = parts.get(ext, b"") if ext else b""
    row = {"key": key, "split": split, "label": -1, "width": 0, "height": 0, "channels": 0, "bytes": len(data),
           "decodes_ok": False, "meta_ok": False, "content_hash": f"undecodable:{split}:{key}"}
    try:
        row["label"] = int(parts["cls"])
        row["meta_ok"] = json.loads(parts["json"])["label"] == row["label"]
    except (KeyError, ValueError, TypeError):
        pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            row.update(width=im.width, height=im.height, channels=len(im.getbands()), decodes_ok=True)
            pixels = im.convert("RGB").tobytes()
        row["content_hash"] = hashlib.sha256(pixels).hexdigest()
    except (OSError, ValueError, SyntaxError):
        pass
    return row


def image_table(shards_dir: Path, manifest: dict):
    """One row per image of every shard present on disk (the manifest only names the splits)."""
    import pandas as pd

    rows = []
    for split in manifest["splits"]:
        for path in sorted((shards_dir / split).glob(f"{split}-*.tar")):
            try:
                samples = list(iter_shard_samples(path))
            except (OSError, ValueError, UnicodeDecodeError):
                continue  # an unreadable shard shows up as a sha256/count mismatch in the shard table
            rows += [_image_row(k, split, p) for k, p in tqdm(samples, desc=f"validate {path.name}", leave=False,
                                                                 disable=None, mininterval=1.0)]
    table = pd.DataFrame(rows, columns=["key", "split", "label", "width", "height", "channels", "bytes",
                                        "decodes_ok", "meta_ok", "content_hash"])
    train_hashes = set(table.loc[table["split"] == "train", "content_hash"])
    table["shared_with_train"] = (table["split"] != "train") & table["content_hash"].isin(train_hashes)
    return table


def class_table(images, manifest: dict):
    """One row per (target split, class): observed count and, for train, the manifest count."""
    import pandas as pd

    num_classes = manifest["num_classes"]
    rows = []
    for split in TARGET_SPLITS:
        if split not in manifest["splits"]:
            continue
        observed = images.loc[images["split"] == split, "label"].value_counts()
        for c in range(num_classes):
            expected = manifest["train_counts"][c] if split == "train" else int(observed.get(c, 0))
            rows.append({"split": split, "label": c, "count": int(observed.get(c, 0)), "expected": int(expected)})
    return pd.DataFrame(rows, columns=["split", "label", "count", "expected"])


def shard_table(shards_dir: Path, manifest: dict, images):
    """One row per shard listed in the manifest or present on disk: actual vs manifest sha256 and count."""
    import pandas as pd

    rows, listed = [], set()
    split_counts = images["split"].value_counts()
    for split, info in manifest["splits"].items():
        count = int(split_counts.get(split, 0))
        for shard in info["shards"]:
            path = shards_dir / split / shard["name"]
            listed.add(path)
            actual = sha256_file(path) if path.is_file() else "missing"
            rows.append({"shard": f"{split}/{shard['name']}", "sha256": actual, "manifest_sha256": shard["sha256"],
                         "split_count": count, "manifest_split_count": info["count"]})
        for path in sorted((shards_dir / split).glob(f"{split}-*.tar")):
            if path not in listed:
                rows.append({"shard": f"{split}/{path.name}", "sha256": sha256_file(path), "manifest_sha256": "unlisted",
                             "split_count": 0, "manifest_split_count": info["count"]})
    return pd.DataFrame(rows, columns=["shard", "sha256", "manifest_sha256", "split_count", "manifest_split_count"])


# ------------------------------------------------------------------------------------------ suites
def _suites(params, manifest: dict) -> dict[str, list]:
    """Expectations per table; each carries a ``description`` used in the report."""
    import great_expectations as gx

    E = gx.expectations
    C = manifest["num_classes"]
    target = 'split != "source"'
    images = [
        E.ExpectColumnValuesToBeUnique(column="key", description="sample keys are unique"),
        E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=C - 1, row_condition=target,
                                        condition_parser="pandas", description=f"labels within [0, {C})"),
        E.ExpectColumnValuesToBeInSet(column="decodes_ok", value_set=[True], description="every image decodes"),
        E.ExpectColumnValuesToBeInSet(column="meta_ok", value_set=[True], description="json label equals cls"),
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[3], description="images are RGB"),
    ]
    if "source" in manifest["splits"]:
        s = manifest["splits"]["source"]["num_classes"]
        images.append(E.ExpectColumnValuesToBeBetween(
            column="label", min_value=0, max_value=s - 1, row_condition='split == "source"', condition_parser="pandas",
            description=f"source-split labels within [0, {s})"))
    if manifest.get("image_size"):
        h, w = manifest["image_size"]
        images += [E.ExpectColumnValuesToBeBetween(column="height", min_value=h, max_value=h, description=f"height is {h}"),
                   E.ExpectColumnValuesToBeBetween(column="width", min_value=w, max_value=w, description=f"width is {w}")]
    else:
        images += [E.ExpectColumnValuesToBeBetween(column=c, min_value=1, description=f"{c} >= 1") for c in ("height", "width")]
    if params.validate_.check_test_overlap:
        images.append(E.ExpectColumnValuesToBeInSet(
            column="shared_with_train", value_set=[False], row_condition='split == "test"', condition_parser="pandas",
            description="no test image also in train (pixel hash)"))
    classes = [E.ExpectColumnPairValuesToBeEqual(column_A="count", column_B="expected", row_condition='split == "train"',
                                                 condition_parser="pandas", description="train per-class counts equal the manifest")]
    for split in ("val", "test"):
        if split in manifest["splits"]:
            classes.append(E.ExpectColumnValuesToBeBetween(
                column="count", min_value=1, row_condition=f'split == "{split}"', condition_parser="pandas",
                description=f"every class present in {split}"))
    shards = [
        E.ExpectColumnPairValuesToBeEqual(column_A="sha256", column_B="manifest_sha256", description="shard sha256 equals the manifest"),
        E.ExpectColumnPairValuesToBeEqual(column_A="split_count", column_B="manifest_split_count",
                                          description="split image counts equal the manifest"),
    ]
    stats = []
    if profile_applies(params.data):
        ir, tol = params.data.imbalance_ratio, params.validate_.imbalance_tolerance
        stats.append(E.ExpectColumnValuesToBeBetween(
            column="imbalance_ratio", min_value=ir * (1 - tol), max_value=ir * (1 + tol),
            description=f"train imbalance ratio {ir:g} within {tol:.0%}"))
    stats.append(E.ExpectColumnValuesToBeBetween(column="skipped", min_value=0, max_value=0,
                                                 description="no skipped items (data.skip_bad)", meta={"warn_only": True}))
    return {"images": images, "classes": classes, "shards": shards, "stats": stats}


def _stats_table(classes, manifest: dict):
    import pandas as pd

    train = classes.loc[classes["split"] == "train", "count"]
    lo = int(train.min()) if len(train) else 0
    ratio = float(train.max()) / lo if lo > 0 else float("inf")
    return pd.DataFrame([{"imbalance_ratio": ratio, "skipped": int(manifest.get("skipped", {}).get("count", 0))}])


def _run_suites(tables: dict, suites: dict) -> list[dict[str, Any]]:
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    except (ImportError, AttributeError):  # cosmetic only
        pass
    source = context.data_sources.add_pandas("shards")
    checks = []
    for name, expectations in suites.items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": tables[name]})
        result = batch.validate(gx.ExpectationSuite(name=f"lpt_{name}", expectations=expectations))
        checks += [_check_row(name, r) for r in result.results]
    return checks


def _check_row(table: str, r) -> dict[str, Any]:
    cfg = r.expectation_config
    res = r.result or {}
    column = cfg.kwargs.get("column") or f"{cfg.kwargs.get('column_A')}={cfg.kwargs.get('column_B')}"
    examples = res.get("partial_unexpected_list") or []
    details = cfg.description or cfg.type
    if examples:
        details += f"; e.g. {[_plain(x) for x in examples[:5]]}"
    if r.exception_info and r.exception_info.get("raised_exception"):
        details += f"; error: {r.exception_info.get('exception_message')}"
    warn_only = bool((cfg.meta or {}).get("warn_only"))
    return {"expectation": cfg.type, "table": table, "column": column, "success": bool(r.success),
            "unexpected_count": int(res.get("unexpected_count") or 0), "details": details, "warn_only": warn_only}


def _plain(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


# ------------------------------------------------------------------------------------------ report
def _report(checks: list[dict], counts: dict, success: bool, shards_dir: Path) -> str:
    lines = [f"# Data validation: {'PASSED' if success else 'FAILED'}", "",
             f"Shards: `{shards_dir}`. Images per split: " + ", ".join(f"{k} {v}" for k, v in counts["splits"].items()),
             f"({counts['images']} images, {counts['shards']} shards, {counts['classes']} classes).", "",
             "| | check | table | column | unexpected | expectation |", "|---|---|---|---|---|---|"]
    for c in checks:
        mark = "ok" if c["success"] else ("warn" if c["warn_only"] else "FAIL")
        lines.append(f"| {mark} | {c['details'].replace('|', '/')} | {c['table']} | `{c['column']}` | "
                     f"{c['unexpected_count']} | `{c['expectation']}` |")
    return "\n".join(lines) + "\n"


def run_validation(params) -> ValidationResult:
    """Validate the shards of ``data.out_dir`` against their manifest and the params.

    Args:
        params: validated :class:`lpt.config.Params`.

    Returns:
        success, the failed checks, and the paths of ``report.md`` and ``summary.json``.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    shards_dir, report_dir = Path(params.data.out_dir), Path(params.validate_.report_dir)
    report_path, summary_path = report_dir / "report.md", report_dir / "summary.json"
    try:
        manifest = load_manifest(params.data.out_dir)
    except (FileNotFoundError, json.JSONDecodeError) as err:
        return _write_outcome([], {"images": 0, "shards": 0, "classes": 0, "splits": {}}, [f"manifest: {err}"],
                              shards_dir, report_path, summary_path)
    images = image_table(shards_dir, manifest)
    classes = class_table(images, manifest)
    tables = {"images": images, "classes": classes, "shards": shard_table(shards_dir, manifest, images),
              "stats": _stats_table(classes, manifest)}
    checks = _run_suites(tables, _suites(params, manifest))
    counts = {"images": len(images), "shards": len(tables["shards"]), "classes": manifest["num_classes"],
              "splits": {k: int(v) for k, v in images["split"].value_counts().sort_index().items()}}
    failures = [f"{c['details']} ({c['table']}.{c['column']}: {c['unexpected_count']} unexpected)"
                for c in checks if not c["success"] and not c["warn_only"]]
    return _write_outcome(checks, counts, failures, shards_dir, report_path, summary_path)


def _write_outcome(checks, counts, failures, shards_dir, report_path: Path, summary_path: Path) -> ValidationResult:
    success = not failures
    report_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(report_path) as tmp:
        text = _report(checks, counts, success, shards_dir)
        if failures and not checks:
            text += "\n" + "\n".join(f"- {f}" for f in failures) + "\n"
        tmp.write_text(text)
    write_json_atomic(summary_path, {"success": success, "counts": counts, "failures": failures, "expectations": checks})
    return ValidationResult(success=success, failures=failures, report_path=report_path, summary_path=summary_path,
                            checks=checks)
