"""Prefect artifacts built from the JSON files the stages write (never from tensors).

Three artifacts, each published after the stage that owns its file (whether it ran, was cached or
failed, as long as the file exists):

* ``data-validation`` (table): ``validate.report_dir/summary.json``, one row per expectation.
* ``evaluation-metrics`` (Markdown): ``evaluate.out_dir/metrics.json``, the headline metrics and the
  quality-gate verdict.
* ``onnx-model`` (link): the ``.onnx`` files under ``export.out_dir``.

The readers are tolerant: a missing or differently shaped file gives a smaller artifact or none,
never a failed run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

__all__ = [
    "ArtifactSource",
    "artifact_sources",
    "validation_rows",
    "metrics_markdown",
    "publish_artifacts",
    "VALIDATION_KEY",
    "METRICS_KEY",
    "ONNX_KEY",
]

VALIDATION_KEY = "data-validation"
METRICS_KEY = "evaluation-metrics"
ONNX_KEY = "onnx-model"

_ROW_FIELDS = ("expectation", "column", "success", "unexpected_count", "details")


@dataclass(frozen=True)
class ArtifactSource:
    """Where one artifact's input lives, relative to the repo root."""

    key: str
    path: Path


def artifact_sources(params: Any) -> list[ArtifactSource]:
    """The artifact inputs named by the params (``validate.report_dir``, ``evaluate.out_dir``, ``export.out_dir``)."""
    return [
        ArtifactSource(VALIDATION_KEY, Path(params.validate_.report_dir) / "summary.json"),
        ArtifactSource(METRICS_KEY, Path(params.evaluate.out_dir) / "metrics.json"),
        ArtifactSource(ONNX_KEY, Path(params.export.out_dir)),
    ]


def _slug(text: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "file"


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:197] + "..."


def validation_rows(summary: Any) -> list[dict[str, Any]]:
    """Rows for the validation table from ``summary.json``.

    Accepts the agreed flat list of ``{expectation, column, success, unexpected_count, details}`` and,
    while that format settles, a mapping holding such a list under ``results``/``expectations``.

    Args:
        summary: the parsed JSON.

    Returns:
        One row per expectation with exactly the five agreed columns (missing ones are ``None``).
    """
    if isinstance(summary, Mapping):
        summary = next((summary[k] for k in ("results", "expectations", "summary") if isinstance(summary.get(k), list)), [])
    if not isinstance(summary, list):
        return []
    rows = []
    for item in summary:
        if not isinstance(item, Mapping):
            continue
        row = {name: _cell(item.get(name)) for name in _ROW_FIELDS}
        if "table" in item:  # lpt.data.validate checks several tables (images, classes, shards, stats)
            row["table"] = _cell(item["table"])
        if row["expectation"] is None:
            row["expectation"] = _cell(item.get("expectation_type") or item.get("type"))
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _flat_scalars(obj: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """``(dotted.key, value)`` for scalar leaves; long lists (per-class arrays) are left out."""
    out: list[tuple[str, Any]] = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and depth < 2:
            out.extend(_flat_scalars(value, f"{name}.", depth + 1))
        elif isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 80):
            out.append((name, value))
    return out


def _gate(metrics: Mapping[str, Any]) -> tuple[bool | None, list[str]]:
    gate = metrics.get("gate")
    if isinstance(gate, Mapping):
        passed = gate.get("passed", gate.get("success"))
        failures = gate.get("failures") or []
        return (bool(passed) if passed is not None else None), [str(f) for f in failures]
    if "gate_passed" in metrics:
        return bool(metrics["gate_passed"]), [str(f) for f in metrics.get("gate_failures") or []]
    return None, []


def metrics_markdown(metrics: Any, source: str = "metrics.json") -> str:
    """The Markdown for the metrics artifact: gate verdict first, then every scalar metric.

    Args:
        metrics: the parsed ``metrics.json``.
        source: the file name shown in the heading.

    Returns:
        Markdown text.
    """
    if not isinstance(metrics, Mapping):
        return f"# Evaluation\n\n`{source}` is not a JSON object.\n"
    passed, failures = _gate(metrics)
    verdict = {True: "**PASSED**", False: "**FAILED**", None: "not reported"}[passed]
    lines = [f"# Evaluation (`{source}`)", "", f"Quality gate: {verdict}"]
    lines += [f"- {f}" for f in failures]
    lines += ["", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in _flat_scalars(metrics) if k != "gate.passed"]
    return "\n".join(lines) + "\n"


def publish_artifacts(repo_dir: Path, stage_owns: Any, sources: list[ArtifactSource]) -> list[str]:
    """Publish the artifacts whose input a stage owns and which exist now.

    Args:
        repo_dir: the DVC repository root.
        stage_owns: ``DvcStage.owns``-like predicate on repo-relative paths.
        sources: from :func:`artifact_sources`.

    Returns:
        The keys published.
    """
    published = []
    for src in sources:
        if not stage_owns(src.path):
            continue
        path = repo_dir / src.path
        if src.key == VALIDATION_KEY and path.is_file():
            rows = validation_rows(_read_json(path))
            if rows:
                failed = sum(1 for r in rows if r["success"] is False)
                create_table_artifact(rows, key=src.key,
                                      description=f"Data validation: {len(rows) - failed}/{len(rows)} expectations passed ({src.path})")
                published.append(src.key)
        elif src.key == METRICS_KEY and path.is_file():
            metrics = _read_json(path)
            if metrics is not None:
                create_markdown_artifact(metrics_markdown(metrics, str(src.path)), key=src.key,
                                         description=f"Test metrics and quality gate ({src.path})")
                published.append(src.key)
        elif src.key == ONNX_KEY and path.is_dir():
            models = sorted(path.glob("*.onnx"))
            for onnx in models:
                size_mb = onnx.stat().st_size / 1e6
                key = src.key if len(models) == 1 or onnx.stem == "model" else f"{src.key}-{_slug(onnx.stem)}"
                create_link_artifact(onnx.resolve().as_uri(), link_text=str(src.path / onnx.name), key=key,
                                     description=f"ONNX model, {size_mb:.2f} MB: `{onnx.resolve()}`")
                published.append(key)
    return published
