"""``lpt validate``: Great Expectations checks over tables of the shards.

Tables are built from the shards (never from the source): one row per image (key, split, shard, label,
width, height, channels, bytes, decodes_ok, meta_ok, pixel_range, content hash, shared_with_train), one
row per (split, class) with observed and manifest counts, one row per shard with its actual and manifest
sha256 and sample count, and one row per split with its image count. Each table is a dataframe asset of an
ephemeral GX context, validated whole with ``batch.validate(suite)``. Results go to
``validate.report_dir``: ``report.md`` for people and ``summary.json`` (a flat list of ``{expectation,
column, success, unexpected_count, details}``) for tools.

Shards are read like every reader reads them: each listed shard is read once, its sha256 and sample count
are compared with the manifest, and only the samples of shards that match go into the image table (the
shard table names each one that does not). Shard files the manifest does not list are not read; they
fail the shard table's checks. A failed check names the rows it concerns (shard file and sample key, or
split and class index and name), not just the offending values.
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
from lpt.data.reader import (DECODE_ERRORS, IMAGE_EXTS, MANIFEST_FILE, ShardError, load_manifest, parse_shard,
                             split_records)
from lpt.utils import atomic_path, sha256_file, write_json_atomic

__all__ = ["ValidationResult", "run_validation", "read_shards", "image_table", "class_table", "shard_table",
           "split_table"]

TARGET_SPLITS = ("train", "val", "test")
EXAMPLES = 5
"""Rows named per failed check."""


@dataclass
class ValidationResult:
    """Outcome of ``run_validation``: ``failures`` names every failed check (empty when ``success``)."""

    success: bool
    failures: list[str]
    report_path: Path
    summary_path: Path
    checks: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ tables
def _class_name(manifest: dict, split: str, label: int) -> str:
    names = manifest["splits"][split].get("class_names", manifest["class_names"]) if split in manifest["splits"] \
        else manifest["class_names"]
    return repr(names[label]) if 0 <= label < len(names) else "(no such class)"


def _image_row(key: str, split: str, shard: str, parts: dict[str, bytes]) -> dict[str, Any]:
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    data = parts.get(ext, b"") if ext else b""
    row = {"key": key, "split": split, "shard": shard, "label": -1, "width": 0, "height": 0, "channels": 0,
           "bytes": len(data), "decodes_ok": False, "meta_ok": False, "pixel_range": -1,
           "content_hash": f"undecodable:{split}:{key}"}
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
        rgb = np.frombuffer(pixels, dtype=np.uint8).reshape(-1, 3)
        row["pixel_range"] = int((rgb.max(axis=0) - rgb.min(axis=0)).max()) if len(rgb) else 0
        row["content_hash"] = hashlib.sha256(pixels).hexdigest()
    except DECODE_ERRORS:
        pass
    return row


def read_shards(shards_dir: Path, manifest: dict) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read every listed shard once and verify it; return ``(shard rows, image rows)``.

    A shard row holds the actual and manifest sha256 and sample count (``missing``/``unreadable`` when the
    file cannot be read); only shards whose sha256 and count match the manifest contribute image rows.
    Shard files present on disk but not listed get a row with ``manifest_sha256`` ``unlisted``.

    Raises:
        ShardError: a malformed shard record in the manifest.
    """
    shard_rows, image_rows = [], []
    for split in manifest["splits"]:
        records = split_records(manifest, split, shards_dir / MANIFEST_FILE)
        listed = set()
        for record in records:
            path = shards_dir / split / record["name"]
            listed.add(path.name)
            row = {"shard": f"{split}/{record['name']}", "sha256": "missing", "manifest_sha256": record["sha256"],
                   "count": -1, "manifest_count": record["count"], "verified": False}
            if path.is_file():
                row["sha256"], samples = _read_unverified(path)
                row["count"] = len(samples) if samples is not None else -1
                row["verified"] = row["sha256"] == record["sha256"] and row["count"] == record["count"]
                if row["verified"]:
                    image_rows += [_image_row(k, split, row["shard"], parts) for k, parts in
                                   tqdm(samples, desc=f"validate {path.name}", leave=False, disable=None,
                                        mininterval=1.0)]
            shard_rows.append(row)
        for path in sorted((shards_dir / split).glob("*.tar")):
            if path.name not in listed:
                shard_rows.append({"shard": f"{split}/{path.name}", "sha256": sha256_file(path),
                                   "manifest_sha256": "unlisted", "count": -1, "manifest_count": -1, "verified": False})
    return shard_rows, image_rows


