"""Nothing read from disk is trusted: crafted pickles, paths out of the root, malformed lists and JSON,
16-bit images, constant images, tampered shards and stale temporaries.

Every refusal is asserted the same way: the expected exception type, one line naming the culprit (file,
line/entry/member/key), no chained traceback, no marker file, nothing half-written.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_params
from PIL import Image

from lpt.data.ingest import IngestError, run_ingest
from lpt.data.reader import ShardError, ShardImages, load_manifest, parse_shard, stream_loader
from lpt.data.sources.cifar100 import ALLOWED_GLOBALS
from lpt.utils import atomic_path, sha256_file, temp_prefix, write_json_atomic

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------ helpers
def _tiny(tmp_path: Path, **kw):
    base = dict(data__imbalance_ratio=4, data__max_per_class=8, data__val_per_class=2, data__test_per_class=2)
    base.update(kw)
    return make_tiny_params(tmp_path / "out", **base)


def _one_clean_line(err: BaseException, *needles: str) -> str:
    """The message is one line, names every needle, and carries no chained traceback."""
    text = str(err)
    assert "\n" not in text, text
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), "chained traceback"
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def _png(path: Path, size: tuple[int, int] = (10, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _list_source(root: Path, per_class: list[int], test: int = 2) -> dict:
    """A list-source dataset under ``root/data`` (the root) with list files beside it."""
    data = root / "data"
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for c, n in enumerate(per_class):
        for i in range(n):
            lines["train"].append(f"c{c}/{i}.png {c}")
            _png(data / f"c{c}" / f"{i}.png")
        for i in range(test):
            lines["test"].append(f"c{c}/t{i}.png {c}")
            _png(data / f"c{c}" / f"t{i}.png")
    section = {"root": str(data)}
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
        section[f"{split}_list"] = str(root / f"{split}.txt")
    return section


def _append(path: str, line: str) -> None:
    Path(path).write_text(Path(path).read_text() + line + "\n")


def _secret(tmp_path: Path) -> Path:
    """A file outside every dataset root, that ingest must not read by default."""
    return _png(tmp_path / "elsewhere" / "secret.png")


# ------------------------------------------------------------------------------------------ 1. CIFAR pickles
class _Reduce:
    """Pickles as ``fn(*args)``: what a crafted CIFAR member would hold."""

    def __init__(self, fn, args: tuple) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, object]:
    """name -> an object whose unpickling creates ``marker``."""
    calls = {
        "os.system": (os.system, (f"touch '{marker}'",)),
        "builtins.open": (builtins.open, (str(marker), "w")),
        "subprocess.call": (subprocess.call, (["touch", str(marker)],)),
    }
    return {name: _Reduce(fn, args) for name, (fn, args) in calls.items()}


def _refused(raw: bytes) -> str:
    """The global of a pickle that the CIFAR unpickler must refuse, as the file names it (protocol 2 writes
    Python 2 names: ``posix.system``, ``commands.call``)."""
    return next(f"{m}.{n}" for m, n in sorted(_globals(raw)) if (m, n) not in ALLOWED_GLOBALS)


def _cifar_tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _legit_members(per_class: int = 6, test_per_class: int = 2) -> dict[str, dict]:
    def batch(n: int) -> dict:
        labels = np.repeat(np.arange(100), n)
        return {b"data": RNG.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"fine_labels": labels.tolist()}

    return {"train": batch(per_class), "test": batch(test_per_class),
            "meta": {b"fine_label_names": [f"class{i:02d}".encode() for i in range(100)]}}


@pytest.mark.parametrize("name", ["os.system", "builtins.open", "subprocess.call"])
@pytest.mark.parametrize("nested", [False, True])
def test_cifar_reduce_payload_is_refused_naming_member_and_global(tmp_path: Path, name: str, nested: bool) -> None:
    def crafted(marker: Path) -> bytes:
        payload = _payloads(marker)[name]
        return pickle.dumps({b"data": payload, b"fine_labels": [0]} if nested else payload, protocol=2)

    control = tmp_path / "control-marker"
    pickle.loads(crafted(control))  # the control: plain pickle really runs it
    assert control.exists(), "the payload must be live for this test to mean anything"

    marker = tmp_path / "marker"
    legit = {k: pickle.dumps(v, protocol=2) for k, v in _legit_members().items()}
    path = _cifar_tarball(tmp_path / "cifar-100-python.tar.gz", {"meta": legit["meta"], "test": legit["test"],
                                                                  "train": crafted(marker)})
    params = _tiny(tmp_path, data__source="cifar100", data__cifar100={"path": str(path)})
    with pytest.raises(IngestError) as info:
        run_ingest(params)
    _one_clean_line(info.value, "cifar-100-python/train", f"refused global {_refused(crafted(marker))}")
    assert not marker.exists(), "the crafted member ran code"
    assert not Path(params.data.out_dir).exists()


def test_cli_refuses_crafted_cifar_with_one_error_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lpt.cli import app
    from lpt.config import write_params_atomic

    marker = tmp_path / "marker"
    legit = {k: pickle.dumps(v, protocol=2) for k, v in _legit_members().items()}
    crafted = pickle.dumps(_payloads(marker)["os.system"], protocol=2)
    path = _cifar_tarball(tmp_path / "cifar-100-python.tar.gz",
                          {"meta": legit["meta"], "test": legit["test"], "train": crafted})
    params = _tiny(tmp_path, data__source="cifar100", data__cifar100={"path": str(path)})
    write_params_atomic(tmp_path / "params.yaml", params.to_dict())
    result = CliRunner().invoke(app, ["ingest", "-p", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "cifar-100-python/train: refused global" in lines[0]
    assert not marker.exists() and not Path(params.data.out_dir).exists()


def test_cifar_payload_in_extracted_folder_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    base = tmp_path / "cifar" / "cifar-100-python"
    base.mkdir(parents=True)
    for name, obj in _legit_members().items():
        (base / name).write_bytes(pickle.dumps(obj, protocol=2))
    (base / "meta").write_bytes(pickle.dumps(_payloads(marker)["os.system"], protocol=2))
    params = _tiny(tmp_path, data__source="cifar100", data__cifar100={"path": str(tmp_path / "cifar")})
    with pytest.raises(IngestError) as info:
        run_ingest(params)
    _one_clean_line(info.value, str(base / "meta"), "refused global")
    assert not marker.exists()


class _Py2Pickler(pickle._Pickler):  # noqa: SLF001 - the pure-Python pickler lets us choose opcodes
    """Writes what Python 2's cPickle wrote for the official CIFAR files: protocol 2, every str as a
    BINSTRING (bytes under ``encoding='bytes'``), numpy globals under ``numpy.core.multiarray``."""

    dispatch = dict(pickle._Pickler.dispatch)  # noqa: SLF001

    def save_py2_str(self, obj) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = {"numpy._core.multiarray": "numpy.core.multiarray"}.get(obj.__module__, obj.__module__)
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__name__}\n".encode())
        self.memoize(obj)


def _py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _globals(raw: bytes) -> set[tuple[str, str]]:
    import pickletools

    return {tuple(arg.split(" ", 1)) for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}


def test_official_format_cifar_pickles_still_ingest(tmp_path: Path) -> None:
    """Python 2 style members (str keys, filenames, batch_label, coarse labels) as the official tarball has."""
    members = {}
    for split, n in (("train", 6), ("test", 2)):
        labels = np.repeat(np.arange(100), n)
        members[split] = _py2_dumps({
            "batch_label": f"{split}ing batch 1 of 1", "filenames": [f"img_{i}.png" for i in range(len(labels))],
            "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
            "data": RNG.integers(0, 256, (len(labels), 3072), dtype=np.uint8)})
    members["meta"] = _py2_dumps({"fine_label_names": [f"class{i:02d}" for i in range(100)],
                                  "coarse_label_names": [f"super{i:02d}" for i in range(20)]})
    assert _globals(members["train"]) == {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                                          ("numpy", "dtype")} <= set(ALLOWED_GLOBALS)
    path = _cifar_tarball(tmp_path / "cifar-100-python.tar.gz", members)
    params = _tiny(tmp_path, data__source="cifar100", data__cifar100={"path": str(path)}, data__max_per_class=5,
                   data__imbalance_ratio=5, data__val_per_class=1)
    result = run_ingest(params)
    manifest = load_manifest(result.manifest_path)
    assert manifest["class_names"][:2] == ["class00", "class01"] and result.counts["test"] == 200


# ------------------------------------------------------------------------------------------ 2. outside the root
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_list_path_outside_root_is_refused_unless_allowed(tmp_path: Path, how: str) -> None:
    section = _list_source(tmp_path / "lst", [3, 3])
    secret = _secret(tmp_path)
    data = Path(section["root"])
    declared = {"absolute": str(secret), "dotdot": os.path.relpath(secret, data), "symlink": "c0/innocent.png"}[how]
    if how == "symlink":
        (data / "c0" / "innocent.png").symlink_to(secret)
    _append(section["train_list"], f"{declared} 0")
    params = _tiny(tmp_path, data__source="list", data__list=section)
    with pytest.raises(IngestError) as info:
        run_ingest(params)
    text = _one_clean_line(info.value, "train.txt:7", str(secret), "outside the dataset root",
                           "data.allow_outside_root: true")
    assert how != "symlink" or "via symlink" in text
    assert not Path(params.data.out_dir).exists()

    allowed = _tiny(tmp_path, data__source="list", data__list=section, data__allow_outside_root=True)
    run_ingest(allowed)
    ids = [json.loads(parts["json"])["source_id"] for split in ("train", "val")
           for shard in sorted((Path(allowed.data.out_dir) / split).glob("*.tar"))
           for _, parts in parse_shard(shard, shard.read_bytes())]
    assert any("train.txt:7" in i for i in ids), "with the switch the outside file is read"


@pytest.mark.parametrize("link", ["file", "class_folder"])
def test_imagefolder_symlink_outside_root_is_refused_unless_allowed(tmp_path: Path, link: str) -> None:
    root = tmp_path / "imf"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / "train" / c / f"{i}.png")
            _png(root / "test" / c / f"{i}.png")
    secret = _secret(tmp_path)
    if link == "file":
        (root / "train" / "a" / "zz.png").symlink_to(secret)
        culprit = root / "train" / "a" / "zz.png"
    else:  # the whole test/b folder lives elsewhere
        shutil.move(root / "test" / "b", tmp_path / "elsewhere" / "b")
        (root / "test" / "b").symlink_to(tmp_path / "elsewhere" / "b")
        culprit = root / "test" / "b"
    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)})
    with pytest.raises(IngestError) as info:
        run_ingest(params)
    _one_clean_line(info.value, f"via symlink {culprit} ->", "outside the dataset root", "data.allow_outside_root")
    assert not Path(params.data.out_dir).exists()
    allowed = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)},
                    data__allow_outside_root=True)
    result = run_ingest(allowed)
    assert result.counts["test"] == 6 and result.counts["train"] + result.counts["val"] == 6 + (link == "file")


def _inat(root: Path, per_class: list[int]) -> dict:
    section = {"root": str(root)}
    for split, counts in (("train", per_class), ("val", [2] * len(per_class))):
        images, anns = [], []
        for c, n in enumerate(counts):
            for i in range(n):
                images.append({"id": len(images) + 1, "file_name": f"{split}/{c}/{i}.png"})
                anns.append({"id": len(anns) + 1, "image_id": len(images), "category_id": 10 + c})
                _png(root / split / str(c) / f"{i}.png")
        doc = {"images": images, "annotations": anns, "categories": [{"id": 10 + c, "name": f"sp{c}"}
                                                                     for c in range(len(per_class))]}
        (root / f"{split}.json").write_text(json.dumps(doc))
        section[f"{split}_json"] = str(root / f"{split}.json")
    return section


def _edit_json(path: str, edit) -> None:
    doc = json.loads(Path(path).read_text())
    doc = edit(doc)
    Path(path).write_text(json.dumps(doc))


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_inat_file_name_outside_root_is_refused_unless_allowed(tmp_path: Path, how: str) -> None:
    section = _inat(tmp_path / "inat", [4, 3])
    secret = _secret(tmp_path)
    file_name = str(secret) if how == "absolute" else "train/0/../../../elsewhere/secret.png"

    def point_out(doc):
        doc["images"][2]["file_name"] = file_name
        return doc

    _edit_json(section["train_json"], point_out)
    params = _tiny(tmp_path, data__source="inat", data__inat=section)
    with pytest.raises(IngestError) as info:
        run_ingest(params)
    _one_clean_line(info.value, "train.json: images[2] (id 3)", str(secret), "data.allow_outside_root: true")
    assert not Path(params.data.out_dir).exists()
    run_ingest(_tiny(tmp_path, data__source="inat", data__inat=section, data__allow_outside_root=True))


# ------------------------------------------------------------------------------------------ 3.-4. lists and JSON
def test_list_duplicate_found_after_normalisation(tmp_path: Path) -> None:
    section = _list_source(tmp_path / "lst", [3, 3])
    _append(section["train_list"], "c1/../c1/./0.png 1")
    with pytest.raises(IngestError) as info:
        run_ingest(_tiny(tmp_path, data__source="list", data__list=section))
    _one_clean_line(info.value, "train.txt:7: duplicate key", "c1/0.png already declared at", "train.txt:4")


def test_negative_list_label_says_negative_and_zero_based(tmp_path: Path) -> None:
    section = _list_source(tmp_path / "lst", [3, 3])
    _append(section["train_list"], "c0/0.png -1")
    with pytest.raises(IngestError) as info:
        run_ingest(_tiny(tmp_path, data__source="list", data__list=section))
    text = _one_clean_line(info.value, "train.txt:7", "negative label -1", "0-based class indices")
    assert "0..0" not in text


def test_out_of_range_train_label_names_its_line_not_just_empty_classes(tmp_path: Path) -> None:
    section = _list_source(tmp_path / "lst", [3, 3])
    _append(section["train_list"], "c1/t0.png 99")  # a typo for 1: would create 97 empty classes
    with pytest.raises(IngestError) as info:
        run_ingest(_tiny(tmp_path, data__source="list", data__list=section))
    _one_clean_line(info.value, "train.txt:7: label 99", "0..99", "0-based", "data.list.class_names")


def test_list_file_not_utf8_is_one_error(tmp_path: Path) -> None:
    section = _list_source(tmp_path / "lst", [3, 3])
    Path(section["test_list"]).write_bytes(b"c0/t0.png 0\n\xff\xfe garbage 1\n")
    with pytest.raises(IngestError) as info:
        run_ingest(_tiny(tmp_path, data__source="list", data__list=section))
    _one_clean_line(info.value, "test.txt", "not UTF-8")


def _set(path: list, value):
    def edit(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return doc
    return edit


@pytest.mark.parametrize("edit,needles", [
    (_set(["annotations", 1, "category_id"], "x"), ["train.json: annotations[1]", 'category_id "x" is not an integer']),
    (_set(["annotations", 1, "image_id"], [1]), ["train.json: annotations[1]", "image_id [1] is not an integer"]),
    (_set(["images"], "oops"), ["train.json", "images is a str"]),
    (lambda doc: _set(["images", 2], {"id": doc["images"][2]["id"]})(doc),
     ["train.json: images[2]", "without file_name"]),
    (_set(["images", 2, "file_name"], 7), ["train.json: images[2] (id 3)", "file_name 7 is not a non-empty string"]),
    (lambda doc: doc["images"], ["train.json", "expected a JSON object", "got a JSON list"]),
    (_set(["categories", 1, "id"], 10), ["train.json: categories[1]", "duplicate category id 10",
                                          "already categories[0]"]),
    (_set(["categories", 0, "id"], "10"), ["train.json: categories[0]", 'category id "10" is not an integer']),
])
def test_malformed_inat_json_is_one_error_naming_the_entry(tmp_path: Path, edit, needles: list[str]) -> None:
    section = _inat(tmp_path / "inat", [4, 3])
    _edit_json(section["train_json"], edit)
    params = _tiny(tmp_path, data__source="inat", data__inat=section)
    with pytest.raises(IngestError) as info:
        run_ingest(params)
    text = _one_clean_line(info.value, *needles)
    assert "have no train image" not in text
    assert not Path(params.data.out_dir).exists()


# ------------------------------------------------------------------------------------------ 5. 16-bit images
def _gradient_file(path: Path, mode: str) -> np.ndarray:
    """A 16 x 64 horizontal gradient over the mode's full range; returns the expected 8-bit values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 1, 64)
    if mode == "F":
        values = np.tile(ramp, (16, 1)).astype(np.float32)
        Image.fromarray(values).save(path)  # float32 -> mode F
        return np.round(values.astype(np.float64) * 255).astype(np.uint8)
    values = np.tile(np.round(ramp * 65535), (16, 1)).astype(np.uint16)
    image = Image.fromarray(values)  # I;16
    if mode == "I;16B":
        image = Image.frombytes("I;16B", image.size, values.astype(">u2").tobytes())
    elif mode == "I":
        image = image.convert("I")
    image.save(path)
    with Image.open(path) as check:
        assert check.mode == mode, f"fixture wrote {check.mode}, wanted {mode}"
    return (values >> 8).astype(np.uint8)


