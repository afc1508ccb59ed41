"""Scoring a batch of new images with the gated export (``lpt score``; the Prefect deployment ``score/batch``).

``score_images(params, inputs)`` classifies image files and folders, list files (one image path per line) or a
split of the shards with ``<export.out_dir>/model.onnx`` — only when that export's checkpoint has a passed gate
verdict of its own (:func:`lpt.gate.gate_refusal`, as ``lpt export`` itself checks) — and writes:

- ``<out>``: CSV, one row per scored image: ``path``, then ``class_1``, ``score_1`` ... ``class_k``, ``score_k``
  (names escaped for spreadsheets, :func:`lpt.escaping.csv_cell`), written atomically;
- ``<out>.summary.json``: counts, the images skipped and why, and the predicted-class histogram beside the
  training prior (the manifest's class counts) with their total-variation distance: a long-tailed model's
  first drift signal (a batch drawn like the training data gives a distance near 0; a shift of the class mix,
  or a model falling back on its head classes, raises it).

An image that cannot be read (not an image, truncated, refused by policy: too many pixels, an unsupported
format or bit depth) is reported by name and skipped; the batch goes on. Progress is reported through
``on_progress``.

Example:
    >>> from lpt.config import load_params
    >>> result = score_images(load_params("params.yaml"), [Path("incoming/")], out=Path("reports/score/predictions.csv"))
    >>> result.scored, result.skipped, result.drift
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lpt.config import Params
from lpt.escaping import csv_cell
from lpt.utils import atomic_path, write_json_atomic

__all__ = ["ScoreError", "ScoreRefused", "ScoreResult", "score_images", "histogram", "read_list_file", "SUMMARY_SUFFIX"]

SUMMARY_SUFFIX = ".summary.json"
"""The summary beside the predictions: ``predictions.csv`` -> ``predictions.csv.summary.json``."""


class ScoreError(RuntimeError):
    """Nothing can be scored: no export, no images, a bad option (one line)."""


class ScoreRefused(ScoreError):
    """The export's checkpoint has no passed gate verdict of its own: nothing is scored."""


@dataclass
class ScoreResult:
    """What :func:`score_images` wrote and measured.

    Attributes:
        predictions: the CSV.
        summary: the summary JSON.
        scored: images classified.
        skipped: ``(path, reason)`` of each image that could not be read.
        histogram: per class: ``class``, ``train_share`` (None without a manifest), ``predicted``, ``predicted_share``.
        drift: total-variation distance between the predicted-class shares and the training prior (None
            without a prior).
        seconds: wall time.
    """

    predictions: Path
    summary: Path
    scored: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    histogram: list[dict[str, Any]] = field(default_factory=list)
    drift: float | None = None
    seconds: float = 0.0


def read_list_file(path: Path) -> list[Path]:
    """Image paths from a list file: one per line, relative to the list file's folder; blank lines and ``#``
    comments skipped."""
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line)
            out.append(entry if entry.is_absolute() else path.parent / entry)
    return out


def _expand(inputs: Sequence[Path]) -> list[Path]:
    """Files and folders as ``lpt predict`` takes them; a ``.txt`` / ``.lst`` file is a list of images."""
    from lpt.runtime import collect_image_paths

    items: list[Path] = []
    for item in inputs:
        item = Path(item)
        items.extend(read_list_file(item) if item.is_file() and item.suffix in (".txt", ".lst") else [item])
    if not items:
        raise ScoreError("no images given: name files, folders, list files or --split")
    from lpt.runtime import PredictError

    try:
        return collect_image_paths(items)
    except PredictError as err:
        raise ScoreError(str(err)) from None


def _images(params: Params, inputs: Sequence[Path] | None, split: str | None
            ) -> tuple[int, Iterator[tuple[str, Any]]]:
    """``(count, (name, image or the error) per image)``: decoding happens as the batch goes."""
    from lpt.runtime import PredictError, load_image

    if split is not None:
        from lpt.data.reader import ShardImages

        data = ShardImages(Path(params.data.out_dir), split)

        def from_split() -> Iterator[tuple[str, Any]]:
            for i in range(len(data)):
                yield f"{split}/{i}", data[i][0]
        return len(data), from_split()
    paths = _expand(list(inputs or []))

    def from_files() -> Iterator[tuple[str, Any]]:
        for path in paths:
            try:
                yield str(path), load_image(path)
            except PredictError as err:  # PredictRefused included: reported by name, the batch goes on
                yield str(path), PredictError(str(err).removeprefix(f"{path}: "))
    return len(paths), from_files()


def histogram(predicted: np.ndarray, class_names: list[str], train_counts: Sequence[int] | None
              ) -> tuple[list[dict[str, Any]], float | None]:
    """Predicted-class counts and shares beside the training prior, and their total-variation distance.

    Example:
        >>> rows, tv = histogram(np.array([0, 0, 1, 1]), ["a", "b"], [3, 1])
        >>> [(r["class"], r["train_share"], r["predicted_share"]) for r in rows], tv
        ([('a', 0.75, 0.5), ('b', 0.25, 0.5)], 0.25)
    """
    counts = np.bincount(predicted, minlength=len(class_names)) if len(predicted) else np.zeros(len(class_names), int)
    shares = counts / max(1, counts.sum())
    prior = None
    if train_counts is not None and len(train_counts) == len(class_names) and sum(train_counts) > 0:
        prior = np.asarray(train_counts, dtype=np.float64) / float(sum(train_counts))
    rows = [{"class": name, "train_share": None if prior is None else float(prior[c]),
             "predicted": int(counts[c]), "predicted_share": float(shares[c])} for c, name in enumerate(class_names)]
    tv = None if prior is None or not len(predicted) else float(0.5 * np.abs(shares - prior).sum())
    return rows, tv


