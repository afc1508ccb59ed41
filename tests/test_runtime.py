"""The torch-free consumer (lpt.runtime) against a small hand-made ONNX graph with LPT metadata.

The export-side tests (tests/test_export.py) run the same consumer on a real exported LPT model.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from lpt.runtime import PredictError, Predictor, format_predictions, load_image, to_rgb

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES, POOL, INPUT, RESIZE = 5, 4, 16, 18
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _toy_weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, NUM_CLASSES)).astype(np.float32), rng.standard_normal((3, POOL)).astype(np.float32)


def make_toy_onnx(path: Path, metadata: dict[str, str] | None = None, opset: int = 18) -> Path:
    """image [B,3,S,S] -> mean colour -> logits = colour @ W ; selected = top-2 of colour @ K."""
    w, k = _toy_weights()
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["colour"], keepdims=0),
        helper.make_node("MatMul", ["colour", "W"], ["logits"]),
        helper.make_node("MatMul", ["colour", "K"], ["match"]),
        helper.make_node("TopK", ["match", "k"], ["top_values", "selected"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, INPUT, INPUT])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES]),
         helper.make_tensor_value_info("selected", TensorProto.INT64, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
                     numpy_helper.from_array(w, "W"), numpy_helper.from_array(k, "K"),
                     numpy_helper.from_array(np.array([2], np.int64), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    if metadata:
        helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def toy_metadata(**changes: str) -> dict[str, str]:
    meta = {
        "lpt_format": "1",
        "class_names": json.dumps([f"class_{i}" for i in range(NUM_CLASSES)]),
        "input_size": str(INPUT), "resize": str(RESIZE),
        "mean": json.dumps(MEAN), "std": json.dumps(STD),
        "interpolation": "bilinear", "crop": "center", "logit_scale": "20.0", "method": "lpt",
    }
    meta.update(changes)
    return meta


def reference_preprocess(img: Image.Image) -> np.ndarray:
    """torchvision's test transform (what lpt.data.reader.build_transform(train=False) is specified as)."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(RESIZE), T.CenterCrop(INPUT), T.ToTensor(), T.Normalize(MEAN, STD)])
    return tf(img.convert("RGB")).numpy()


def random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=mode)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_onnx(tmp_path_factory.mktemp("toy") / "toy.onnx", toy_metadata())


@pytest.fixture(scope="module")
def predictor(toy_model: Path) -> Predictor:
    return Predictor(toy_model)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    random_image(23, 31, seed=1).save(folder / "a.png")
    random_image(40, 17, seed=2).save(folder / "sub" / "b.jpg", quality=95)
    random_image(19, 19, "L", seed=3).save(folder / "c.png")
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    return folder


# ----------------------------------------------------------------------------------- model loading
def test_predictor_reads_metadata_and_uses_cpu_without_gpu(predictor: Predictor) -> None:
    assert predictor.class_names == [f"class_{i}" for i in range(NUM_CLASSES)]
    assert predictor.preprocessing.input_size == INPUT and predictor.preprocessing.resize == RESIZE
    assert predictor.preprocessing.mean == MEAN and predictor.preprocessing.std == STD
    assert predictor.logit_scale == 20.0
    assert predictor.provider in predictor.session.get_providers()


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_provider_comes_from_the_session_not_from_the_available_list(toy_model: Path, monkeypatch) -> None:
    import onnxruntime as ort

    # a CPU-only onnxruntime that (like the GPU wheel on a machine without a GPU) lists CUDA anyway
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    predictor = Predictor(toy_model)
    assert predictor.provider == predictor.session.get_providers()[0]
    if "CUDAExecutionProvider" not in predictor.session.get_providers():
        assert predictor.provider == "CPUExecutionProvider"
    assert len(predictor.predict_arrays(np.zeros((2, 3, INPUT, INPUT), np.float32))) == 2


def test_non_lpt_onnx_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    plain = make_toy_onnx(tmp_path / "plain.onnx", metadata=None)
    with pytest.raises(PredictError, match="not an LPT export"):
        Predictor(plain)


def test_unsupported_format_and_missing_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="format 99 is not supported"):
        Predictor(make_toy_onnx(tmp_path / "future.onnx", toy_metadata(lpt_format="99")))
    meta = toy_metadata()
    del meta["mean"]
    with pytest.raises(PredictError, match="missing metadata keys.*mean"):
        Predictor(make_toy_onnx(tmp_path / "nomean.onnx", meta))
    with pytest.raises(PredictError, match="logits have 5 classes but metadata names 2"):
        Predictor(make_toy_onnx(tmp_path / "names.onnx", toy_metadata(class_names='["a", "b"]')))