@pytest.mark.parametrize("mode,ext", [("I;16", "png"), ("I;16B", "tif"), ("I", "tif"), ("F", "tif")])
def test_high_bit_depth_gray_keeps_its_gradient(tmp_path: Path, mode: str, ext: str) -> None:
    root = tmp_path / "imf"
    for c in ("a", "b"):
        for i in range(2):
            _png(root / "train" / c / f"{i}.png")
            _png(root / "test" / c / f"{i}.png")
    expected = _gradient_file(root / "test" / "a" / f"zz_gradient.{ext}", mode)
    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)})
    run_ingest(params)
    test = ShardImages(params.data.out_dir, "test")
    index = next(i for i in range(len(test)) if test[i][0].size == (64, 16))
    pixels = np.asarray(test[index][0])
    assert pixels.dtype == np.uint8 and pixels.min() == 0 and pixels.max() == 255, "not all white"
    assert np.array_equal(pixels[..., 0], expected) and np.array_equal(pixels[..., 0], pixels[..., 2])
    assert (np.diff(pixels[0, :, 0].astype(int)) >= 0).all(), "values follow the gradient"


def test_float_image_outside_unit_range_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "imf"
    for c in ("a", "b"):
        for i in range(2):
            _png(root / "train" / c / f"{i}.png")
            _png(root / "test" / c / f"{i}.png")
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(root / "train" / "a" / "hot.tif")
    with pytest.raises(IngestError) as info:
        run_ingest(_tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)}))
    _one_clean_line(info.value, "hot.tif", "outside [0, 1]")