def _gated_model(params: Params, model: Path | None) -> Path:
    """The export to score with; refused without a passed gate verdict for its checkpoint."""
    from lpt.gate import gate_refusal
    from lpt.utils import JsonFileError, read_json

    export = Path(params.export.out_dir)
    path = Path(model) if model is not None else export / "model.onnx"
    try:
        report = read_json(path.parent / "export.json", "export report")
    except JsonFileError as err:
        raise ScoreError(f"{err}: score with an export `lpt export` wrote (dvc stage export)") from None
    _, reason = gate_refusal(params, str(report.get("checkpoint_sha256", "")))
    if reason is not None:
        raise ScoreRefused(f"{path}: refused, {reason}")
    return path


def _train_counts(params: Params) -> list[int] | None:
    try:
        from lpt.data.reader import group_counts, load_manifest

        return [int(c) for c in group_counts(load_manifest(params.data.out_dir))]
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return None


def score_images(params: Params, inputs: Sequence[Path] | None = None, *, split: str | None = None,
                 out: Path = Path("reports/score/predictions.csv"), top_k: int = 3, model: Path | None = None,
                 batch_size: int = 64, on_progress: Callable[[int, int], None] | None = None) -> ScoreResult:
    """Classify a batch of images with the gated export; write the predictions and the summary atomically.

    Args:
        params: reads ``export.out_dir``, ``evaluate.out_dir`` / ``evaluate.gate`` (the verdict) and
            ``data.out_dir`` (the training prior; the images with ``split``).
        inputs: image files, folders (recursive) and list files (``.txt`` / ``.lst``).
        split: instead of ``inputs``, every image of this split of the shards (``test``, ``val``, ``train``).
        out: the CSV; the summary is ``<out>.summary.json``.
        top_k: classes per image.
        model: the export to use (default ``<export.out_dir>/model.onnx``; a ``model.raw.onnx`` works too).
        batch_size: images per ONNX Runtime call.
        on_progress: called with ``(done, total)`` after each batch.

    Raises:
        ScoreError: the export has no passed gate verdict of its own, there is no export, or no images.
    """
    from lpt.runtime import PredictError, Predictor

    start = time.perf_counter()
    predictor = Predictor(_gated_model(params, model))
    names = predictor.class_names
    if not 1 <= top_k <= len(names):
        raise ScoreError(f"top_k must be between 1 and {len(names)}, got {top_k}")
    total, images = _images(params, inputs, split)
    rows: list[tuple[str, dict[str, Any]]] = []
    skipped: list[tuple[str, str]] = []
    done = 0
    batch: list[tuple[str, Any]] = []
    for name, image in images:
        if isinstance(image, PredictError):
            skipped.append((name, str(image)))
        else:
            batch.append((name, image))
        done += 1
        if len(batch) == batch_size or (done == total and batch):
            preds = predictor.predict_images([im for _, im in batch], top_k=top_k, batch_size=batch_size)
            rows.extend((n, r) for (n, _), r in zip(batch, preds))
            batch = []
        if on_progress is not None and (done % batch_size == 0 or done == total):
            on_progress(done, total)
    hist, drift = histogram(np.array([r["labels"][0] for _, r in rows], dtype=np.int64), names, _train_counts(params))
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text(_csv(rows, top_k))
    summary = {"model": str(predictor.path), "images": total, "scored": len(rows),
               "skipped": [{"path": p, "reason": r} for p, r in skipped], "top_k": top_k,
               "histogram": hist, "drift_total_variation": drift,
               "drift_note": "total-variation distance between the predicted-class shares and the training prior"}
    summary_path = write_json_atomic(out.with_name(out.name + SUMMARY_SUFFIX), summary)
    return ScoreResult(predictions=out, summary=summary_path, scored=len(rows), skipped=skipped, histogram=hist,
                       drift=drift, seconds=time.perf_counter() - start)


def _csv(rows: list[tuple[str, dict[str, Any]]], top_k: int) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path"] + [f"{k}_{i}" for i in range(1, top_k + 1) for k in ("class", "score")])
    for name, row in rows:
        cells = [csv_cell(name)]
        for cls, score in zip(row["classes"], row["scores"]):
            cells += [csv_cell(cls), f"{score:.6f}"]
        writer.writerow(cells)
    return buf.getvalue()


def summary_lines(result: ScoreResult) -> list[str]:
    """A few lines for the CLI and the run log."""
    lines = [f"scored {result.scored} images -> {result.predictions} ({result.seconds:.1f} s); summary {result.summary}"]
    if result.drift is not None:
        lines.append(f"predicted-class shares vs the training prior: total-variation distance {result.drift:.3f}")
    lines += [f"skipped: {path}: {reason}" for path, reason in result.skipped]
    return lines
