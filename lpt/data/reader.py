"""Reading shards: the manifest, random access (:class:`ShardImages`), streaming, and transforms.

Random access scans each shard's tar headers once into an index of numpy arrays; with ``in_memory`` the
encoded image bytes are kept in RAM (32 px PNGs: ~3 KB each), otherwise each access reads the image from
its shard file (``os.pread``). Images are decoded on access, so a DataLoader's workers share the decoding.

Nothing read from disk is trusted. Every reader checks each shard against the manifest *before any of its
samples is used*: the sha256 of the shard's bytes, its sample count, and that the per-shard counts add up
to the split's count; the manifest's shard names must be plain file names. A mismatch, an image that does
not decode, a ``.cls`` that is not a class index, or a sample without an image is one :class:`ShardError`
naming the shard file, the split and the sample key. The check is here, in the reader, so a run outside
``dvc repro`` is exactly as safe as one inside. Shard files in a split folder that the manifest does not
list are never opened by readers (``lpt validate`` reports them).
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lpt.data.imageio import open_image, to_rgb_array
from lpt.data.layout import MANIFEST_FILE

__all__ = ["ShardError", "load_manifest", "group_counts", "split_records", "shard_paths", "verify_shard", "verify_split",
           "decode_image", "parse_shard", "iter_shard_samples", "ShardImages", "build_transform",
           "TransformedDataset", "stream_samples", "stream_loader"]

IMAGE_EXTS = ("png", "jpg", "jpeg")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for bytes that are not a (safe) image."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ShardError(RuntimeError):
    """Shards cannot be trusted or read: a shard differs from the manifest (sha256, sample count, split
    total), the manifest is malformed, or a sample inside a verified shard is broken (an image that does not
    decode, a ``.cls`` that is not a class index). The message names the file, the split and the sample."""


# ------------------------------------------------------------------------------------------ manifest
def load_manifest(path_or_dir: str | Path) -> dict[str, Any]:
    """Read the manifest: a manifest file, or a shards folder containing ``manifest.json``.

    Raises:
        FileNotFoundError: with the path, when there is no manifest (run ``lpt ingest`` first).
        ShardError: the file is not JSON, or not a manifest (the message names the key at fault).
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (run `lpt ingest` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ShardError(f"{path}: not a valid manifest ({type(err).__name__}: {err}); "
                         f"run `lpt ingest` again") from None
    _check_manifest(manifest, path)
    return manifest


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_manifest(manifest: Any, path: Path) -> None:
    """The keys readers rely on exist with the right types (shard records: :func:`split_records`)."""
    if not isinstance(manifest, dict):
        raise ShardError(f"{path}: not a manifest (a JSON {type(manifest).__name__}, expected an object)")
    if not _is_int(manifest.get("num_classes"), 1):
        raise ShardError(f"{path}: num_classes must be a positive integer, got {manifest.get('num_classes')!r}")
    names = manifest.get("class_names")
    if not isinstance(names, list) or len(names) != manifest["num_classes"]:
        raise ShardError(f"{path}: class_names must be a list of num_classes ({manifest['num_classes']}) names")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise ShardError(f"{path}: splits must be an object (split name -> count, num_classes, shards)")
    for split, info in splits.items():
        where = f"{path}: splits.{split}"
        if not isinstance(info, dict):
            raise ShardError(f"{where}: expected an object, got {type(info).__name__}")
        if not _is_int(info.get("count")) or not _is_int(info.get("num_classes"), 1):
            raise ShardError(f"{where}: count and num_classes must be integers")
        if not isinstance(info.get("shards"), list):
            raise ShardError(f"{where}.shards must be a list")


def group_counts(manifest: dict, where: str | Path = MANIFEST_FILE) -> list[int]:
    """Per-class counts that define the A-GCL cloud size and the many/medium/few groups: ``train_counts``,
    the images each class trains on (after any val carve; the carve never leaves a class fewer than
    ``data.min_train_per_class``, so a tail class keeps its count). ``full_train_counts`` (before the carve)
    stays in the manifest for reference.

    Raises:
        ShardError: the counts are not ``num_classes`` non-negative integers.
    """
    key = "train_counts"
    counts = manifest.get(key)
    if not isinstance(counts, list) or len(counts) != manifest["num_classes"] or not all(_is_int(c) for c in counts):
        raise ShardError(f"{where}: {key} must be a list of num_classes ({manifest['num_classes']}) non-negative "
                         "integers; run `lpt ingest` again")
    return [int(c) for c in counts]


def split_records(manifest: dict, split: str, where: str | Path = MANIFEST_FILE) -> list[dict]:
    """The checked shard records ``{name, sha256, count}`` of ``split``.

    Args:
        manifest: a manifest from :func:`load_manifest`.
        split: split name.
        where: the manifest's path, for messages.

    Raises:
        KeyError: the manifest has no such split.
        ShardError: a record is malformed (a name that is not a plain ``.tar`` file name, a sha256 that is
            not 64 hex digits, a negative count) or the shard counts do not add up to the split's count.
    """
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} not in the manifest (has {sorted(manifest['splits'])})")
    info = manifest["splits"][split]
    records = info["shards"]
    for i, rec in enumerate(records):
        at = f"{where}: splits.{split}.shards[{i}]"
        if not isinstance(rec, dict):
            raise ShardError(f"{at}: expected an object with name, sha256, count")
        name = rec.get("name")
        if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or not name.endswith(".tar"):
            raise ShardError(f"{at}: name {name!r} is not a plain .tar file name (shards live in <out_dir>/{split}/)")
        if not isinstance(rec.get("sha256"), str) or not _SHA256.match(rec["sha256"]):
            raise ShardError(f"{at}: sha256 must be 64 lowercase hex digits")
        if not _is_int(rec.get("count")):
            raise ShardError(f"{at}: count must be a non-negative integer")
    total = sum(rec["count"] for rec in records)
    if total != info["count"]:
        raise ShardError(f"{where}: split {split}: its shards hold {total} samples but splits.{split}.count says "
                         f"{info['count']}")
    return records