# ------------------------------------------------------------------------------------------ 6. validation
def _copy(params, root: Path, **overrides):
    new = make_tiny_params(root, **overrides)
    shutil.copytree(params.data.out_dir, new.data.out_dir)
    return new


def test_constant_image_fails_validation_naming_shard_key_and_class(tiny_shards, tmp_path: Path) -> None:
    from test_data_validate import _rewrite_split

    from lpt.data.validate import run_validation

    params = _copy(tiny_shards, tmp_path)
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), (200, 10, 10), np.uint8)).save(buf, format="PNG")

    labels = []

    def add_constant(samples):
        labels.append(int(samples[0]["cls"]))
        return samples + [dict(samples[0], __key__="test_flat", png=buf.getvalue())]

    _rewrite_split(params, "test", add_constant)
    label = labels[0]
    name = load_manifest(params.data.out_dir)["class_names"][label]
    result = run_validation(params)
    assert not result.success
    failure = next(f for f in result.failures if "no constant image" in f)
    assert f"test/test-000000.tar:test_flat (class {label} '{name}')" in failure, failure
    assert len(result.failures) == 1, result.failures


def test_missing_class_failure_names_class_index_and_name(tiny_shards, tmp_path: Path) -> None:
    from test_data_validate import _rewrite_split

    from lpt.data.validate import run_validation

    params = _copy(tiny_shards, tmp_path)
    _rewrite_split(params, "test", lambda samples: [s for s in samples if int(s["cls"]) != 3])
    name = load_manifest(params.data.out_dir)["class_names"][3]
    result = run_validation(params)
    failure = next(f for f in result.failures if "every class present in test" in f)
    assert f"test class 3 '{name}': count = 0" in failure and "e.g. [0]" not in failure, failure


