"""The data side of a phase: the train/val splits, the two samplers and each step's batches.

Every batch is a pure function of ``(seed, phase, epoch, rank, step, stream)`` and the sampler states, so
DataLoader workers, resumes and re-runs all see the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpt.config import Params
from lpt.errors import TrainError
from lpt.utils import sha256_file

__all__ = ["PhaseData", "load_phase_data", "build_samplers", "epoch_indices", "EpochBatches", "epoch_loader"]


@dataclass
class PhaseData:
    """Train and validation images of the target task, with their transforms and class counts."""

    train: Any
    val: Any
    train_transform: Callable[[Any], torch.Tensor]
    val_transform: Callable[[Any], torch.Tensor]
    class_counts: list[int]
    num_classes: int
    manifest_sha: str


def load_phase_data(params: Params, transforms: Any = None) -> PhaseData:
    """Open the train/val splits of ``data.out_dir`` (shards verified against the manifest by the reader).

    Args:
        params: reads ``data.out_dir``, ``train.in_memory`` and (without ``transforms``) ``transforms``.
        transforms: the ``transforms`` section resolved against the backbone
            (:func:`lpt.model.backbone.resolve_transforms`); default ``params.transforms`` as written.

    Raises:
        TrainError: shards/manifest missing or no validation split.
    """
    from lpt.data.reader import MANIFEST_FILE, ShardImages, build_transform, group_counts, load_manifest

    shards = Path(params.data.out_dir)
    manifest_path = shards / MANIFEST_FILE
    if not manifest_path.is_file():
        raise TrainError(f"no data manifest at {manifest_path}: run `lpt ingest` (dvc stage ingest) first")
    manifest = load_manifest(manifest_path)
    if not manifest.get("splits", {}).get("val", {}).get("count"):
        raise TrainError(f"{manifest_path}: no validation split; model selection needs one (never the test split)")
    in_memory = params.train.in_memory
    transforms = params.transforms if transforms is None else transforms
    return PhaseData(train=ShardImages(shards, "train", in_memory=in_memory),
                     val=ShardImages(shards, "val", in_memory=in_memory),
                     train_transform=build_transform(transforms, train=True),
                     val_transform=build_transform(transforms, train=False),
                     class_counts=group_counts(manifest, manifest_path),
                     num_classes=int(manifest["num_classes"]), manifest_sha=sha256_file(manifest_path))


def build_samplers(labels: np.ndarray, *, per_rank_epoch: int, seed: int, rank: int, world_size: int,
                   streams: tuple[str, ...], samples_per_class: int) -> dict[str, Any]:
    """The sampler of each stream a step draws from: ``ib`` (instance-balanced), ``cb`` (class-aware).

    Args:
        labels: train labels.
        per_rank_epoch: indices one rank draws per epoch and stream (steps x rank batch).
        seed: base seed of this phase; the IB stream uses ``seed + 1``, the CB stream ``seed + 2``.
        rank: this rank.
        world_size: ranks.
        streams: :attr:`lpt.methods.PhasePlan.streams`, e.g. ``("cb", "ib")`` for dual sampling.
        samples_per_class: consecutive images per class in the class-aware stream.
    """
    from lpt.data.sampling import ClassAwareSampler, InstanceBalancedSampler

    total = per_rank_epoch * world_size
    samplers: dict[str, Any] = {}
    if "ib" in streams:
        samplers["ib"] = InstanceBalancedSampler(len(labels), num_samples=total, seed=seed + 1, rank=rank,
                                                 world_size=world_size)
    if "cb" in streams:
        samplers["cb"] = ClassAwareSampler(labels, samples_per_class=samples_per_class, num_samples=total,
                                           seed=seed + 2, rank=rank, world_size=world_size)
    return samplers


def epoch_indices(samplers: dict[str, Any], states: dict[str, Any], epoch: int, need: int) -> dict[str, np.ndarray]:
    """This rank's index array per stream for ``epoch`` (int64: 8 bytes an index, not a Python int).

    ``states`` holds each sampler's state *before* ``set_epoch(epoch)``: recorded here at the epoch start on
    a fresh run (the dict is filled in place), restored from it on a resume, so both draw the same indices.

    Raises:
        TrainError: a sampler yields fewer than ``need`` indices.
    """
    streams = {}
    for name, sampler in samplers.items():
        if name in states:
            sampler.load_state_dict(states[name])
        else:
            states[name] = sampler.state_dict()
        sampler.set_epoch(epoch)
        indices = sampler.take(need)
        if len(indices) < need:
            raise TrainError(f"sampler {name!r} yielded {len(indices)} indices for epoch {epoch}, expected {need}")
        streams[name] = indices
    return streams


def _sample_seeds(*key: int, count: int) -> np.ndarray:
    """``count`` augmentation seeds that depend only on ``key`` (seed, phase, epoch, rank, step, stream)."""
    return np.random.SeedSequence([int(k) for k in key]).generate_state(count)


def _load_batch(images: Any, transform: Callable[[Any], torch.Tensor], indices: np.ndarray,
                seeds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode + augment ``indices``, each image under its own seed; the global RNG is left untouched."""
    xs, ys = [], []
    with torch.random.fork_rng(devices=[]):
        for idx, seed in zip(indices, seeds):
            torch.manual_seed(int(seed))
            image, label = images[int(idx)]
            xs.append(transform(image))
            ys.append(int(label))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


class EpochBatches(torch.utils.data.Dataset):
    """Item ``i`` = the batches of step ``i`` of one epoch, one ``(x, y)`` per stream.

    Indexing by step (not by sample) keeps every batch a pure function of the epoch's index lists and
    the step number.
    """

    def __init__(self, images: Any, transform: Callable[[Any], torch.Tensor],
                 streams: dict[str, np.ndarray], batch: int, key: tuple[int, ...]) -> None:
        self.images, self.transform, self.streams, self.batch, self.key = images, transform, streams, batch, key

    def __len__(self) -> int:
        return min(len(v) for v in self.streams.values()) // self.batch

    def __getitem__(self, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for stream_id, (name, indices) in enumerate(sorted(self.streams.items())):
            chunk = indices[step * self.batch:(step + 1) * self.batch]
            seeds = _sample_seeds(*self.key, step, stream_id, count=len(chunk))
            out[name] = _load_batch(self.images, self.transform, chunk, seeds)
        return out


def epoch_loader(dataset: EpochBatches, first_step: int, steps: int, *, num_workers: int, pin_memory: bool,
                 epoch: int) -> Iterator[dict[str, Any]]:
    """Iterate the batches of steps ``first_step..steps-1`` (a resumed epoch starts mid-way).

    The loader has a generator of its own: creating it must not draw from the global RNG (resume equality).
    """
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=list(range(first_step, steps)),
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         generator=torch.Generator().manual_seed(epoch))
    return iter(loader)
