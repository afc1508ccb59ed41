"""Every source on tiny data the tests create (plus real Fashion-MNIST when installed), and bad inputs."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_params
from PIL import Image

from lpt.data.ingest import IngestError, run_ingest
from lpt.data.longtail import longtail_counts
from lpt.data.reader import ShardImages, load_manifest

FMNIST = Path("/usr/share/datasets/fashion-mnist")
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------ fakes
def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def fake_fashion_mnist(root: Path, per_class: int = 12, test_per_class: int = 3, drop_labels: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), n)
        images = RNG.integers(0, 256, (len(labels), 8, 8))
        if prefix == "train" and drop_labels:
            labels = labels[:-drop_labels]
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    return root


def fake_cifar100(path: Path, per_class: int = 6, test_per_class: int = 2, as_tarball: bool = True) -> Path:
    def batch(n: int) -> dict:
        labels = np.repeat(np.arange(100), n)
        return {b"data": RNG.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"fine_labels": labels.tolist()}

    members = {"train": batch(per_class), "test": batch(test_per_class),
               "meta": {b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)]}}
    if not as_tarball:
        base = path / "cifar-100-python"
        base.mkdir(parents=True)
        for name, obj in members.items():
            (base / name).write_bytes(pickle.dumps(obj))
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            raw = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def png(path: Path, size: tuple[int, int] = (10, 12), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def fake_imagefolder(root: Path, train: dict[str, int], test: int = 2, val: int | None = None) -> Path:
    for name, n in train.items():
        for i in range(n):
            png(root / "train" / name / f"{i}.png")
        for i in range(test):
            png(root / "test" / name / f"t{i}.png", mode="L" if i else "RGB")
        for i in range(val or 0):
            png(root / "val" / name / f"v{i}.jpg")
    return root


def fake_list(root: Path, per_class: list[int], test: int = 2) -> dict[str, Path]:
    lines = {"train": [], "test": []}
    for c, n in enumerate(per_class):
        for i in range(n):
            lines["train"].append(f"images/c{c}/img {i}.png {c}")
            png(root / "images" / f"c{c}" / f"img {i}.png")
        for i in range(test):
            lines["test"].append(f"images/c{c}/test{i}.png {c}")
            png(root / "images" / f"c{c}" / f"test{i}.png")
    files = {}
    for split, rows in lines.items():
        files[split] = root / f"{split}.txt"
        files[split].write_text("# comment\n" + "\n".join(rows) + "\n\n")
    return files


def fake_inat(root: Path, per_class: list[int], val: int = 2) -> dict[str, Path]:
    cat_ids = [100 + 7 * c for c in range(len(per_class))]  # non-contiguous ids, like real category ids
    out = {}
    for split, counts in (("train", per_class), ("val", [val] * len(per_class))):
        images, anns = [], []
        for c, n in enumerate(counts):
            for i in range(n):
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": f"{split}/{c}/{i}.jpg"})
                anns.append({"id": image_id, "image_id": image_id, "category_id": cat_ids[c]})
                png(root / split / str(c) / f"{i}.jpg")
        doc = {"images": images, "annotations": anns,
               "categories": [{"id": cid, "name": f"species {cid}"} for cid in cat_ids]}
        out[split] = root / f"{split}2018.json"
        out[split].write_text(json.dumps(doc))
    return out


def _tiny(tmp_path: Path, **kw):
    base = dict(data__imbalance_ratio=4, data__max_per_class=8, data__val_per_class=2, data__test_per_class=2)
    base.update(kw)
    return make_tiny_params(tmp_path / "out", **base)


# ------------------------------------------------------------------------------------------ sources
def test_fashion_mnist_fake_idx(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path / "fm")
    params = _tiny(tmp_path, data__source="fashion_mnist", data__fashion_mnist={"root": str(root)})
    result = run_ingest(params)
    m = load_manifest(result.manifest_path)
    assert m["train_counts"] == longtail_counts(10, 8, 4) and m["class_names"][0] == "T-shirt/top"
    assert result.counts == {"train": sum(m["train_counts"]), "val": 20, "test": 30}  # whole official test set
    image, _ = ShardImages(params.data.out_dir, "val")[0]
    assert image.mode == "RGB" and image.size == (8, 8) and m["image_size"] == [8, 8]
    train_ids = {json.loads(p)["source_id"] for p in _json_members(params, "train")}
    val_ids = {json.loads(p)["source_id"] for p in _json_members(params, "val")}
    assert not train_ids & val_ids, "val is carved from the pool disjoint from train"


def _json_members(params, split: str) -> list[bytes]:
    out = []
    for shard in sorted((Path(params.data.out_dir) / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [tar.extractfile(m).read() for m in tar if m.name.endswith(".json")]
    return out


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST not installed (Debian dataset-fashion-mnist)")
def test_real_fashion_mnist_ingests_and_validates(tmp_path: Path) -> None:
    from lpt.data.validate import run_validation

    params = make_tiny_params(tmp_path, data__source="fashion_mnist", data__imbalance_ratio=10,
                              data__max_per_class=60, data__val_per_class=5, data__shard_maxcount=5000)
    result = run_ingest(params)
    assert result.counts == {"train": sum(longtail_counts(10, 60, 10)), "val": 50, "test": 10000}
    outcome = run_validation(params)
    assert outcome.success, outcome.failures


@pytest.mark.parametrize("as_tarball", [True, False])
def test_cifar100_lt_protocol(tmp_path: Path, as_tarball: bool) -> None:
    path = fake_cifar100(tmp_path / ("cifar-100-python.tar.gz" if as_tarball else "cifar"), as_tarball=as_tarball)
    params = _tiny(tmp_path, data__source="cifar100", data__cifar100={"path": str(path)}, data__max_per_class=5,
                   data__imbalance_ratio=5, data__val_per_class=1)
    result = run_ingest(params)
    m = load_manifest(result.manifest_path)
    assert m["num_classes"] == 100 and m["class_names"][:2] == ["class00", "class01"]
    assert m["train_counts"] == longtail_counts(100, 5, 5) and m["train_counts"][-1] == 1
    assert result.counts["val"] == 100 and result.counts["test"] == 200
    # the LDAM recipe: per class, one seeded shuffle in class order; train takes the first n_c
    rng, labels = np.random.RandomState(params.seed), np.repeat(np.arange(100), 6)
    expected = set()
    for c in range(100):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        expected |= {f"cifar100/train[{i}]" for i in idx[: m["train_counts"][c]]}
    assert {json.loads(p)["source_id"] for p in _json_members(params, "train")} == expected


def test_list_source_with_held_out_val_and_paths_with_spaces(tmp_path: Path) -> None:
    files = fake_list(tmp_path / "lst", [6, 4, 2])
    (tmp_path / "names.txt").write_text("cat\ndog\nfox\n")
    params = _tiny(tmp_path, data__source="list", data__list={
        "root": str(tmp_path / "lst"), "train_list": str(files["train"]), "test_list": str(files["test"]),
        "class_names": str(tmp_path / "names.txt")})
    result = run_ingest(params)
    m = load_manifest(result.manifest_path)
    assert m["class_names"] == ["cat", "dog", "fox"] and m["image_size"] is None
    # the carve (val_per_class 2, at most 20 % of a class, never below 5 training images): 1, 0, 0
    assert m["train_counts"] == [5, 4, 2] and result.counts == {"train": 11, "val": 1, "test": 6}
    assert m["full_train_counts"] == [6, 4, 2] and m["groups"]["standard"] == ["few", "few", "few"]
    assert "val carved from the train list: 1 images" in result.summary()


def test_imagefolder_longtail_subsamples_a_balanced_folder(tmp_path: Path) -> None:
    root = fake_imagefolder(tmp_path / "imf", {"a": 10, "b": 10, "c": 10, "d": 10})
    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root), "longtail": True})
    result = run_ingest(params)
    m = load_manifest(result.manifest_path)
    assert m["class_names"] == ["a", "b", "c", "d"] and m["train_counts"] == longtail_counts(4, 8, 4)
    assert result.counts["val"] == 8 and result.counts["test"] == 8
    assert all(im.mode == "RGB" for im, _ in ShardImages(params.data.out_dir, "test"))  # gray stored as RGB


def test_imagefolder_keeps_counts_and_uses_val_folder(tmp_path: Path) -> None:
    root = fake_imagefolder(tmp_path / "imf", {"x": 5, "y": 3}, val=1)
    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)})
    result = run_ingest(params)
    assert load_manifest(result.manifest_path)["train_counts"] == [5, 3] and result.counts["val"] == 2
    with tarfile.open(next((Path(params.data.out_dir) / "val").glob("*.tar"))) as tar:
        assert any(m.name.endswith(".jpg") for m in tar), "RGB JPEGs are kept byte-for-byte"


def test_inat_json_with_val_as_test(tmp_path: Path) -> None:
    files = fake_inat(tmp_path / "inat", [6, 3, 2])
    params = _tiny(tmp_path, data__source="inat", data__inat={
        "root": str(tmp_path / "inat"), "train_json": str(files["train"]), "val_json": str(files["val"])})
    result = run_ingest(params)
    m = load_manifest(result.manifest_path)
    assert m["class_names"] == ["species 100", "species 107", "species 114"]
    assert m["train_counts"] == [5, 3, 2] and result.counts == {"train": 10, "val": 1, "test": 6}


# ------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("source,section", [
    ("fashion_mnist", {"root": "/nonexistent/fm"}),
    ("cifar100", {"path": "/nonexistent/cifar.tar.gz"}),
    ("imagefolder", {"root": "/nonexistent/imf"}),
    ("list", {"root": "/nonexistent/lst", "train_list": "/x/train.txt", "test_list": "/x/test.txt"}),
    ("inat", {"root": "/nonexistent/inat", "train_json": "/x/t.json", "val_json": "/x/v.json"}),
])
def test_missing_input_names_the_path(tmp_path: Path, source: str, section: dict) -> None:
    params = _tiny(tmp_path, data__source=source, **{f"data__{source}": section})
    with pytest.raises(IngestError, match="/nonexistent/"):
        run_ingest(params)
    assert not Path(params.data.out_dir).exists()


def test_corrupt_image_fails_naming_it_or_is_skipped_and_counted(tmp_path: Path) -> None:
    root = fake_imagefolder(tmp_path / "imf", {"a": 4, "b": 4})
    (root / "train" / "a" / "zz_notes.txt").write_text("not an image")
    good = (root / "train" / "b" / "0.png").read_bytes()
    (root / "train" / "b" / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    section = {"root": str(root)}
    with pytest.raises(IngestError, match="zz_"):
        run_ingest(_tiny(tmp_path, data__source="imagefolder", data__imagefolder=section))
    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder=section, data__skip_bad=True)
    result = run_ingest(params)
    skipped = load_manifest(result.manifest_path)["skipped"]
    assert skipped["count"] == 2 and {Path(i["item"].split()[-1]).name for i in skipped["items"]} == {
        "zz_notes.txt", "zz_truncated.png"}
    assert result.counts["train"] + result.counts["val"] == 8


def test_unknown_label_in_list_names_file_and_line(tmp_path: Path) -> None:
    files = fake_list(tmp_path / "lst", [3, 3])
    (tmp_path / "names.txt").write_text("a\nb\n")
    files["test"].write_text(files["test"].read_text() + "images/c0/test0.png 7\nimages/c0/test1.png seven\n")
    section = {"root": str(tmp_path / "lst"), "train_list": str(files["train"]), "test_list": str(files["test"]),
               "class_names": str(tmp_path / "names.txt")}
    with pytest.raises(IngestError, match=r"test\.txt:7: unknown label 7"):
        run_ingest(_tiny(tmp_path, data__source="list", data__list=section))
    result = run_ingest(_tiny(tmp_path, data__source="list", data__list=section, data__skip_bad=True))
    assert load_manifest(result.manifest_path)["skipped"]["count"] == 2 and result.counts["test"] == 4


def test_duplicate_key_in_list_is_reported(tmp_path: Path) -> None:
    files = fake_list(tmp_path / "lst", [3, 3])
    files["train"].write_text(files["train"].read_text() + "images/c1/img 0.png 1\n")
    section = {"root": str(tmp_path / "lst"), "train_list": str(files["train"]), "test_list": str(files["test"])}
    with pytest.raises(IngestError, match=r"train\.txt:9: duplicate key.*train\.txt:5"):
        run_ingest(_tiny(tmp_path, data__source="list", data__list=section))


def test_missing_image_in_list_names_the_line(tmp_path: Path) -> None:
    files = fake_list(tmp_path / "lst", [3, 3])
    files["test"].write_text(files["test"].read_text() + "images/c1/ghost.png 1\n")
    section = {"root": str(tmp_path / "lst"), "train_list": str(files["train"]), "test_list": str(files["test"])}
    with pytest.raises(IngestError, match=r"test\.txt:\d+ .*ghost\.png.*not a readable image"):
        run_ingest(_tiny(tmp_path, data__source="list", data__list=section))


def test_empty_class_is_an_error(tmp_path: Path) -> None:
    root = fake_imagefolder(tmp_path / "imf", {"a": 3, "b": 3})
    (root / "train" / "empty").mkdir()
    with pytest.raises(IngestError, match=r"train/empty: empty class"):
        run_ingest(_tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)}, data__skip_bad=True))
    files = fake_list(tmp_path / "lst", [3, 0, 3])  # label 1 never appears in train
    section = {"root": str(tmp_path / "lst"), "train_list": str(files["train"]), "test_list": str(files["test"])}
    with pytest.raises(IngestError, match=r"no train image: 1 \(1\)"):
        run_ingest(_tiny(tmp_path, data__source="list", data__list=section))


def test_idx_label_file_shorter_than_image_file(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path / "fm", drop_labels=3)
    section = {"root": str(root)}
    with pytest.raises(IngestError, match=r"train-labels-idx1-ubyte\.gz: 117 labels for 120 images"):
        run_ingest(_tiny(tmp_path, data__source="fashion_mnist", data__fashion_mnist=section))
    result = run_ingest(_tiny(tmp_path, data__source="fashion_mnist", data__fashion_mnist=section, data__skip_bad=True))
    assert load_manifest(result.manifest_path)["skipped"]["count"] == 3


def test_not_an_idx_file(tmp_path: Path) -> None:
    root = fake_fashion_mnist(tmp_path / "fm")
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"hello world, not idx"))
    with pytest.raises(IngestError, match=r"t10k-images-idx3-ubyte\.gz: not an IDX file"):
        run_ingest(_tiny(tmp_path, data__source="fashion_mnist", data__fashion_mnist={"root": str(root)}))


def test_corrupt_cifar_tarball(tmp_path: Path) -> None:
    path = tmp_path / "cifar-100-python.tar.gz"
    path.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(IngestError, match="cifar-100-python.tar.gz: not a readable CIFAR-100 tarball"):
        run_ingest(_tiny(tmp_path, data__source="cifar100", data__cifar100={"path": str(path)}))


def test_inat_unknown_category_and_duplicate_image_id(tmp_path: Path) -> None:
    files = fake_inat(tmp_path / "inat", [3, 3])
    doc = json.loads(files["val"].read_text())
    doc["annotations"][0]["category_id"] = 999
    doc["images"].append(dict(doc["images"][1]))
    files["val"].write_text(json.dumps(doc))
    section = {"root": str(tmp_path / "inat"), "train_json": str(files["train"]), "val_json": str(files["val"])}
    with pytest.raises(IngestError, match=r"val2018\.json: images\[4\]: duplicate key"):
        run_ingest(_tiny(tmp_path, data__source="inat", data__inat=section))
    result = run_ingest(_tiny(tmp_path, data__source="inat", data__inat=section, data__skip_bad=True))
    reasons = [i["reason"] for i in load_manifest(result.manifest_path)["skipped"]["items"]]
    assert any("duplicate key" in r for r in reasons) and any("category_id 999" in r for r in reasons)
    assert result.counts["test"] == 3