def _read_unverified(path: Path) -> tuple[str, list | None]:
    """sha256 of the file's bytes and its samples (None when the tar does not parse), from one read."""
    try:
        raw = path.read_bytes()
    except OSError:
        return "unreadable", None
    try:
        samples = parse_shard(path, raw)
    except ShardError:
        samples = None
    return hashlib.sha256(raw).hexdigest(), samples


def image_table(shards_dir: Path, manifest: dict, image_rows: list[dict] | None = None):
    """One row per image of the verified shards (see :func:`read_shards`)."""
    import pandas as pd

    rows = image_rows if image_rows is not None else read_shards(shards_dir, manifest)[1]
    table = pd.DataFrame(rows, columns=["key", "split", "shard", "label", "width", "height", "channels", "bytes",
                                        "decodes_ok", "meta_ok", "pixel_range", "content_hash"])
    train_hashes = set(table.loc[table["split"] == "train", "content_hash"])
    table["shared_with_train"] = (table["split"] != "train") & table["content_hash"].isin(train_hashes)
    table["where"] = [f"{shard}:{key} (class {label} {_class_name(manifest, split, label)})"
                      for shard, key, split, label in zip(table["shard"], table["key"], table["split"], table["label"])]
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
            rows.append({"split": split, "label": c, "count": int(observed.get(c, 0)), "expected": int(expected),
                         "where": f"{split} class {c} {_class_name(manifest, split, c)}"})
    return pd.DataFrame(rows, columns=["split", "label", "count", "expected", "where"])


def shard_table(shards_dir: Path, manifest: dict, images, shard_rows: list[dict] | None = None):
    """One row per shard listed in the manifest or present on disk: actual vs manifest sha256 and count."""
    import pandas as pd

    rows = shard_rows if shard_rows is not None else read_shards(shards_dir, manifest)[0]
    out = []
    for row in rows:
        split = row["shard"].split("/", 1)[0]
        note = "" if row["verified"] else " (not read: does not match the manifest)"
        if row["manifest_sha256"] == "unlisted":
            note = " (not listed in the manifest)"
        out.append({**row, "where": f"{shards_dir / row['shard']} of split {split}{note}"})
    return pd.DataFrame(out, columns=["shard", "sha256", "manifest_sha256", "count", "manifest_count", "verified",
                                      "where"])


def split_table(images, shards, manifest: dict):
    """One row per split: images read from its verified shards vs the manifest's count."""
    import pandas as pd

    observed = images["split"].value_counts()
    rows = []
    for split, info in manifest["splits"].items():
        listed = shards[shards["shard"].str.startswith(f"{split}/") & (shards["manifest_sha256"] != "unlisted")]
        unread = int((~listed["verified"]).sum())
        note = f" ({unread} of {len(listed)} shard(s) not read: they do not match the manifest)" if unread else ""
        rows.append({"split": split, "count": int(observed.get(split, 0)), "manifest_count": int(info["count"]),
                     "where": f"split {split}{note}"})
    return pd.DataFrame(rows, columns=["split", "count", "manifest_count", "where"])