# ------------------------------------------------------------------------------------------ 7. shard integrity
def _members(shard: Path) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member."""
    with tarfile.open(shard) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar]


def _first_test_shard(params) -> Path:
    first = load_manifest(params.data.out_dir)["splits"]["test"]["shards"][0]["name"]
    return Path(params.data.out_dir) / "test" / first


def _set_manifest_shard(params, split: str, index: int, **fields) -> None:
    manifest = load_manifest(params.data.out_dir)
    manifest["splits"][split]["shards"][index].update(fields)
    write_json_atomic(Path(params.data.out_dir) / "manifest.json", manifest)


def _readers(params, split: str = "test"):
    """Every way the project opens a split, each to be refused."""
    from lpt.config import TransformConfig
    from lpt.data.reader import build_transform

    out = params.data.out_dir
    yield lambda: ShardImages(out, split, in_memory=True)
    yield lambda: ShardImages(out, split, in_memory=False)
    yield lambda: next(iter(stream_loader(out, split, build_transform(TransformConfig(), False), batch_size=8,
                                          shuffle_buffer=0)))


def test_truncated_shard_is_refused_by_every_reader(tiny_shards, tmp_path: Path) -> None:
    params = _copy(tiny_shards, tmp_path)
    shard = _first_test_shard(params)
    cut = next(off for name, off, _ in _members(shard) if name.startswith("test_0000040."))
    shard.write_bytes(shard.read_bytes()[:cut])  # 40 whole samples survive
    for open_split in _readers(params):
        with pytest.raises(ShardError) as info:
            open_split()
        _one_clean_line(info.value, str(shard), "split test", "sha256")
    # a manifest "fixed" to the cut file's hash still disagrees on the count
    _set_manifest_shard(params, "test", 0, sha256=sha256_file(shard))
    for open_split in _readers(params):
        with pytest.raises(ShardError) as info:
            open_split()
        _one_clean_line(info.value, str(shard), "split test", "holds 40 samples", "says 60")
    from lpt.data.validate import run_validation

    failures = "\n".join(run_validation(params).failures)
    assert f"shard sample counts equal the manifest; {shard} of split test (not read" in failures, failures
    assert "count 40 != manifest_count 60" in failures, failures


def test_relabelled_cls_byte_is_refused(tiny_shards, tmp_path: Path) -> None:
    params = _copy(tiny_shards, tmp_path)
    shard = _first_test_shard(params)
    _, _, data_at = next(m for m in _members(shard) if m[0].endswith(".cls"))
    raw = bytearray(shard.read_bytes())
    raw[data_at] = ord("0") + (raw[data_at] - ord("0") + 1) % 10  # same length, another class
    shard.write_bytes(bytes(raw))
    for open_split in _readers(params):
        with pytest.raises(ShardError) as info:
            open_split()
        _one_clean_line(info.value, str(shard), "split test", "does not match the manifest")


def test_corrupt_image_in_a_verified_shard_names_shard_and_key(tiny_shards, tmp_path: Path) -> None:
    params = _copy(tiny_shards, tmp_path)
    shard = _first_test_shard(params)
    name, _, data_at = next(m for m in _members(shard) if m[0].endswith(".png"))
    raw = bytearray(shard.read_bytes())
    raw[data_at + 40: data_at + 80] = b"\x00" * 40  # inside the PNG: header/IDAT broken, size unchanged
    shard.write_bytes(bytes(raw))
    _set_manifest_shard(params, "test", 0, sha256=sha256_file(shard))  # only decoding can catch it now
    key = name.split(".", 1)[0]
    for in_memory in (True, False):
        ds = ShardImages(params.data.out_dir, "test", in_memory=in_memory)
        with pytest.raises(ShardError) as info:
            ds[ds.keys.index(key)]
        _one_clean_line(info.value, str(shard), f"sample {key}", "split test", "does not decode")
        ds.close()
    *_, stream = _readers(params)
    with pytest.raises(ShardError) as info:
        stream()
    _one_clean_line(info.value, str(shard), f"sample {key}", "does not decode")


def test_unlisted_shard_is_ignored_by_readers_and_fails_validation(tiny_shards, tmp_path: Path) -> None:
    from lpt.data.validate import run_validation

    params = _copy(tiny_shards, tmp_path)
    shard = _first_test_shard(params)
    shutil.copy(shard, shard.with_name("test-000099.tar"))
    listed = load_manifest(params.data.out_dir)["splits"]["test"]["count"]
    assert len(ShardImages(params.data.out_dir, "test")) == listed, "readers open only listed shards"
    result = run_validation(params)
    unlisted = "test-000099.tar of split test (not listed in the manifest)"
    assert any(unlisted in f for f in result.failures), result.failures


@pytest.mark.parametrize("edit,needles", [
    (lambda m: m["splits"]["test"]["shards"][0].update(name="../../../etc/passwd.tar"),
     ["shards[0]", "plain .tar file name"]),
    (lambda m: m["splits"]["test"].update(count=m["splits"]["test"]["count"] - 1),
     ["split test", "its shards hold 80"]),
    (lambda m: m["splits"]["test"]["shards"][0].update(sha256=7), ["shards[0]", "sha256 must be 64"]),
    (lambda m: m.update(splits=[]), ["splits must be an object"]),
])
def test_malformed_manifest_is_a_shard_error(tiny_shards, tmp_path: Path, edit, needles: list[str]) -> None:
    params = _copy(tiny_shards, tmp_path)
    manifest = load_manifest(params.data.out_dir)
    edit(manifest)
    (Path(params.data.out_dir) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as info:
        ShardImages(params.data.out_dir, "test")
    _one_clean_line(info.value, "manifest.json", *needles)


def test_manifest_not_json_is_a_shard_error(tiny_shards, tmp_path: Path) -> None:
    params = _copy(tiny_shards, tmp_path)
    (Path(params.data.out_dir) / "manifest.json").write_text('{"version": 1, "splits": ')
    with pytest.raises(ShardError) as info:
        load_manifest(params.data.out_dir)
    _one_clean_line(info.value, "manifest.json", "not a valid manifest")


# ------------------------------------------------------------------------------------------ 8. stale temporaries
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_ingest_removes_stale_temp_of_dead_process_but_keeps_live_ones(tmp_path: Path) -> None:
    params = _tiny(tmp_path)
    out = Path(params.data.out_dir)
    out.parent.mkdir(parents=True)
    stale = out.parent / f"{temp_prefix(out, _dead_pid())}k1ll3d.tmp"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / ".train-000000.tar.tmp").write_bytes(b"\0" * 4096)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        live = out.parent / f"{temp_prefix(out, sleeper.pid)}wr1t1ng.tmp"
        live.mkdir()
        other = out.parent / ".shards.someone_else.tmp"  # not our pattern (e.g. the old pid-less names)
        other.mkdir()
        run_ingest(params)
        assert not stale.exists(), "a dead process's temp folder must be cleaned"
        assert live.is_dir() and other.is_dir(), "never another live process's (or a foreign) temp"
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["shards", live.name, other.name])


def test_atomic_path_removes_stale_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    stale = tmp_path / f"{temp_prefix(target, _dead_pid())}abc.tmp"
    stale.write_text("half")
    mine = tmp_path / f"{temp_prefix(target)}xyz.tmp"  # this (live) process
    mine.write_text("busy")
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(temp_prefix(target))
        tmp.write_text("done")
    assert target.read_text() == "done" and not stale.exists() and mine.exists()


# ------------------------------------------------------------------------------------------ 9. one line, not a traceback
def _cli(*args: str):
    from typer.testing import CliRunner

    from lpt.cli import app

    return CliRunner().invoke(app, list(args))


def _assert_one_error_line(result, code: int, *needles: str) -> None:
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out and result.exception is None or isinstance(result.exception, SystemExit), out
    lines = out.rstrip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    # one error, the last thing printed (a multi-problem params error lists each key on an indented line)
    assert len(errors) == 1 and all(line.startswith("  ") for line in lines[errors[0] + 1:]), out
    for needle in needles:
        assert needle in out, (needle, out)


@pytest.mark.parametrize(("setup", "args", "needles"), [
    (None, ["-S", "seed=[1"], ["seed=[1", "not valid YAML"]),
    ("empty", [], ["is empty"]),
    ("std", [], ["transforms.std", "greater than 0"]),
    ("list", [], ["expected a mapping"]),
])
def test_bad_params_are_one_line(tmp_path: Path, setup: str | None, args: list[str], needles: list[str]) -> None:
    from lpt.config import write_params_atomic

    path = tmp_path / "params.yaml"
    write_params_atomic(path, make_tiny_params(tmp_path).to_dict())
    if setup == "empty":
        path.write_text("")
    elif setup == "std":
        path.write_text(path.read_text().replace("std:\n  - 0.5\n  - 0.5\n  - 0.5", "std: [0, 0, 0]"))
        assert "std: [0, 0, 0]" in path.read_text()
    elif setup == "list":
        path.write_text("- seed\n- data\n")
    _assert_one_error_line(_cli("params", "check", str(path), *args), 2, str(path) if setup else "", *needles)


@pytest.fixture
def stand_in_model(tiny_shards, tmp_path: Path):
    """A saved final checkpoint (untrained) on the session's shards, its backbone in a safetensors file."""
    from lpt.config import write_params_atomic
    from lpt.model.backbone import create_backbone, save_backbone
    from lpt.model.lpt import create_lpt_model, save_trained_model

    backbone_file = tmp_path / "backbone.safetensors"
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir))
    save_backbone(create_backbone(params.backbone), backbone_file)
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir), backbone__weights=str(backbone_file))
    model = create_lpt_model(params, load_manifest(params.data.out_dir)["num_classes"], phase=2)
    save_trained_model(model, Path(params.train.out_dir) / "phase2", {"class_counts": [1] * 10})
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())
    return params, path


