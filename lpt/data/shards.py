"""Image encoding and WebDataset shard writing.

A split goes to ``<out>/<split>/<split>-%06d.tar``; each sample is ``<key>.cls`` (ASCII class index),
``<key>.json`` (``{"label", "source_id"}``) and ``<key>.png`` (or ``.jpg`` when a JPEG source file is
kept byte-for-byte). Every shard is written under a temporary name and renamed when complete.

Shards are plain POSIX ustar archives (what ``webdataset.TarWriter`` writes, minus the per-member PAX
headers Python's tarfile adds) with fixed owner and mtime, so the same input gives byte-identical shards.
The headers are built directly: ``tarfile.addfile`` cost ~100 us per member, more than the PNG encode.

Images are read and decoded through :mod:`lpt.data.imageio` (allowed formats and sizes, regular files only)
and converted by its :func:`~lpt.data.imageio.to_rgb_array`, the conversion ``lpt predict`` uses too: high-bit-depth
grayscale (PIL modes ``I;16*``, ``I``, ``F``) is reduced to 8 bits by a fixed rule per mode, never by Pillow's
``convert("RGB")``, which clips every value above 255 to white.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from lpt.data.imageio import DECODE_ERRORS, ImageRefused, decode_error, open_image, read_image_file, to_rgb_array
from lpt.data.layout import shard_name
from lpt.data.sources.base import BadItems, Item, Payload
from lpt.utils import sha256_file

__all__ = ["Encoded", "encode_payload", "SplitWriteResult", "write_split", "encoded_items"]

KEEP_FORMATS = {"PNG": "png", "JPEG": "jpg"}
POOL_MIN_ITEMS = 2000  # below this a process pool costs more than it saves
WINDOW_PER_WORKER = 512  # items handed to the pool at once, per worker
WINDOWS_IN_FLIGHT = 3  # windows submitted and not yet written: bounds ingest memory, keeps workers busy


class SizedItems(Protocol):
    """A split as sources hand it over: a list, or anything with ``len()`` that yields items in order."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Item]: ...


@dataclass
class Encoded:
    """An image ready for a shard: bytes, extension, size; or the reason it could not be read."""

    data: bytes = b""
    ext: str = "png"
    width: int = 0
    height: int = 0
    error: str | None = None


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast: shards are read far more than written
    return buf.getvalue()


def _encode_array(arr: np.ndarray) -> Encoded:
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        return Encoded(error=f"expected HxW or HxWx3 uint8 array, got {arr.dtype} {arr.shape}")
    if arr.ndim == 2:  # grayscale is stored as RGB so every image has 3 channels
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    image = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    return Encoded(_png_bytes(image), "png", arr.shape[1], arr.shape[0])


def _encode_bytes(raw: bytes) -> Encoded:
    with open_image(raw) as image:
        fmt, mode = image.format, image.mode
        image.load()  # full decode: truncated files fail here, not at training time
        if fmt in KEEP_FORMATS and mode == "RGB":
            return Encoded(raw, KEEP_FORMATS[fmt], image.width, image.height)
        return _encode_array(to_rgb_array(image))


def encode_payload(payload: Payload) -> Encoded:
    """Turn a source payload into shard bytes; never raises (errors are returned in ``error``).

    Files are read with :func:`lpt.data.imageio.read_image_file` (a FIFO or device is refused, never opened)
    and decoded with :func:`lpt.data.imageio.open_image` (allowed formats and sizes only).
    """
    try:
        if isinstance(payload, np.ndarray):
            return _encode_array(payload)
        raw = read_image_file(payload) if isinstance(payload, (str, Path)) else bytes(payload)
        if not raw:
            return Encoded(error="empty file")
        return _encode_bytes(raw)
    except ImageRefused as err:
        return Encoded(error=str(err))
    except DECODE_ERRORS as err:  # whatever a damaged file makes Pillow raise (lpt.data.imageio)
        return Encoded(error=decode_error(err))


