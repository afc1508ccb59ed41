"""``lpt ingest``: the configured source -> WebDataset shards per split + manifest.

The whole output folder is built in a temporary folder beside ``data.out_dir`` and swapped in only when
complete (:func:`lpt.utils.atomic_dir`), so an interrupted or failed ingest leaves the previous shards
untouched and no half-written shard anywhere.

Example:
    >>> from lpt.config import load_params
    >>> result = run_ingest(load_params("params.yaml"))
    >>> result.counts["train"]
    10847
"""

from __future__ import annotations

import contextlib
import importlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lpt.data.longtail import group_labels
from lpt.data.layout import MANIFEST_FILE
from lpt.data.shards import SplitWriteResult, encoded_items, write_split
from lpt.data.sources import MODULES
from lpt.data.sources.base import BadItems, IngestError, SourceData
from lpt.escaping import text_line
from lpt.utils import OutputDirError, atomic_dir, check_output_dir, write_json_atomic

__all__ = ["IngestError", "IngestResult", "run_ingest", "load_source", "build_manifest", "full_train_counts",
           "source_inputs", "untracked_inputs"]

SPLITS = ("train", "val", "test")
_OUTPUT = {"what": "data.out_dir", "own": (*SPLITS, MANIFEST_FILE), "key": MANIFEST_FILE}
"""What ``data.out_dir`` holds: a folder with anything else is never replaced (:func:`lpt.utils.check_output_dir`)."""
MANIFEST_VERSION = 1


@dataclass
class IngestResult:
    """Where the manifest went and how many images each split got."""

    manifest_path: Path
    counts: dict[str, int]
    seconds: float = 0.0
    carved: int | None = None  # val images taken out of the source's train list (None: val came separately)

    def summary(self) -> str:
        """One line: images per split, and the val carve when there was one."""
        line = ", ".join(f"{n} {split}" for split, n in self.counts.items())
        if self.carved is not None:
            line += (f"; val carved from the train list: {self.carved} images (data.val_per_class, at most "
                     f"data.val_max_fraction of a class, never below data.min_train_per_class training images)")
        return line


def load_source(params, bad: BadItems) -> SourceData:
    """Run the source module selected by ``data.source``."""
    module = importlib.import_module(f"lpt.data.sources.{MODULES[params.data.source]}")
    return module.load(params.data, params.seed, bad)


def _class_counts(labels, num_classes: int) -> list[int]:
    return [int(n) for n in np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)]


def _check_classes(data: SourceData, written: dict[str, SplitWriteResult]) -> list[int]:
    """Per-class train counts; an empty train class is an error naming it."""
    counts = _class_counts(written["train"].labels, len(data.class_names))
    empty = [f"{i} ({text_line(data.class_names[i])})" for i, n in enumerate(counts) if n == 0]
    if empty:
        raise IngestError(f"data.source {len(empty)} class(es) have no train image: {', '.join(empty[:10])}")
    return counts


def full_train_counts(data: SourceData, written: dict[str, SplitWriteResult], train_counts: list[int]) -> list[int]:
    """Per-class counts of the source's train list before the val carve: train + val when the source carved
    val out of train (``SourceData.val_from_train``), else the train counts themselves.

    These define the A-GCL cloud size and the many/medium/few groups (the benchmark's own class
    frequencies: a carve of one image must not turn iNat's 2-image classes into 1-image ones for the loss,
    nor move a 20-image class from medium to few). The model still trains on ``train_counts`` images.
    """
    if not data.val_from_train or "val" not in written:
        return list(train_counts)
    val = _class_counts(written["val"].labels, len(data.class_names))
    return [t + v for t, v in zip(train_counts, val)]