def test_missing_or_garbage_model_file(tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="no such model file"):
        Predictor(tmp_path / "absent.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf")
    with pytest.raises(PredictError, match="junk.onnx: cannot load as an ONNX model"):
        Predictor(junk)


# ----------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size", [(16, 16), (18, 18), (23, 31), (40, 17), (9, 13), (101, 57), (17, 200)])
def test_preprocessing_matches_the_torchvision_test_transform(predictor: Predictor, size: tuple[int, int]) -> None:
    img = random_image(*size, seed=size[0] * 1000 + size[1])
    ours = predictor.preprocess(img)
    assert ours.dtype == np.float32 and ours.shape == (3, INPUT, INPUT)
    np.testing.assert_allclose(ours, reference_preprocess(img), atol=2e-6, rtol=0)


def test_preprocessing_matches_build_transform_of_the_reader(predictor: Predictor) -> None:
    from lpt.config import TransformConfig
    from lpt.data.reader import build_transform

    tf = build_transform(TransformConfig(input_size=INPUT, resize=RESIZE, mean=MEAN, std=STD), train=False)
    for seed, size in enumerate([(23, 31), (40, 17), (101, 57), (9, 13)]):
        img = random_image(*size, seed=seed)
        np.testing.assert_allclose(predictor.preprocess(img), tf(img).numpy(), atol=2e-6, rtol=0)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "PA-transparency", "I;16"])
def test_non_rgb_images_are_converted_to_rgb(mode: str) -> None:
    rgb = random_image(12, 10, seed=7)
    if mode == "L":
        img = rgb.convert("L")
        expected = np.repeat(np.asarray(img)[:, :, None], 3, axis=2)  # grey replicated
    elif mode in ("LA", "RGBA"):
        img = rgb.convert(mode)
        expected = np.asarray(img.convert("RGB"))  # alpha dropped, colour kept
        if mode == "RGBA":
            expected = np.asarray(rgb)
    elif mode == "P":
        img = rgb.quantize(16)
        expected = np.asarray(img.convert("RGB"))  # palette expanded
    elif mode == "PA-transparency":
        img = rgb.quantize(16)
        img.info["transparency"] = 0
        expected = np.asarray(img.convert("RGBA"))[:, :, :3]
    else:  # 16-bit grey: scaled to 8 bits, not clipped
        grey16 = (np.arange(120, dtype=np.uint16).reshape(10, 12) * 500)
        img = Image.fromarray(grey16)
        assert img.mode.startswith("I;16")
        expected = np.repeat((grey16 >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    out = to_rgb(img)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_grayscale_and_rgba_files_predict_like_their_rgb_versions(predictor: Predictor, tmp_path: Path) -> None:
    rgb = random_image(30, 22, seed=11)
    grey = rgb.convert("L")
    grey.save(tmp_path / "grey.png")
    grey.convert("RGB").save(tmp_path / "grey_rgb.png")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.full((22, 30), 60, np.uint8)))
    rgba.save(tmp_path / "rgba.png")
    rgb.save(tmp_path / "rgb.png")
    rows = {Path(r["path"]).name: r for r in predictor.predict_paths([tmp_path], top_k=NUM_CLASSES)}
    assert rows["grey.png"]["scores"] == pytest.approx(rows["grey_rgb.png"]["scores"], abs=1e-6)
    assert rows["rgba.png"]["scores"] == pytest.approx(rows["rgb.png"]["scores"], abs=1e-6)


# ------------------------------------------------------------------------------------- predictions
def test_predict_paths_files_and_folders(predictor: Predictor, image_dir: Path) -> None:
    rows = predictor.predict_paths([image_dir / "a.png", image_dir], top_k=3, batch_size=2)
    names = [Path(r["path"]).relative_to(image_dir).as_posix() for r in rows]
    assert names == ["a.png", "a.png", "c.png", "sub/b.jpg"]  # explicit first, then the folder sorted
    w, k = _toy_weights()
    for row in rows:
        x = predictor.preprocess(load_image(row["path"]))
        colour = x.mean(axis=(1, 2))
        logits = colour @ w
        assert row["labels"] == list(np.argsort(-logits)[:3])
        assert row["classes"] == [f"class_{j}" for j in row["labels"]]
        probs = np.exp(20 * (logits - logits.max()))
        probs /= probs.sum()
        assert row["scores"] == pytest.approx(list(probs[row["labels"]]), rel=1e-4, abs=1e-6)
        assert row["scores"] == sorted(row["scores"], reverse=True)
        assert sorted(row["prompts"]) == sorted(np.argsort(-(colour @ k))[:2].tolist())


