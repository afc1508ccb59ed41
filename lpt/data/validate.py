"""``lpt validate``: Great Expectations checks over tables of the shards.

Tables are built from the shards (never from the source): one row per image (key id, split, label,
width, height, channels, bytes, decodes_ok, meta_ok, pixel_range, shared_with_train), one row per (split,
class) with observed and manifest counts, one row per shard with its actual and manifest sha256 and sample
count, and one row per split with its image count. Each table is a dataframe asset of an ephemeral GX
context, validated whole with ``batch.validate(suite)``.

The image table scales with the dataset (iNat: ~490k rows): it is columnar from the start (numpy arrays
filled shard by shard, then numeric/categorical pandas columns, ~70 bytes an image), never a dict or a
string per image; keys and pixel hashes stay in numpy bytes arrays, and a failing row is named from them
only when it is reported. ``validate.workers`` processes read and decode shards in parallel. Results go to
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
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lpt.data.imageio import open_image, to_rgb_array
from lpt.data.longtail import profile_applies
from lpt.data.reader import (DECODE_ERRORS, IMAGE_EXTS, MANIFEST_FILE, ShardError, load_manifest, parse_shard,
                             split_records)
from lpt.escaping import markdown_cell
from lpt.utils import atomic_path, refuse_protected, sha256_file, write_json_atomic

__all__ = ["ValidationResult", "run_validation", "read_shards", "image_table", "image_where", "class_table",
           "shard_table", "split_table", "split_counts", "IMAGE_COLUMNS"]

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
IMAGE_COLUMNS = ("split", "shard", "key", "label", "width", "height", "channels", "bytes", "decodes_ok", "meta_ok",
                 "pixel_range", "digest")
"""The per-image columns :func:`read_shards` computes: numpy arrays, one entry per image (``split`` and
``shard`` are indices into the split and shard names, ``key`` a bytes array, ``digest`` the sha256 of the
decoded RGB pixels as 32 bytes, zero for an image that does not decode)."""


def _class_name(manifest: dict, split: str, label: int) -> str:
    names = manifest["splits"][split].get("class_names", manifest["class_names"]) if split in manifest["splits"] \
        else manifest["class_names"]
    return repr(names[label]) if 0 <= label < len(names) else "(no such class)"


def _image_values(parts: dict[str, bytes]) -> tuple:
    """One image's column values (without split/shard/key): label, width, height, channels, bytes,
    decodes_ok, meta_ok, pixel_range, digest."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    data = parts.get(ext, b"") if ext else b""
    label, meta_ok, width, height, channels, decodes_ok, pixel_range, digest = -1, False, 0, 0, 0, False, -1, bytes(32)
    try:
        label = int(parts["cls"])
        meta_ok = json.loads(parts["json"])["label"] == label
    except (KeyError, ValueError, TypeError):
        pass
    try:
        with open_image(data) as im:
            im.load()
            width, height, channels = im.width, im.height, len(im.getbands())
            pixels = np.ascontiguousarray(to_rgb_array(im)).tobytes()
            decodes_ok = True
        rgb = np.frombuffer(pixels, dtype=np.uint8).reshape(-1, 3)
        pixel_range = int((rgb.max(axis=0) - rgb.min(axis=0)).max()) if len(rgb) else 0
        digest = hashlib.sha256(pixels).digest()
    except DECODE_ERRORS:
        pass
    return label, width, height, channels, len(data), decodes_ok, meta_ok, pixel_range, digest


def _shard_task(task: tuple[Path, dict]) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Read one listed shard once: its row (actual vs manifest sha256 and count) and, when it matches the
    manifest, its images' columns (arrays of this shard only). Runs in a worker process."""
    path, row = task
    columns = None
    if path.is_file():
        row["sha256"], samples = _read_unverified(path)
        row["count"] = len(samples) if samples is not None else -1
        row["verified"] = row["sha256"] == row["manifest_sha256"] and row["count"] == row["manifest_count"]
        if row["verified"]:
            values = [_image_values(parts) for _, parts in samples]
            n = len(values)
            columns = {
                "key": np.array([key.encode("utf-8") for key, _ in samples], dtype=np.bytes_) if n else
                np.zeros(0, "S1"),
                "label": np.fromiter((v[0] for v in values), np.int64, n),
                "width": np.fromiter((v[1] for v in values), np.int32, n),
                "height": np.fromiter((v[2] for v in values), np.int32, n),
                "channels": np.fromiter((v[3] for v in values), np.int8, n),
                "bytes": np.fromiter((v[4] for v in values), np.int64, n),
                "decodes_ok": np.fromiter((v[5] for v in values), bool, n),
                "meta_ok": np.fromiter((v[6] for v in values), bool, n),
                "pixel_range": np.fromiter((v[7] for v in values), np.int16, n),
                "digest": np.array([v[8] for v in values], dtype="S32") if n else np.zeros(0, "S32"),
            }
    return row, columns


