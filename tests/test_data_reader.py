"""Random access, transforms and streaming over the tiny shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lpt.config import TransformConfig
from lpt.data.reader import ShardImages, TransformedDataset, build_transform, load_manifest, stream_loader


def test_random_access_in_memory_equals_on_disk(tiny_shards) -> None:
    out = tiny_shards.data.out_dir
    mem, disk = ShardImages(out, "train", in_memory=True), ShardImages(out, "train", in_memory=False)
    manifest = load_manifest(out)
    assert len(mem) == len(disk) == manifest["splits"]["train"]["count"]
    assert mem.labels.dtype == np.int64 and np.array_equal(mem.labels, disk.labels)
    assert np.bincount(mem.labels, minlength=10).tolist() == manifest["train_counts"]
    for i in (0, 17, len(mem) - 1):
        (a, la), (b, lb) = mem[i], disk[i]
        assert la == lb == mem.labels[i]
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    disk.close()


def test_unknown_split_is_a_clear_error(tiny_shards) -> None:
    with pytest.raises(KeyError, match="nope"):
        ShardImages(tiny_shards.data.out_dir, "nope")


def _reference_test_transform(image: Image.Image, cfg: TransformConfig) -> np.ndarray:
    """What the ONNX runtime does in numpy/Pillow: shorter side -> resize, center crop, /255, normalise."""
    w, h = image.size
    if w <= h:
        size = (cfg.resize, int(cfg.resize * h / w))
    else:
        size = (int(cfg.resize * w / h), cfg.resize)
    image = image.resize(size, Image.BILINEAR)
    left = int(round((size[0] - cfg.input_size) / 2.0))
    top = int(round((size[1] - cfg.input_size) / 2.0))
    image = image.crop((left, top, left + cfg.input_size, top + cfg.input_size))
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - np.array(cfg.mean, np.float32)[:, None, None]) / np.array(cfg.std, np.float32)[:, None, None]


def test_test_transform_is_resize_center_crop_normalise() -> None:
    cfg = TransformConfig(input_size=32, resize=36, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 41, 3), dtype=np.uint8))
    out = build_transform(cfg, train=False)(image)
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 32, 32)
    np.testing.assert_allclose(out.numpy(), _reference_test_transform(image, cfg), atol=1e-5)


def test_train_transform_augments_to_input_size() -> None:
    cfg = TransformConfig(input_size=24, train_scale_min=0.3)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    transform = build_transform(cfg, train=True)
    torch.manual_seed(0)
    a, b = transform(image), transform(image)
    assert tuple(a.shape) == (3, 24, 24) and a.dtype == torch.float32
    assert not torch.equal(a, b), "train transform must be random"
    assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6


def test_transformed_dataset_yields_tensors(tiny_shards) -> None:
    ds = TransformedDataset(ShardImages(tiny_shards.data.out_dir, "val"), build_transform(TransformConfig(), False))
    x, y = ds[3]
    assert tuple(x.shape) == (3, 32, 32) and isinstance(y, int) and len(ds) == 40
    assert np.array_equal(ds.labels, ds.base.labels)


def _stream_labels(out, **kwargs) -> list[int]:
    loader = stream_loader(out, "train", build_transform(TransformConfig(), False), **kwargs)
    labels = []
    for x, y in loader:
        assert x.shape[1:] == (3, 32, 32) and len(x) == len(y) <= kwargs["batch_size"]
        labels += y.tolist()
    return labels


def test_stream_loader_covers_split_once_per_worker_split(tiny_shards) -> None:
    out = tiny_shards.data.out_dir
    expected = sorted(ShardImages(out, "train").labels.tolist())
    assert sorted(_stream_labels(out, batch_size=16, shuffle_buffer=50, num_workers=0, seed=0)) == expected
    assert sorted(_stream_labels(out, batch_size=16, shuffle_buffer=0, num_workers=2, seed=0)) == expected


def test_stream_loader_splits_shards_by_node(tiny_shards, monkeypatch) -> None:
    out = tiny_shards.data.out_dir
    expected = sorted(ShardImages(out, "train").labels.tolist())
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(_stream_labels(out, batch_size=8, shuffle_buffer=0, num_workers=0, seed=0))
    assert per_rank[0] and per_rank[1]
    assert sorted(per_rank[0] + per_rank[1]) == expected