def shard_paths(shards_dir: str | Path, split: str, manifest: dict | None = None) -> list[Path]:
    """Shard files of ``split`` in manifest order (records checked, bytes not: see :func:`verify_split`).

    Raises:
        KeyError: the manifest has no such split.
        FileNotFoundError: a listed shard is missing.
        ShardError: a malformed shard record (see :func:`split_records`).
    """
    shards_dir = Path(shards_dir)
    manifest = manifest if manifest is not None else load_manifest(shards_dir)
    records = split_records(manifest, split, shards_dir / MANIFEST_FILE)
    paths = [shards_dir / split / rec["name"] for rec in records]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: shard listed in the manifest is missing (split {split})")
    return paths


# ------------------------------------------------------------------------------------------ shards
def verify_shard(path: Path, raw: bytes | mmap.mmap, record: dict, split: str) -> None:
    """Check a shard's bytes against its manifest record (sha256; the count is checked after parsing).

    Raises:
        ShardError: naming the shard file and split, expected and actual sha256.
    """
    actual = hashlib.sha256(raw).hexdigest()
    if actual != record["sha256"]:
        raise ShardError(f"{path}: shard of split {split} does not match the manifest: sha256 {actual[:16]}... "
                         f"!= {record['sha256'][:16]}... (changed or truncated; run `lpt ingest` again)")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image (:mod:`lpt.data.imageio`: allowed formats and sizes only, and
    the pixels ``lpt predict`` computes from the same bytes)."""
    with open_image(data) as im:
        return Image.fromarray(to_rgb_array(im))  # HxWx3 uint8: RGB


def _tar_members(path: Path, raw: bytes | mmap.mmap) -> list[tuple[str, int, int]]:
    """``(name, data offset, size)`` of every regular file in a tar whose bytes are ``raw``.

    Parses ustar headers directly (~20x faster than ``tarfile`` iteration, which would dominate the read
    time of small images); any header it does not handle (PAX, GNU long names) falls back to ``tarfile``.

    Raises:
        ShardError: a header that does not parse, or a member that runs past the end of the file.
    """
    out: list[tuple[str, int, int]] = []
    pos, end = 0, len(raw)
    try:
        while pos + 512 <= end:
            header = raw[pos: pos + 512]
            if header[0] == 0:  # end-of-archive block
                return out
            typeflag = header[156:157]
            if header[257:262] != b"ustar" or typeflag not in (b"0", b"\0") or header[345] != 0:
                return _tar_members_slow(path, raw)
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            if pos + 512 + size > end:
                raise ShardError(f"{path}: tar member {name} runs past the end of the file (truncated shard)")
            out.append((name, pos + 512, size))
            pos += 512 + size + (-size % 512)
    except (ValueError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not a readable tar shard (bad header at byte {pos}: {err})") from None
    return out


def _tar_members_slow(path: Path, raw: bytes | mmap.mmap) -> list[tuple[str, int, int]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(raw)), mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except tarfile.TarError as err:
        raise ShardError(f"{path}: not a readable tar shard ({err})") from None


def parse_shard(path: Path, raw: bytes | mmap.mmap, image_bytes: bool = True) -> list[tuple[str, dict]]:
    """``(key, {ext: bytes or (offset, size)})`` per sample of a shard's bytes ``raw`` (nothing verified).

    Members are grouped into samples by consecutive key.

    Raises:
        ShardError: the tar does not parse (``path`` names it).
    """
    samples: list[tuple[str, dict]] = []
    current, parts = None, {}
    for name, offset, size in _tar_members(path, raw):
        key, _, ext = name.partition(".")
        if key != current and current is not None:
            samples.append((current, parts))
            parts = {}
        current = key
        lazy = not image_bytes and ext in IMAGE_EXTS
        parts[ext] = (offset, size) if lazy else bytes(raw[offset: offset + size])
    if current is not None:
        samples.append((current, parts))
    return samples


def _read_checked(path: Path, record: dict | None, split: str | None, image_bytes: bool) -> list[tuple[str, dict]]:
    """Read a shard once; with a ``record``, verify its sha256 and sample count before returning samples."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if record is not None:
        verify_shard(path, raw, record, split or "?")
    samples = parse_shard(path, raw, image_bytes)
    if record is not None and len(samples) != record["count"]:
        raise ShardError(f"{path}: shard of split {split} holds {len(samples)} samples, the manifest says "
                         f"{record['count']} (run `lpt ingest` again)")
    return samples


