"""Reading shards: the manifest, random access (:class:`ShardImages`), streaming, and transforms.

Random access scans each shard's tar headers once into an index; with ``in_memory`` the encoded image
bytes are kept in RAM (32 px PNGs: ~3 KB each), otherwise each access seeks into the shard file. Images
are decoded on access, so a DataLoader's workers share the decoding.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["load_manifest", "shard_paths", "decode_image", "iter_shard_samples", "ShardImages",
           "build_transform", "TransformedDataset", "stream_loader"]

IMAGE_EXTS = ("png", "jpg", "jpeg")
MANIFEST_FILE = "manifest.json"
"""The manifest's name inside the shards folder (``data.out_dir``): its one and only place."""


def load_manifest(path_or_dir: str | Path) -> dict[str, Any]:
    """Read the manifest: a manifest file, or a shards folder containing ``manifest.json``.

    Raises:
        FileNotFoundError: with the path, when there is no manifest (run ``lpt ingest`` first).
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (run `lpt ingest` first)")
    return json.loads(path.read_text())


def shard_paths(shards_dir: str | Path, split: str, manifest: dict | None = None) -> list[Path]:
    """Shard files of ``split`` in manifest order.

    Raises:
        KeyError: the manifest has no such split.
        FileNotFoundError: a listed shard is missing.
    """
    shards_dir = Path(shards_dir)
    manifest = manifest if manifest is not None else load_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} not in the manifest (has {sorted(manifest['splits'])})")
    paths = [shards_dir / split / s["name"] for s in manifest["splits"][split]["shards"]]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: shard listed in the manifest is missing")
    return paths


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image."""
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _tar_members(path: Path, raw: bytes | mmap.mmap) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file in a tar whose bytes are ``raw``.

    Parses ustar headers directly (~20x faster than ``tarfile`` iteration, which would dominate the read
    time of small images); any header it does not handle (PAX, GNU long names) falls back to ``tarfile``.
    """
    out: list[tuple[str, int, int]] = []
    pos, end = 0, len(raw)
    while pos + 512 <= end:
        header = raw[pos: pos + 512]
        if header[0] == 0:  # end-of-archive block
            return out
        typeflag = header[156:157]
        if header[257:262] != b"ustar" or typeflag not in (b"0", b"\0") or header[345] != 0:
            return _tar_members_slow(path)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        out.append((name, pos + 512, size))
        pos += 512 + size + (-size % 512)
    return out


def _tar_members_slow(path: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path, "r:") as tar:  # noqa: SIM117
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def iter_shard_samples(path: str | Path, image_bytes: bool = True):
    """Yield ``(key, {ext: bytes})`` per sample of one tar shard, in file order.

    Args:
        path: a tar shard.
        image_bytes: read image members; when False an image member gives ``(offset, size)`` of its data
            in the file instead (``cls``/``json`` are always read).
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    members = _tar_members(Path(path), raw)
    current, parts = None, {}
    for name, offset, size in members:
        key, _, ext = name.partition(".")
        if key != current and current is not None:
            yield current, parts
            parts = {}
        current = key
        lazy = not image_bytes and ext in IMAGE_EXTS
        parts[ext] = (offset, size) if lazy else raw[offset: offset + size]
    if current is not None:
        yield current, parts


def _image_ext(parts: dict, where: str) -> str:
    for ext in IMAGE_EXTS:
        if ext in parts:
            return ext
    raise ValueError(f"{where}: sample has no image member (has {sorted(parts)})")