def build_manifest(params, data: SourceData, written: dict[str, SplitWriteResult], train_counts: list[int],
                   bad: BadItems) -> dict:
    """The manifest dict (format in docs/interfaces.md and docs/data.md)."""
    full_counts = full_train_counts(data, written, train_counts)
    splits = {}
    for name, res in written.items():
        splits[name] = {"count": res.count, "shards": res.shards, "num_classes": len(data.class_names)}
    return {
        "version": MANIFEST_VERSION,
        "source": params.data.source,
        "seed": params.seed,
        "num_classes": len(data.class_names),
        "class_names": list(data.class_names),
        "train_counts": train_counts,
        # the source's train counts before a val carve (= train_counts unless val was carved out of train);
        # ε and the groups come from train_counts, the images each class trains on
        "full_train_counts": full_counts,
        "val_from_train": bool(data.val_from_train),
        "groups": {"standard": group_labels(train_counts, "standard"), "authors": group_labels(train_counts, "authors")},
        "image_size": list(data.image_size) if data.image_size else None,
        "splits": splits,
        "skipped": {"count": bad.count, "items": bad.items},
        # provenance: whether files outside the source's root could be read into these shards
        "allow_outside_root": bool(params.data.allow_outside_root),
    }


def _write_all(params, data: SourceData, bad: BadItems, out: Path) -> dict[str, SplitWriteResult]:
    written = {}
    for split in SPLITS:
        items = data.splits.get(split)
        if items is None:
            continue
        # one pass over the split (a synthetic split renders while it is iterated)
        with contextlib.closing(encoded_items(items, params.data.workers)) as pairs:
            written[split] = write_split(out / split, split, pairs, bad, params.data.shard_maxcount,
                                         total=len(items))
    return written


def source_inputs(params) -> dict[str, Path]:
    """The files and folders ``data.source`` reads, by params key (none for ``synthetic``: it renders its own).

    >>> from lpt.config import load_params
    >>> source_inputs(load_params("params.yaml", {"data.source": "fashion_mnist"}))
    {'data.fashion_mnist.root': PosixPath('/usr/share/datasets/fashion-mnist')}
    """
    name = params.data.source
    section = getattr(params.data, name)
    return {f"data.{name}.{key}": value for key, value in section if isinstance(value, Path)}


def untracked_inputs(params) -> dict[str, Path]:
    """The source's inputs outside ``data.source_dir``: DVC does not see them change (docs/data.md)."""
    watched = Path(params.data.source_dir).resolve()
    return {key: path for key, path in source_inputs(params).items()
            if not Path(path).resolve().is_relative_to(watched)}


def _check_apart(out_dir: Path, source_dir: Path) -> None:
    """Ingest's output may not lie in its tracked input folder, nor hold it (it would be its own input)."""
    out, watched = out_dir.resolve(), source_dir.resolve()
    if out == watched or out.is_relative_to(watched) or watched.is_relative_to(out):
        raise OutputDirError(f"data.out_dir {str(out_dir)!r} and data.source_dir {str(source_dir)!r} overlap: "
                             "ingest's output would be its own tracked input; keep them apart")


def run_ingest(params) -> IngestResult:
    """Ingest ``data.source`` into shards under ``data.out_dir``, with its ``manifest.json``.

    Args:
        params: validated :class:`lpt.config.Params`.

    Returns:
        The manifest path and per-split image counts.

    Raises:
        IngestError: missing input, bad item (unless ``data.skip_bad``), or an empty class.
        OutputDirError: ``data.out_dir`` is a folder this project did not write (``.``, ``.git``, a user's
            folder): it would be replaced whole.
        OutputWriteError: a filesystem fault while writing (the previous shards stay as they were).
    """
    start = time.perf_counter()
    out_dir = Path(params.data.out_dir)
    check_output_dir(out_dir, **_OUTPUT)  # before reading the source: a refused folder costs nothing
    _check_apart(out_dir, Path(params.data.source_dir))
    bad = BadItems(params.data.skip_bad)
    data = load_source(params, bad)
    manifest_path = out_dir / MANIFEST_FILE
    with atomic_dir(out_dir, **_OUTPUT) as tmp:
        written = _write_all(params, data, bad, tmp)
        train_counts = _check_classes(data, written)
        manifest = build_manifest(params, data, written, train_counts, bad)
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
    counts = {name: res.count for name, res in written.items()}
    carved = counts.get("val", 0) if data.val_from_train else None
    return IngestResult(manifest_path=manifest_path, counts=counts, seconds=time.perf_counter() - start,
                        carved=carved)