def read_shards(shards_dir: Path, manifest: dict, workers: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read every listed shard once and verify it; return ``(shard rows, image columns)``.

    A shard row holds the actual and manifest sha256 and sample count (``missing``/``unreadable`` when the
    file cannot be read); only shards whose sha256 and count match the manifest contribute images. Shard
    files present on disk but not listed get a row with ``manifest_sha256`` ``unlisted``.

    The image table is columnar (:data:`IMAGE_COLUMNS`: numpy arrays, about 70 bytes an image, no Python
    object per image), built shard by shard, so memory follows the image count only through those arrays;
    ``workers`` processes read and decode shards in parallel (results in manifest order either way).

    Returns:
        The shard rows, and ``{"splits": [names], "shards": [split/name], **IMAGE_COLUMNS arrays}``.

    Raises:
        ShardError: a malformed shard record in the manifest.
    """
    tasks, unlisted = [], []
    for split in manifest["splits"]:
        records = split_records(manifest, split, shards_dir / MANIFEST_FILE)
        listed = set()
        for record in records:
            path = shards_dir / split / record["name"]
            listed.add(path.name)
            tasks.append((path, {"shard": f"{split}/{record['name']}", "sha256": "missing",
                                 "manifest_sha256": record["sha256"], "count": -1, "manifest_count": record["count"],
                                 "verified": False}))
        for path in sorted((shards_dir / split).glob("*.tar")):
            if path.name not in listed:
                unlisted.append((len(tasks), {"shard": f"{split}/{path.name}", "sha256": sha256_file(path),
                                              "manifest_sha256": "unlisted", "count": -1, "manifest_count": -1,
                                              "verified": False}))
    split_names = list(manifest["splits"])
    shard_rows, parts = [], []
    for i, (row, columns) in enumerate(tqdm(_map(_shard_task, tasks, workers), total=len(tasks), desc="validate",
                                            leave=False, disable=None, mininterval=1.0, unit="shard")):
        shard_rows.append(row)
        if columns is not None:
            n = len(columns["label"])
            columns["split"] = np.full(n, split_names.index(row["shard"].split("/", 1)[0]), np.int8)
            columns["shard"] = np.full(n, i, np.int32)
            parts.append(columns)
    for position, row in reversed(unlisted):  # after the listed shards of their split, as before
        shard_rows.insert(position, row)
    images: dict[str, Any] = {"splits": split_names, "shards": [row["shard"] for _, row in tasks]}
    for name in IMAGE_COLUMNS:
        if parts:
            images[name] = np.concatenate([p[name] for p in parts])
        else:  # nothing verified: empty columns of the right kinds
            images[name] = np.zeros(0, {"key": "S1", "digest": "S32", "decodes_ok": bool, "meta_ok": bool,
                                        "split": np.int8, "shard": np.int32}.get(name, np.int64))
    return shard_rows, images


def _map(fn, tasks: list, workers: int):
    """``map`` in order, over a process pool when ``workers > 1`` and there is more than one task."""
    if workers <= 1 or len(tasks) < 2:
        yield from map(fn, tasks)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(fn, tasks)  # one shard per task: a few MB in flight per worker


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


def image_table(images: dict[str, Any], params_check_overlap: bool = True):
    """The GX image table: one row per image of the verified shards, numeric columns only.

    ``key`` is replaced by ``key_id`` (equal ids = equal keys: the position of the key among the sorted
    distinct keys), ``split`` is categorical, and ``shared_with_train`` marks a non-train image whose decoded
    pixels equal a train image's (sha256). Rows are named on failure by :func:`image_where`, not by a
    string column.
    """
    import pandas as pd

    n = len(images["label"])
    _, key_id = np.unique(images["key"], return_inverse=True) if n else (None, np.zeros(0, np.int64))
    split_codes = images["split"]
    train_code = images["splits"].index("train") if "train" in images["splits"] else -1
    shared = np.zeros(n, bool)
    if params_check_overlap and n:
        is_train = split_codes == train_code
        ok = images["decodes_ok"]
        train_digests = np.unique(images["digest"][is_train & ok])
        shared = ~is_train & ok & np.isin(images["digest"], train_digests)
    return pd.DataFrame({
        "key_id": np.asarray(key_id, np.int64),
        "split": pd.Categorical.from_codes(split_codes.astype(np.int64), categories=images["splits"]),
        "label": images["label"], "width": images["width"], "height": images["height"],
        "channels": images["channels"], "bytes": images["bytes"], "decodes_ok": images["decodes_ok"],
        "meta_ok": images["meta_ok"], "pixel_range": images["pixel_range"], "shared_with_train": shared,
    })


def image_where(images: dict[str, Any], manifest: dict, index: int) -> str:
    """``split/shard.tar:key (class 3 'name')`` for image row ``index``."""
    split = images["splits"][int(images["split"][index])]
    label = int(images["label"][index])
    key = images["key"][index].decode("utf-8", "replace")
    return f"{images['shards'][int(images['shard'][index])]}:{key} (class {label} {_class_name(manifest, split, label)})"


def class_table(images: dict[str, Any], manifest: dict):
    """One row per (target split, class): observed count and, for train, the manifest count."""
    import pandas as pd

    num_classes = manifest["num_classes"]
    rows = []
    for split in TARGET_SPLITS:
        if split not in manifest["splits"]:
            continue
        code = images["splits"].index(split)
        labels = images["label"][(images["split"] == code) & (images["label"] >= 0) & (images["label"] < num_classes)]
        observed = np.bincount(labels, minlength=num_classes)
        for c in range(num_classes):
            expected = manifest["train_counts"][c] if split == "train" else int(observed[c])
            rows.append({"split": split, "label": c, "count": int(observed[c]), "expected": int(expected),
                         "where": f"{split} class {c} {_class_name(manifest, split, c)}"})
    return pd.DataFrame(rows, columns=["split", "label", "count", "expected", "where"])


def shard_table(shards_dir: Path, manifest: dict, shard_rows: list[dict]):
    """One row per shard listed in the manifest or present on disk: actual vs manifest sha256 and count."""
    import pandas as pd

    out = []
    for row in shard_rows:
        split = row["shard"].split("/", 1)[0]
        note = "" if row["verified"] else " (not read: does not match the manifest)"
        if row["manifest_sha256"] == "unlisted":
            note = " (not listed in the manifest)"
        out.append({**row, "where": f"{shards_dir / row['shard']} of split {split}{note}"})
    return pd.DataFrame(out, columns=["shard", "sha256", "manifest_sha256", "count", "manifest_count", "verified",
                                      "where"])


def split_counts(images: dict[str, Any]) -> dict[str, int]:
    """Images read from verified shards per split (splits with none left out), by split name."""
    counts = np.bincount(images["split"].astype(np.int64), minlength=len(images["splits"]))
    return {name: int(counts[i]) for i, name in sorted(enumerate(images["splits"]), key=lambda t: t[1]) if counts[i]}


def split_table(images: dict[str, Any], shards, manifest: dict):
    """One row per split: images read from its verified shards vs the manifest's count."""
    import pandas as pd

    observed = split_counts(images)
    rows = []
    for split, info in manifest["splits"].items():
        listed = shards[shards["shard"].str.startswith(f"{split}/") & (shards["manifest_sha256"] != "unlisted")]
        unread = int((~listed["verified"]).sum())
        note = f" ({unread} of {len(listed)} shard(s) not read: they do not match the manifest)" if unread else ""
        rows.append({"split": split, "count": observed.get(split, 0), "manifest_count": int(info["count"]),
                     "where": f"split {split}{note}"})
    return pd.DataFrame(rows, columns=["split", "count", "manifest_count", "where"])


# ------------------------------------------------------------------------------------------ suites
def _suites(params, manifest: dict) -> dict[str, list]:
    """Expectations per table; each carries a ``description`` used in the report."""
    import great_expectations as gx

    E = gx.expectations
    C = manifest["num_classes"]
    images = [
        E.ExpectColumnValuesToBeUnique(column="key_id", description="sample keys are unique"),
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


def _run_suites(tables: dict, suites: dict, wheres: dict[str, Callable[[int], str]] | None = None) -> list[dict[str, Any]]:
    """Validate each table with its suite; ``wheres`` names a failing row of a table without a ``where``
    column (the image table: naming strings per image would be an object per image)."""
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
        checks += [_check_row(name, r, tables[name], (wheres or {}).get(name)) for r in result.results]
    return checks


def _check_row(table: str, r, frame, where: Callable[[int], str] | None = None) -> dict[str, Any]:
    cfg = r.expectation_config
    res = r.result or {}
    column = cfg.kwargs.get("column") or f"{cfg.kwargs.get('column_A')}={cfg.kwargs.get('column_B')}"
    details = cfg.description or cfg.type
    if not r.success:
        named = _unexpected_rows(res, frame, column, where)
        if named:
            details += f"; {'e.g. ' if int(res.get('unexpected_count') or 0) > len(named) else ''}{'; '.join(named)}"
    if r.exception_info and r.exception_info.get("raised_exception"):
        details += f"; error: {r.exception_info.get('exception_message')}"
    warn_only = bool((cfg.meta or {}).get("warn_only"))
    return {"expectation": cfg.type, "table": table, "column": column, "success": bool(r.success),
            "unexpected_count": int(res.get("unexpected_count") or 0), "details": details, "warn_only": warn_only}


def _unexpected_rows(res: dict, frame, column: str, where: Callable[[int], str] | None = None) -> list[str]:
    """The failing rows named by ``where(index)`` or the table's ``where`` column (shard file and key, split
    and class), with the value that failed; tables without either (one-row stats) show the observed value."""
    values = [_plain(v) for v in res.get("partial_unexpected_list") or []]
    indices = res.get("partial_unexpected_index_list") or []
    if where is not None and indices:
        return [f"{where(int(index))}{_value_text(column, values[i]) if i < len(values) else ''}"
                for i, index in enumerate(indices[:EXAMPLES])]
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
        lines.append(f"| {mark} | {markdown_cell(c['details'])} | {c['table']} | `{c['column']}` | "
                     f"{c['unexpected_count']} | `{c['expectation']}` |")
    return "\n".join(lines) + "\n"


def run_validation(params) -> ValidationResult:
    """Validate the shards of ``data.out_dir`` against their manifest and the params.

    Args:
        params: validated :class:`lpt.config.Params`.

    Returns:
        success, the failed checks, and the paths of ``report.md`` and ``summary.json``.

    Raises:
        OutputDirError: ``validate.report_dir`` is ``.``, a repository root, ... (:func:`lpt.utils.refuse_protected`).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    shards_dir, report_dir = Path(params.data.out_dir), Path(params.validate_.report_dir)
    refuse_protected(report_dir, "validate.report_dir")
    report_path, summary_path = report_dir / "report.md", report_dir / "summary.json"
    try:
        manifest = load_manifest(params.data.out_dir)
        shard_rows, columns = read_shards(shards_dir, manifest, params.validate_.workers)
    except (FileNotFoundError, ShardError) as err:
        return _write_outcome([], {"images": 0, "shards": 0, "classes": 0, "splits": {}}, [f"manifest: {err}"],
                              shards_dir, report_path, summary_path)
    images = image_table(columns, params.validate_.check_test_overlap)
    classes = class_table(columns, manifest)
    shards = shard_table(shards_dir, manifest, shard_rows)
    tables = {"images": images, "classes": classes, "shards": shards, "splits": split_table(columns, shards, manifest),
              "stats": _stats_table(classes, manifest)}
    checks = _run_suites(tables, _suites(params, manifest),
                         {"images": lambda index: image_where(columns, manifest, index)})
    counts = {"images": len(images), "shards": len(tables["shards"]), "classes": manifest["num_classes"],
              "splits": split_counts(columns)}
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