def encoded_items(items: SizedItems, workers: int) -> Iterator[tuple[Item, Encoded]]:
    """``(item, encoded)`` in order, from one pass over ``items``; a process pool encodes when there are
    enough of them.

    Memory stays bounded whatever the split's size: items are handed to the pool in windows of
    ``WINDOW_PER_WORKER * workers``, and at most ``WINDOWS_IN_FLIGHT`` windows are submitted and not yet
    consumed (``Pool.imap`` would instead read the whole input ahead of the workers). While the workers
    encode, this process produces the next window (for the synthetic source: renders it).

    Args:
        items: a split (a list or any sized iterable of :class:`Item`, e.g. a lazily rendered split).
        workers: encoding processes; 1 encodes here.
    """
    if workers <= 1 or len(items) < POOL_MIN_ITEMS:
        for item in items:
            yield item, encode_payload(item.payload)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    window = WINDOW_PER_WORKER * workers
    with ctx.Pool(workers) as pool:
        pending: deque = deque()
        for chunk in _windows(items, window):
            pending.append((chunk, pool.map_async(encode_payload, [item.payload for item in chunk],
                                                  chunksize=max(1, window // (4 * workers)))))
            if len(pending) >= WINDOWS_IN_FLIGHT:
                done, result = pending.popleft()
                yield from zip(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get())


def _windows(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class SplitWriteResult:
    """What was written for one split (feeds the manifest). ``labels`` is a compact int64 array
    (``array('q')``, 8 bytes a sample, not a Python int object each)."""

    shards: list[dict] = field(default_factory=list)
    labels: Sequence[int] = field(default_factory=lambda: array("q"))

    @property
    def count(self) -> int:
        return len(self.labels)


_TAR_BLOCK = 512


def _ustar_header(name: str, size: int) -> bytes:
    """A ustar header block for a regular read-only file (uid/gid 0, mtime 0, owner ``bigdata``)."""
    raw_name = name.encode("utf-8")
    if len(raw_name) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    h = bytearray(_TAR_BLOCK)
    h[0:len(raw_name)] = raw_name
    h[100:108] = b"0000444\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"00000000000\0"
    h[148:156] = b" " * 8  # checksum is computed with this field as spaces
    h[156:157] = b"0"
    h[257:265] = b"ustar\x0000"
    h[265:272] = b"bigdata"
    h[297:304] = b"bigdata"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class _TarSampleWriter:
    """Appends WebDataset samples (``key.ext`` members, sorted by extension) to a binary stream."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if k != "__key__"):
            data = sample[ext]
            self.stream.write(_ustar_header(f"{key}.{ext}", len(data)))
            self.stream.write(data)
            pad = -len(data) % _TAR_BLOCK
            if pad:
                self.stream.write(b"\0" * pad)

    def close(self) -> None:
        self.stream.write(b"\0" * (2 * _TAR_BLOCK))  # end-of-archive marker


class _ShardSink:
    """Rolls over to a new tar every ``maxcount`` samples; each tar is renamed into place when closed."""

    def __init__(self, folder: Path, split: str, maxcount: int) -> None:
        self.folder, self.split, self.maxcount = folder, split, maxcount
        self.shards: list[dict] = []
        self._writer: _TarSampleWriter | None = None
        self._stream = None
        self._count = 0

    def write(self, sample: dict) -> None:
        if self._writer is None or self._count >= self.maxcount:
            self.close()
            self._open()
        self._writer.write(sample)
        self._count += 1

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.folder / f".{name}.tmp"
        self._final = self.folder / name
        self._stream = open(self._tmp, "wb", buffering=1 << 20)
        self._writer = _TarSampleWriter(self._stream)
        self._count = 0

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._stream.close()
        os.replace(self._tmp, self._final)
        self.shards.append({"name": self._final.name, "sha256": sha256_file(self._final), "count": self._count})
        self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._stream.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._writer = None


def write_split(folder: Path, split: str, pairs: Iterable[tuple[Item, Encoded]], bad: BadItems, maxcount: int,
                total: int | None = None) -> SplitWriteResult:
    """Write one split's encoded items to shards; unreadable items go through ``bad`` (raise or skip).

    Args:
        folder: the split's folder (created).
        split: split name (shard and key prefix).
        pairs: ``(item, encode_payload(item.payload))`` in the order they are written, iterated once
            (:func:`encoded_items`).
        bad: bad-item policy.
        maxcount: samples per shard at most.
        total: number of items, for the progress bar (None: no total).

    Returns:
        Shard records (name, sha256, count) and the labels written, in order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sink, result = _ShardSink(folder, split, maxcount), SplitWriteResult()
    try:
        for item, enc in tqdm(pairs, total=total, desc=f"ingest {split}", unit="img",
                              leave=False, mininterval=1.0, disable=None):
            if enc.error is not None:
                bad(item.source_id, enc.error)
                continue
            key = f"{split}_{result.count:07d}"
            meta = json.dumps({"label": int(item.label), "source_id": item.source_id})
            sink.write({"__key__": key, enc.ext: enc.data, "cls": str(int(item.label)).encode(),
                        "json": meta.encode()})
            result.labels.append(int(item.label))
        sink.close()
    except BaseException:
        sink.abort()
        raise
    result.shards = sink.shards
    return result