def test_batching_does_not_change_predictions(predictor: Predictor, image_dir: Path) -> None:
    one = predictor.predict_paths([image_dir], top_k=2, batch_size=1)
    many = predictor.predict_paths([image_dir], top_k=2, batch_size=32)
    assert [r["labels"] for r in one] == [r["labels"] for r in many]
    for a, b in zip(one, many):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-6)


def test_non_image_file_error_names_the_file(predictor: Predictor, image_dir: Path) -> None:
    with pytest.raises(PredictError, match=r"notes\.txt: not a readable image"):
        predictor.predict_paths([image_dir / "notes.txt"])
    fake = image_dir / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(PredictError, match=r"fake\.png: not a readable image"):
        predictor.predict_paths([image_dir])
    with pytest.raises(PredictError, match="absent.png: no such file or folder"):
        predictor.predict_paths([image_dir / "absent.png"])


def test_bad_arguments(predictor: Predictor, image_dir: Path) -> None:
    with pytest.raises(PredictError, match="top_k must be between 1 and 5"):
        predictor.predict_paths([image_dir / "a.png"], top_k=6)
    with pytest.raises(PredictError, match=r"shape \[B, 3, 16, 16\]"):
        predictor.predict_arrays(np.zeros((1, 3, 8, 8), np.float32))
    empty = image_dir / "empty"
    empty.mkdir()
    with pytest.raises(PredictError, match="no images found"):
        predictor.predict_paths([empty])


def test_format_predictions(predictor: Predictor, image_dir: Path) -> None:
    rows = predictor.predict_paths([image_dir], top_k=2)
    lines = format_predictions(rows, "json").splitlines()
    assert [json.loads(line)["labels"] for line in lines] == [r["labels"] for r in rows]
    table = list(csv.DictReader(io.StringIO(format_predictions(rows, "csv"))))
    assert len(table) == 2 * len(rows)
    assert table[0]["path"] == rows[0]["path"] and table[0]["rank"] == "1"
    assert table[1]["class"] == rows[0]["classes"][1]
    text = format_predictions(rows, "text").splitlines()
    assert text[0].startswith(rows[0]["path"] + ": " + rows[0]["classes"][0])
    with pytest.raises(PredictError, match="unknown output format"):
        format_predictions(rows, "xml")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ torch-free
RUNTIME_BLOCKED = ("torch", "torchvision", "timm", "onnx", "onnxscript", "webdataset", "safetensors")
"""What the torch-free consumer must not import (a dotted name blocks just that submodule)."""

TORCH_FREE = textwrap.dedent("""
    import sys
    BLOCKED = set(sys.argv[1].split(","))

    def blocked(name):
        return name.split(".")[0] in BLOCKED or name in BLOCKED

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if blocked(name):
                raise ImportError(f"{name} is blocked: the runtime must be torch-free")
            return None

    sys.meta_path.insert(0, Blocker())
    from lpt.cli import app
    try:
        app(sys.argv[2:])
    finally:
        leaked = sorted(m for m in sys.modules if blocked(m))
        print("LEAKED", leaked, file=sys.stderr)
""")


def run_torch_free_cli(*args: str, blocked: tuple[str, ...] = RUNTIME_BLOCKED) -> subprocess.CompletedProcess[str]:
    """``lpt ...`` in a fresh interpreter where torch, timm, onnx, ... (``blocked``) cannot be imported."""
    return subprocess.run([sys.executable, "-c", TORCH_FREE, ",".join(blocked), *args], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120)


def test_lpt_predict_works_without_torch(toy_model: Path, predictor: Predictor, image_dir: Path) -> None:
    proc = run_torch_free_cli("predict", str(toy_model), str(image_dir), "--top-k", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED []" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = predictor.predict_paths([image_dir], top_k=2)
    assert [r["path"] for r in rows] == [r["path"] for r in expected]
    assert [r["labels"] for r in rows] == [r["labels"] for r in expected]

    bad = run_torch_free_cli("predict", str(toy_model), str(image_dir / "notes.txt"))
    assert bad.returncode == 1
    assert "notes.txt: not a readable image" in bad.stderr
