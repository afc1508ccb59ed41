"""Synthetic source, long-tail profile, shard format, manifest, determinism and atomic writes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_params

from lpt.data import ingest as ingest_mod
from lpt.data.ingest import IngestError, run_ingest
from lpt.data.longtail import group_labels, longtail_counts
from lpt.data.reader import ShardImages, load_manifest
from lpt.data.sources.synthetic import class_vocabulary, render
from lpt.utils import sha256_file


def test_longtail_profile_matches_cifar100_lt() -> None:
    counts = longtail_counts(100, 500, 100)
    assert counts[0] == 500 and counts[-1] == 5 and sum(counts) == 10847
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(longtail_counts(100, 500, 50)) == 12608
    assert sum(longtail_counts(100, 500, 10)) == 19573


def test_group_conventions_differ_only_at_twenty() -> None:
    counts = [500, 101, 100, 21, 20, 19, 5]
    assert group_labels(counts, "standard") == ["many", "many", "medium", "medium", "medium", "few", "few"]
    assert group_labels(counts, "authors") == ["many", "many", "medium", "medium", "few", "few", "few"]


def test_tiny_manifest_follows_contract(tiny_shards) -> None:
    p = tiny_shards
    m = load_manifest(p.data.out_dir)
    assert m["version"] == 1 and m["source"] == "synthetic" and m["seed"] == p.seed
    assert m["num_classes"] == 10 and len(m["class_names"]) == 10
    assert m["train_counts"] == longtail_counts(10, 40, 10)
    assert m["groups"]["standard"] == group_labels(m["train_counts"], "standard")
    assert m["groups"]["authors"] == group_labels(m["train_counts"], "authors")
    assert m["image_size"] == [32, 32]
    assert m["splits"]["train"]["count"] == sum(m["train_counts"])
    assert m["splits"]["val"]["count"] == 10 * 4 and m["splits"]["test"]["count"] == 10 * 8
    assert set(m["splits"]) == {"train", "val", "test"}, "pretraining data is the pretrain stage's own, not a split"
    assert m["skipped"] == {"count": 0, "items": []}
    for split, info in m["splits"].items():
        assert sum(s["count"] for s in info["shards"]) == info["count"]
        for s in info["shards"]:
            assert s["count"] <= p.data.shard_maxcount
            assert sha256_file(Path(p.data.out_dir) / split / s["name"]) == s["sha256"]


def test_shard_samples_have_cls_json_png_and_unique_dotless_keys(tiny_shards) -> None:
    out = Path(tiny_shards.data.out_dir)
    keys = []
    for shard in sorted(out.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        sample_keys = sorted({n.split(".", 1)[0] for n in members})
        for key in sample_keys:
            assert {f"{key}.cls", f"{key}.json", f"{key}.png"} <= members.keys()
            meta = json.loads(members[f"{key}.json"])
            assert meta["label"] == int(members[f"{key}.cls"]) and meta["source_id"]
        keys += sample_keys
    assert len(keys) == len(set(keys)) and not any("." in k for k in keys)


def test_ingest_is_deterministic_and_seed_dependent(tmp_path: Path, tiny_shards) -> None:
    again = make_tiny_params(tmp_path / "a")
    run_ingest(again)
    other = make_tiny_params(tmp_path / "b", seed=1)
    run_ingest(other)
    shas = lambda p: [s["sha256"] for s in load_manifest(p.data.out_dir)["splits"]["train"]["shards"]]  # noqa: E731
    assert shas(again) == shas(tiny_shards)
    assert shas(other) != shas(tiny_shards)


def test_synthetic_classes_are_learnable_but_not_trivial() -> None:
    """Nearest class mean on raw pixels: well above chance, far from perfect (pose/colour/noise jitter)."""
    combos = np.array(class_vocabulary()[:10])
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 60)
    images = render(combos[labels], 32, 1.0, rng).reshape(len(labels), -1).astype(np.float32)
    train, test = np.arange(len(labels)) % 60 < 40, np.arange(len(labels)) % 60 >= 40
    means = np.stack([images[train & (labels == c)].mean(0) for c in range(10)])
    pred = np.argmin(((images[test][:, None] - means[None]) ** 2).sum(-1), axis=1)
    acc = (pred == labels[test]).mean()
    assert 0.2 < acc < 0.9, acc
    canonical = render(combos[:3], 32, 0.0, np.random.default_rng(1))
    assert np.array_equal(canonical, render(combos[:3], 32, 0.0, np.random.default_rng(2))), "difficulty 0: no jitter"


def test_source_classes_are_disjoint_from_the_targets_and_rendered_at_any_size() -> None:
    from lpt.data.sources.synthetic import VOCABULARY_SIZE, class_name, render_source_classes

    images, labels, names = render_source_classes(7, 3, 24, seed=0)
    assert images.shape == (21, 24, 24, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3] * 7
    targets = {class_name(c) for c in class_vocabulary()[: VOCABULARY_SIZE - 7]}
    assert len(set(names)) == 7 and not set(names) & targets, "source classes are the last of the vocabulary"
    again, labels2, _ = render_source_classes(7, 3, 24, seed=0)
    assert np.array_equal(images, again) and np.array_equal(labels, labels2), "a pure function of its arguments"


def test_failed_ingest_keeps_previous_shards(tmp_path: Path, monkeypatch) -> None:
    params = make_tiny_params(tmp_path)
    run_ingest(params)
    out = Path(params.data.out_dir)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_write = ingest_mod.write_split
    calls = []

    def write_then_crash(folder, split, *args, **kwargs):
        calls.append(split)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interrupt")
        return real_write(folder, split, *args, **kwargs)

    monkeypatch.setattr(ingest_mod, "write_split", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(make_tiny_params(tmp_path, seed=7))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["shards"], "no temp folder left behind"


def test_bad_item_mid_shard_leaves_no_partial_file(tmp_path: Path) -> None:
    from lpt.data.shards import encode_payload, write_split
    from lpt.data.sources.base import BadItems, Item

    good = np.zeros((8, 8, 3), np.uint8)
    items = [Item("ok0", 0, good), Item("ok1", 0, good), Item("broken", 0, b"not an image"), Item("ok3", 0, good)]
    with pytest.raises(IngestError, match="broken"):
        write_split(tmp_path / "train", "train", ((i, encode_payload(i.payload)) for i in items),
                    BadItems(skip=False), maxcount=10)
    assert not list((tmp_path / "train").iterdir()), "the half-written shard must be removed"


def test_empty_train_class_is_an_error(tmp_path: Path) -> None:
    params = make_tiny_params(tmp_path, data__max_per_class=1, data__imbalance_ratio=1)
    assert run_ingest(params).counts["train"] == 10  # one image per class is fine
    from lpt.data.ingest import _check_classes
    from lpt.data.shards import SplitWriteResult
    from lpt.data.sources.base import SourceData

    data = SourceData(class_names=["a", "b"], splits={})
    with pytest.raises(IngestError, match=r"1 \(b\)"):
        _check_classes(data, {"train": SplitWriteResult(labels=[0, 0])})
