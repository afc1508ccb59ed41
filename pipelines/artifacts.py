"""Prefect artifacts built from the JSON files the stages write (never from tensors).

Three artifacts, each published after the stage that owns its file (whether it ran, was cached or
failed, as long as the file exists):

* ``data-validation`` (table): ``validate.report_dir/summary.json``, one row per expectation.
* ``evaluation-metrics`` (Markdown): ``evaluate.out_dir/metrics.json``, the headline metrics and the
  quality-gate verdict.
* ``onnx-model`` (link): the ``.onnx`` files under ``export.out_dir``, published only after the export
  stage succeeded (ran or cached), naming the versioned model: the md5 ``dvc.lock`` records for the
  stage's output folder (what ``dvc checkout`` restores from DVC's cache once a later run has replaced
  the workspace copy) and the file's sha256 from ``export.json`` (``variants[*].sha256``).

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

from lpt.metrics import format_value
from pipelines.dvc_stages import DvcStage, DvcYamlError, locked_outputs

__all__ = [
    "ArtifactSource",
    "artifact_sources",
    "validation_rows",
    "metrics_markdown",
    "onnx_sha256s",
    "OnnxLink",
    "onnx_link",
    "publish_artifacts",
    "VALIDATION_KEY",
    "METRICS_KEY",
    "ONNX_KEY",
]

VALIDATION_KEY = "data-validation"
METRICS_KEY = "evaluation-metrics"
ONNX_KEY = "onnx-model"

_ROW_FIELDS = ("expectation", "column", "success", "unexpected_count", "details")
EXPORT_REPORT = "export.json"  # written by `lpt export` next to the models (docs/export.md)


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
    lines += [f"| {k} | {format_value(v)} |" for k, v in _flat_scalars(metrics) if k != "gate.passed"]
    return "\n".join(lines) + "\n"


def onnx_sha256s(export_report: Any) -> dict[str, str]:
    """ONNX file name to sha256 from ``export.json``'s ``variants`` (a mapping or a list of entries).

    Args:
        export_report: the parsed ``export.json`` (anything else gives an empty mapping).

    Returns:
        ``{"model.onnx": "<sha256>", ...}`` for the entries that carry both ``file`` and ``sha256``.
    """
    variants = export_report.get("variants") if isinstance(export_report, Mapping) else None
    entries = variants.values() if isinstance(variants, Mapping) else variants if isinstance(variants, list) else []
    return {str(v["file"]): str(v["sha256"]) for v in entries
            if isinstance(v, Mapping) and v.get("file") and v.get("sha256")}


@dataclass(frozen=True)
class OnnxLink:
    """What the ``onnx-model`` link artifact says about one ONNX file."""

    key: str
    link: str
    link_text: str
    description: str


def onnx_link(repo_dir: Path, onnx: Path, key: str, folder: str, folder_md5: str | None,
              stage: str, sha256: str | None) -> OnnxLink:
    """The link artifact for one exported ONNX file, naming its version.

    Args:
        repo_dir: the DVC repository root.
        onnx: the ``.onnx`` file (absolute or under ``repo_dir``).
        key: the artifact key.
        folder: the export stage's output folder that holds it (repo-relative), as ``dvc.lock`` lists it.
        folder_md5: the md5 ``dvc.lock`` records for ``folder`` (``None``: not locked).
        stage: the export stage's name (for the ``dvc checkout`` hint).
        sha256: the file's sha256 from ``export.json`` (``None``: not recorded).

    Returns:
        An :class:`OnnxLink`; the link is the workspace file, the text and description carry the version.
    """
    path = onnx if onnx.is_absolute() else repo_dir / onnx
    rel = path.resolve().relative_to(repo_dir.resolve()).as_posix()
    version = [f"dvc.lock md5 {folder_md5}" if folder_md5 else "not in dvc.lock",
               f"sha256 {sha256[:12]}" if sha256 else "sha256 not recorded"]
    lines = [f"ONNX model `{rel}`, {path.stat().st_size / 1e6:.2f} MB.", "",
             f"- `{folder}` in dvc.lock: md5 `{folder_md5}`" if folder_md5 else f"- `{folder}` is not in dvc.lock",
             f"- `{path.name}` sha256 (export.json): `{sha256}`" if sha256
             else f"- `{path.name}`: no sha256 in export.json",
             "", "The link is the workspace copy, which later runs replace. This version comes back with the "
             f"`dvc.lock` that records this md5: `git checkout <commit> -- dvc.lock && dvc checkout {stage}`."]
    return OnnxLink(key=key, link=path.resolve().as_uri(), link_text=f"{rel} ({', '.join(version)})",
                    description="\n".join(lines))


def _onnx_links(repo_dir: Path, stage: DvcStage, folder: Path) -> list[OnnxLink]:
    models = sorted((repo_dir / folder).glob("*.onnx"))
    if not models:
        return []
    out = stage.output_of(folder) or folder.as_posix()
    try:
        locked = locked_outputs(repo_dir, stage.name).get(out)
    except DvcYamlError:
        locked = None
    sha = onnx_sha256s(_read_json(repo_dir / folder / EXPORT_REPORT))
    keys = {onnx: ONNX_KEY if len(models) == 1 or onnx.stem == "model" else f"{ONNX_KEY}-{_slug(onnx.stem)}"
            for onnx in models}
    return [onnx_link(repo_dir, onnx, keys[onnx], out, locked.md5 if locked else None, stage.name, sha.get(onnx.name))
            for onnx in models]


def publish_artifacts(repo_dir: Path, stage: DvcStage, sources: list[ArtifactSource], *,
                      stage_ok: bool = True) -> list[str]:
    """Publish the artifacts whose input the stage owns and which exist now.

    The validation table and the metrics are published whether the stage succeeded or not (a failed
    validation or gate is when they matter most); the ONNX link only after a successful stage, so the
    md5 it quotes from ``dvc.lock`` describes the files it links.

    Args:
        repo_dir: the DVC repository root.
        stage: the stage that just ran (or was cached, or failed).
        sources: from :func:`artifact_sources`.
        stage_ok: the stage succeeded.

    Returns:
        The keys published.
    """
    published = []
    for src in sources:
        if not stage.owns(src.path):
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
        elif src.key == ONNX_KEY and stage_ok and path.is_dir():
            for link in _onnx_links(repo_dir, stage, src.path):
                create_link_artifact(link.link, link_text=link.link_text, key=link.key, description=link.description)
                published.append(link.key)
    return published