def test_corrupt_checkpoint_metadata_is_one_line(stand_in_model) -> None:
    params, path = stand_in_model
    meta = Path(params.train.out_dir) / "phase2" / "model.json"
    meta.write_text(meta.read_text()[:40])
    _assert_one_error_line(_cli("evaluate", "--params", str(path)), 1, str(meta), "not valid JSON")
    meta.write_text('{"method": "lpt"}')
    _assert_one_error_line(_cli("evaluate", "--params", str(path)), 1, str(meta), "num_classes")


def test_truncated_backbone_weights_are_one_line(stand_in_model) -> None:
    params, path = stand_in_model
    weights = Path(params.backbone.weights)
    weights.write_bytes(weights.read_bytes()[:200])
    _assert_one_error_line(_cli("evaluate", "--params", str(path)), 1, str(weights), "not a readable safetensors")


def test_corrupt_image_in_a_shard_is_one_line_from_the_cli(tiny_shards, tmp_path: Path) -> None:
    """A shard whose sha256 was updated to match a broken image: decoding names the shard and the key."""
    from lpt.config import write_params_atomic

    params = _copy(tiny_shards, tmp_path)
    manifest = load_manifest(params.data.out_dir)
    record = manifest["splits"]["val"]["shards"][0]
    shard = Path(params.data.out_dir) / "val" / record["name"]
    raw = bytearray(shard.read_bytes())
    png = raw.find(b"\x89PNG")
    raw[png + 16: png + 64] = b"\0" * 48  # header intact, image data broken
    shard.write_bytes(bytes(raw))
    record["sha256"] = sha256_file(shard)
    write_json_atomic(Path(params.data.out_dir) / "manifest.json", manifest)
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())
    _assert_one_error_line(_cli("train", "--phase", "1", "--params", str(path)), 1, record["name"])