class ShardImages:
    """Random access over one split: ``ds[i] -> (PIL RGB image, label)``.

    Args:
        shards_dir: folder with ``manifest.json`` and one sub-folder per split.
        split: ``train``, ``val``, ``test`` or ``source``.
        in_memory: keep the encoded bytes in RAM (else seek into the shard files on each access).

    Attributes:
        labels: int64 labels, aligned with indices.
        keys: sample keys, aligned with indices.
        num_classes: classes of this split per the manifest.
    """

    def __init__(self, shards_dir: str | Path, split: str, in_memory: bool = True) -> None:
        self.shards_dir, self.split, self.in_memory = Path(shards_dir), split, in_memory
        manifest = load_manifest(self.shards_dir)
        self.paths = shard_paths(self.shards_dir, split, manifest)
        self.num_classes = int(manifest["splits"][split]["num_classes"])
        self.class_names = manifest["splits"][split].get("class_names", manifest["class_names"])
        self.keys: list[str] = []
        self._data: list[bytes] = []
        self._loc: list[tuple[int, int, int]] = []  # (shard index, offset, size)
        labels = []
        for shard_idx, path in enumerate(self.paths):
            for key, parts in iter_shard_samples(path, image_bytes=in_memory):
                ext = _image_ext(parts, f"{path}:{key}")
                labels.append(int(parts["cls"]))
                self.keys.append(key)
                if in_memory:
                    self._data.append(parts[ext])
                else:
                    self._loc.append((shard_idx, *parts[ext]))
        self.labels = np.asarray(labels, dtype=np.int64)
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def _read_at(self, shard_idx: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # forked DataLoader worker: open its own maps
            self._files, self._pid = {}, os.getpid()
        view = self._files.get(shard_idx)
        if view is None:
            with open(self.paths[shard_idx], "rb") as fh:
                view = self._files[shard_idx] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return view[offset: offset + size]

    def image_bytes(self, index: int) -> bytes:
        """The encoded image of sample ``index``."""
        return self._data[index] if self.in_memory else self._read_at(*self._loc[index])

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return decode_image(self.image_bytes(index)), int(self.labels[index])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def close(self) -> None:
        """Unmap shard files (only used when not in memory)."""
        for fh in self._files.values():
            fh.close()
        self._files = {}


def build_transform(cfg, train: bool) -> Callable[[Image.Image], "torch.Tensor"]:  # noqa: F821
    """Train or test preprocessing from the ``transforms`` section.

    Train: RandomResizedCrop(input_size, scale=(train_scale_min, 1)) [+ horizontal flip]. Test:
    Resize(shorter side to ``resize``, bilinear, antialias) + CenterCrop(input_size) — the ONNX runtime
    reproduces exactly this in numpy/Pillow. Both end with ToTensor + Normalize(mean, std).

    Args:
        cfg: a ``TransformConfig``.
        train: train (augmenting) or test (deterministic) pipeline.
    """
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(cfg.input_size, scale=(cfg.train_scale_min, 1.0), antialias=True)]
        if cfg.hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize(cfg.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                 T.CenterCrop(cfg.input_size)]
    steps += [T.ToTensor(), T.Normalize(list(cfg.mean), list(cfg.std))]
    return T.Compose(steps)


class TransformedDataset:
    """``(image, label)`` dataset -> ``(float32 C x H x W tensor, label)`` through ``transform``."""

    def __init__(self, base, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels


def stream_loader(shards_dir: str | Path, split: str, transform: Callable, batch_size: int,
                  shuffle_buffer: int = 1000, num_workers: int = 0, seed: int = 0):
    """A WebDataset streaming loader yielding ``(images [B, C, H, W], labels [B])`` batches.

    Shards are split across DDP ranks (``split_by_node``) and then across DataLoader workers
    (``split_by_worker``); with ``shuffle_buffer > 0`` shard order and samples are shuffled (seeded).
    The last partial batch is kept.

    Args:
        shards_dir: folder with the manifest.
        split: split to stream.
        transform: image -> tensor (see :func:`build_transform`).
        batch_size: images per batch.
        shuffle_buffer: sample shuffle buffer; 0 streams in shard order.
        num_workers: DataLoader worker processes.
        seed: shuffle seed.
    """
    import webdataset as wds

    urls = [str(p) for p in shard_paths(shards_dir, split)]
    shuffle = shuffle_buffer > 0
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, seed=seed, detshuffle=shuffle,
                       nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
        .shuffle(shuffle_buffer, seed=seed)
        .decode("pil")
        .to_tuple("png;jpg;jpeg", "cls")
        .map_tuple(lambda im: transform(im.convert("RGB")), int)
        .batched(batch_size, partial=True)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers)