# ------------------------------------------------------------------------------------------ suites
def _suites(params, manifest: dict) -> dict[str, list]:
    """Expectations per table; each carries a ``description`` used in the report."""
    import great_expectations as gx

    E = gx.expectations
    C = manifest["num_classes"]
    images = [
        E.ExpectColumnValuesToBeUnique(column="key", description="sample keys are unique"),
        E.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=C - 1,
                                        description=f"labels within [0, {C})"),
        E.ExpectColumnValuesToBeInSet(column="decodes_ok", value_set=[True], description="every image decodes"),
        E.ExpectColumnValuesToBeInSet(column="meta_ok", value_set=[True], description="json label equals cls"),
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[3], description="images are RGB"),
        E.ExpectColumnValuesToBeBetween(column="pixel_range", min_value=1, row_condition="decodes_ok == True",
                                        condition_parser="pandas",
                                        description="no constant image (every pixel the same colour)"),
    ]
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
        E.ExpectColumnPairValuesToBeEqual(column_A="sha256", column_B="manifest_sha256",
                                          description="shard sha256 equals the manifest (and no unlisted shard)"),
        E.ExpectColumnPairValuesToBeEqual(column_A="count", column_B="manifest_count",
                                          description="shard sample counts equal the manifest"),
    ]
    splits = [E.ExpectColumnPairValuesToBeEqual(column_A="count", column_B="manifest_count",
                                                description="split image counts equal the manifest")]
    stats = []
    if profile_applies(params.data):
        ir, tol = params.data.imbalance_ratio, params.validate_.imbalance_tolerance
        stats.append(E.ExpectColumnValuesToBeBetween(
            column="imbalance_ratio", min_value=ir * (1 - tol), max_value=ir * (1 + tol),
            description=f"train imbalance ratio {ir:g} within {tol:.0%}"))
    stats.append(E.ExpectColumnValuesToBeBetween(column="skipped", min_value=0, max_value=0,
                                                 description="no skipped items (data.skip_bad)", meta={"warn_only": True}))
    return {"images": images, "classes": classes, "shards": shards, "splits": splits, "stats": stats}


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
        result = batch.validate(gx.ExpectationSuite(name=f"lpt_{name}", expectations=expectations),
                                result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES})
        checks += [_check_row(name, r, tables[name]) for r in result.results]
    return checks


def _check_row(table: str, r, frame) -> dict[str, Any]:
    cfg = r.expectation_config
    res = r.result or {}
    column = cfg.kwargs.get("column") or f"{cfg.kwargs.get('column_A')}={cfg.kwargs.get('column_B')}"
    details = cfg.description or cfg.type
    if not r.success:
        named = _unexpected_rows(res, frame, column)
        if named:
            details += f"; {'e.g. ' if int(res.get('unexpected_count') or 0) > len(named) else ''}{'; '.join(named)}"
    if r.exception_info and r.exception_info.get("raised_exception"):
        details += f"; error: {r.exception_info.get('exception_message')}"
    warn_only = bool((cfg.meta or {}).get("warn_only"))
    return {"expectation": cfg.type, "table": table, "column": column, "success": bool(r.success),
            "unexpected_count": int(res.get("unexpected_count") or 0), "details": details, "warn_only": warn_only}


def _unexpected_rows(res: dict, frame, column: str) -> list[str]:
    """The failing rows named by their ``where`` column (shard file and key, split and class), with the
    value that failed; tables without ``where`` (one-row stats) show the observed value."""
    values = [_plain(v) for v in res.get("partial_unexpected_list") or []]
    indices = res.get("partial_unexpected_index_list") or []
    if "where" not in frame.columns or not indices:
        if "observed_value" in res:
            return [f"observed {_plain(res['observed_value'])}"]
        return [f"{column} = {v}" for v in values[:EXAMPLES]]
    named = []
    for i, index in enumerate(indices[:EXAMPLES]):
        named.append(f"{frame.loc[index, 'where']}{_value_text(column, values[i]) if i < len(values) else ''}")
    return named


def _value_text(column: str, value: Any) -> str:
    """``: count 3 != expected 4`` for a column pair, ``: label = 99`` for one column."""
    if "=" in column and isinstance(value, list) and len(value) == 2:
        a, b = column.split("=", 1)
        return f": {a} {_short(value[0])} != {b} {_short(value[1])}"
    return f": {column} = {_short(value)}"


def _short(value: Any) -> Any:
    """Hex digests cut to 16 characters (enough to tell two apart in a message)."""
    return f"{value[:16]}..." if isinstance(value, str) and len(value) == 64 else value


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
        shard_rows, image_rows = read_shards(shards_dir, manifest)
    except (FileNotFoundError, ShardError) as err:
        return _write_outcome([], {"images": 0, "shards": 0, "classes": 0, "splits": {}}, [f"manifest: {err}"],
                              shards_dir, report_path, summary_path)
    images = image_table(shards_dir, manifest, image_rows)
    classes = class_table(images, manifest)
    shards = shard_table(shards_dir, manifest, images, shard_rows)
    tables = {"images": images, "classes": classes, "shards": shards, "splits": split_table(images, shards, manifest),
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