def iter_shard_samples(path: str | Path, image_bytes: bool = True, *, record: dict | None = None,
                       split: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(key, {ext: bytes})`` per sample of one tar shard, in file order.

    The file is read once and parsed whole before the first sample is yielded, so with ``record`` a shard
    that differs from the manifest raises before any of its samples is used.

    Args:
        path: a tar shard.
        image_bytes: read image members; when False an image member gives ``(offset, size)`` of its data
            in the file instead (``cls``/``json`` are always read).
        record: the shard's manifest record ``{name, sha256, count}``: verify against it (readers of a
            split always pass it; without it nothing is verified - a tool's raw view of one file).
        split: the split, for messages.

    Raises:
        ShardError: (with ``record``) sha256 or sample count differ; (always) the tar does not parse.
    """
    yield from _read_checked(Path(path), record, split, image_bytes)


def verify_split(shards_dir: str | Path, split: str, manifest: dict | None = None) -> list[Path]:
    """Read every shard of ``split`` once and check it against the manifest; return the shard paths.

    For readers that cannot keep the bytes they check (streaming): they call this before any sample.

    Raises:
        KeyError, FileNotFoundError, ShardError: as :func:`shard_paths` and :func:`iter_shard_samples`.
    """
    shards_dir = Path(shards_dir)
    manifest = manifest if manifest is not None else load_manifest(shards_dir)
    paths = shard_paths(shards_dir, split, manifest)
    for path, record in zip(paths, split_records(manifest, split)):
        _read_checked(path, record, split, image_bytes=False)
    return paths


def _image_ext(parts: dict, where: str) -> str:
    for ext in IMAGE_EXTS:
        if ext in parts:
            return ext
    raise ShardError(f"{where}: sample has no image member (has {sorted(parts)})")


def _label(parts: dict, num_classes: int, where: str) -> int:
    """The sample's ``.cls`` as a class index in ``[0, num_classes)``."""
    try:
        label = int(parts["cls"])
    except (KeyError, ValueError, TypeError):
        raise ShardError(f"{where}: .cls {parts.get('cls')!r} is not a class index") from None
    if not 0 <= label < num_classes:
        raise ShardError(f"{where}: .cls {label} is outside [0, {num_classes}) of the manifest")
    return label


class SampleKeys(Sequence[str]):
    """Sample keys held as one numpy bytes array (a few bytes a key, no Python string each); a read-only
    sequence of ``str``."""

    def __init__(self, raw: np.ndarray) -> None:
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [k.decode("utf-8", "replace") for k in self.raw[index]]
        return self.raw[index].decode("utf-8", "replace")

    def index(self, key: str, start: int = 0, stop: int | None = None) -> int:  # type: ignore[override]
        hits = np.flatnonzero(self.raw[start:stop] == key.encode("utf-8"))
        if not len(hits):
            raise ValueError(f"{key!r} is not a sample key of this split")
        return int(hits[0]) + start


class ShardImages:
    """Random access over one split: ``ds[i] -> (PIL RGB image, label)``.

    Opening reads each shard once and verifies it (sha256 of the bytes just read, sample count, split
    total, every ``.cls`` a class index) before the dataset can be used; a broken image is found when it
    is decoded.

    The index is a handful of numpy arrays (shard, offset and size of each image, label, key), about 40
    bytes a sample whatever the split's size: no Python object per sample. With ``in_memory`` the encoded
    images are kept in RAM (small datasets); otherwise each access reads the image's bytes from its shard
    with ``os.pread`` (one system call, served by the page cache): nothing of the split is mapped into the
    process, so its resident memory does not grow with the samples it has read (a memory map would count
    every page touched in the process's RSS).

    Args:
        shards_dir: folder with ``manifest.json`` and one sub-folder per split.
        split: ``train``, ``val``, or ``test``.
        in_memory: keep the encoded bytes in RAM (else read them from the shard files on each access).

    Attributes:
        labels: int64 labels, aligned with indices.
        keys: sample keys (:class:`SampleKeys`: a sequence of str over one numpy bytes array), aligned
            with indices.
        num_classes: classes of this split per the manifest.

    Raises:
        KeyError: unknown split. FileNotFoundError: no manifest or a listed shard is missing.
        ShardError: a shard differs from the manifest, or (on access) an image does not decode.
    """

    def __init__(self, shards_dir: str | Path, split: str, in_memory: bool = True) -> None:
        self.shards_dir, self.split, self.in_memory = Path(shards_dir), split, in_memory
        manifest = load_manifest(self.shards_dir)
        self.paths = shard_paths(self.shards_dir, split, manifest)
        records = split_records(manifest, split)
        self.num_classes = int(manifest["splits"][split]["num_classes"])
        self.class_names = manifest["splits"][split].get("class_names", manifest["class_names"])
        self._data: list[bytes] = []  # in_memory only
        labels, keys, shard_of, offsets, sizes = [], [], [], [], []  # one small array per shard
        for shard_idx, (path, record) in enumerate(zip(self.paths, records)):
            samples = _read_checked(path, record, split, image_bytes=in_memory)
            lab = np.empty(len(samples), np.int64)
            off = np.zeros(len(samples), np.int64)
            size = np.zeros(len(samples), np.int64)
            for j, (key, parts) in enumerate(samples):
                where = f"{path}: sample {key} (split {split})"
                ext = _image_ext(parts, where)
                lab[j] = _label(parts, self.num_classes, where)
                if in_memory:
                    self._data.append(parts[ext])
                else:
                    off[j], size[j] = parts[ext]
            labels.append(lab)
            keys.append(np.array([key.encode("utf-8") for key, _ in samples], dtype=np.bytes_))
            shard_of.append(np.full(len(samples), shard_idx, np.int32))
            offsets.append(off)
            sizes.append(size)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.keys = SampleKeys(np.concatenate(keys) if keys else np.zeros(0, dtype="S1"))
        self._shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self._offset = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self._size = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
        self._files: dict[int, int] = {}  # shard index -> file descriptor (this process's)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.labels)

    def key(self, index: int) -> str:
        """The key of sample ``index``."""
        return self.keys[index]

    def _read_at(self, shard_idx: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # forked DataLoader worker: open its own descriptors
            self._files, self._pid = {}, os.getpid()
        fd = self._files.get(shard_idx)
        if fd is None:
            fd = self._files[shard_idx] = os.open(self.paths[shard_idx], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ShardError(f"{self.paths[shard_idx]}: sample at byte {offset} is cut short (the shard changed "
                             f"after it was verified; run `lpt ingest` again)")
        return data

    def image_bytes(self, index: int) -> bytes:
        """The encoded image of sample ``index``."""
        if self.in_memory:
            return self._data[index]
        return self._read_at(int(self._shard_of[index]), int(self._offset[index]), int(self._size[index]))

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        try:
            image = decode_image(self.image_bytes(index))
        except DECODE_ERRORS as err:
            path = self.paths[int(self._shard_of[index])]
            raise ShardError(f"{path}: sample {self.key(index)} (split {self.split}): image does not decode "
                             f"({type(err).__name__}: {err})") from None
        return image, int(self.labels[index])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def close(self) -> None:
        """Close the shard files (only opened when not in memory)."""
        if self._pid == os.getpid():
            for fd in self._files.values():
                os.close(fd)
        self._files = {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to do
            pass


def _check_resolved(cfg) -> None:
    """Refuse a ``transforms`` section whose nulls (= from the model) were not filled from a backbone."""
    unresolved = [k for k in ("input_size", "resize", "mean", "std") if getattr(cfg, k) is None]
    if unresolved:
        raise ValueError(f"transforms.{unresolved[0]} is null (= from the model) and was not resolved against a "
                         "backbone (lpt.model.backbone.resolve_transforms); set it explicitly for this command")


def build_transform(cfg, train: bool) -> Callable[[Image.Image], "torch.Tensor"]:  # noqa: F821
    """Train or test preprocessing from the ``transforms`` section.

    Train: RandomResizedCrop(input_size, scale=(train_scale_min, 1)) [+ horizontal flip]. Test:
    Resize(shorter side to ``resize``, bilinear, antialias) + CenterCrop(input_size) — the ONNX runtime
    reproduces exactly this in numpy/Pillow. Both end with ToTensor + Normalize(mean, std).

    Args:
        cfg: the ``transforms`` section with every field set: a ``TransformConfig`` without nulls, or
            :func:`lpt.model.backbone.resolve_transforms`' result (which fills nulls from the model).
        train: train (augmenting) or test (deterministic) pipeline.

    Raises:
        ValueError: a field is still null ("from the model"): resolve it against the backbone first.
    """
    from torchvision import transforms as T

    _check_resolved(cfg)
    if train:
        steps = [T.RandomResizedCrop(cfg.input_size, scale=(cfg.train_scale_min, 1.0), antialias=True)]
        if cfg.hflip:
            steps.append(T.RandomHorizontalFlip())
    else:
        steps = [T.Resize(cfg.resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                 T.CenterCrop(cfg.input_size)]
    steps += [T.ToTensor(), T.Normalize(list(cfg.mean), list(cfg.std))]
    return T.Compose(steps)


TTE_RESIZE_RATIO = 248 / 224
"""LIFT's test-time ensembling resizes a 224 px model's images to 224 + 24 = 248 before its five crops; other
input sizes keep the ratio (32 px -> 35)."""


def five_crop_transform(cfg) -> Callable[[Image.Image], "torch.Tensor"]:  # noqa: F821
    """LIFT's test-time ensembling views: [5, 3, H, W] per image.

    Resize (shorter side to ``round(input_size * 248 / 224)``, bilinear, antialias), then the four corner
    crops and the centre crop of ``input_size`` (torchvision ``FiveCrop``), each through ToTensor +
    Normalize(mean, std). The logits of the five views are averaged (:func:`lpt.evaluate.collect_stats`).

    Args:
        cfg: the ``transforms`` section with every field set (as for :func:`build_transform`).
    """
    import torch
    from torchvision import transforms as T

    _check_resolved(cfg)
    size = int(cfg.input_size)
    resize = T.Resize(round(size * TTE_RESIZE_RATIO), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
    crops = T.FiveCrop(size)
    tail = T.Compose([T.ToTensor(), T.Normalize(list(cfg.mean), list(cfg.std))])

    def views(img: Image.Image) -> torch.Tensor:
        return torch.stack([tail(c) for c in crops(resize(img))])  # [5, 3, H, W]

    return views


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


def stream_samples(shards_dir: str | Path, split: str, shuffle_buffer: int = 1000, seed: int = 0,
                   manifest: dict | None = None):
    """A WebDataset pipeline of the raw samples of ``split`` (dicts with ``__key__``, ``cls``, the image).

    Shards are split across DDP ranks (``split_by_node``: rank ``r`` of ``W`` takes shards ``r, r + W, ...``)
    and then across DataLoader workers (``split_by_worker``), so over all ranks and workers every sample
    comes exactly once per pass (tests/test_scale.py checks it with two processes as two nodes). With
    ``shuffle_buffer > 0`` shard order and samples are shuffled (seeded). Every shard is checked against the
    manifest before any sample is read.

    Args:
        shards_dir: folder with the manifest.
        split: split to stream.
        shuffle_buffer: sample shuffle buffer; 0 streams in shard order.
        seed: shuffle seed.
        manifest: the split's manifest if the caller already loaded it (default: read it here).
    """
    import webdataset as wds

    manifest = manifest if manifest is not None else load_manifest(shards_dir)
    urls = [str(p) for p in verify_split(shards_dir, split, manifest)]  # every shard, before any sample
    shuffle = shuffle_buffer > 0
    return (wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, seed=seed, detshuffle=shuffle,
                           nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker, empty_check=False)
            .shuffle(shuffle_buffer, seed=seed))


def stream_loader(shards_dir: str | Path, split: str, transform: Callable, batch_size: int,
                  shuffle_buffer: int = 1000, num_workers: int = 0, seed: int = 0):
    """A WebDataset streaming loader yielding ``(images [B, C, H, W], labels [B])`` batches of
    :func:`stream_samples` (split across ranks and workers). The last partial batch is kept.

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

    manifest = load_manifest(shards_dir)
    num_classes = int(manifest["splits"][split]["num_classes"])
    dataset = (stream_samples(shards_dir, split, shuffle_buffer, seed, manifest)
               .map(_StreamSample(transform, split, num_classes))
               .batched(batch_size, partial=True))
    return wds.WebLoader(dataset, batch_size=None, num_workers=num_workers)


class _StreamSample:
    """A streamed sample dict -> ``(transform(image), label)``; a broken sample is a :class:`ShardError`."""

    def __init__(self, transform: Callable, split: str, num_classes: int) -> None:
        self.transform, self.split, self.num_classes = transform, split, num_classes

    def __call__(self, sample: dict) -> tuple[Any, int]:
        where = f"{sample.get('__url__')}: sample {sample.get('__key__')} (split {self.split})"
        ext = _image_ext(sample, where)
        label = _label(sample, self.num_classes, where)
        try:
            image = decode_image(sample[ext])
        except DECODE_ERRORS as err:
            raise ShardError(f"{where}: image does not decode ({type(err).__name__}: {err})") from None
        return self.transform(image), label
