"""Raw pixels in (model.raw.onnx, backbone.raw.onnx), the Triton model repository and the Node.js client."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from lpt.config import Params
from lpt.export import run_export
from lpt.pack import BACKBONE_RAW_FILE, run_pack
from lpt.rawpixels import RAW_INPUT_NAME, preprocessing_graph
from lpt.runtime import Predictor, Preprocessing, preprocess_image

from conftest import REPO_ROOT, make_tiny_params
from test_pack import sample_images, stand_in_with_metrics

NODE_CLIENT = REPO_ROOT / "examples" / "node"


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A photo-like uint8 RGB image (white noise is not what cameras see): coarse noise upsampled."""
    coarse = rng.integers(0, 256, (max(1, h // 4), max(1, w // 4), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


@pytest.mark.parametrize("size, resize", [(32, 32), (32, 36), (32, 28), (224, 256)])
def test_preprocessing_graph_is_the_python_preprocessing_within_one_pixel_level(size: int, resize: int) -> None:
    """Pillow resizes in two 8-bit passes, ONNX in float: at most one level (1/255/std) apart and a mean under
    0.3 of a level; a strong downscale (300 px -> 32, over 6x) differs by up to 11 levels at a few pixels (its
    99th percentile 5); an image already at its size is exact. (Measured: docs/export.md, "Raw pixels in".)"""
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    session = ort.InferenceSession(preprocessing_graph(size, resize, mean, std, "out", 18).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    pre = Preprocessing(input_size=size, resize=resize, mean=mean, std=std)
    level = 1 / 255 / min(std)
    rng = np.random.default_rng(0)
    for h, w in ((size, size), (28, 28), (40, 50), (50, 40), (300, 200), (33, 97), (17, 16)):
        img = _smooth_image(rng, h, w)
        ref = preprocess_image(Image.fromarray(img), pre)
        got = session.run(None, {RAW_INPUT_NAME: img[None]})[0][0]
        assert got.shape == ref.shape == (3, size, size)
        diff = np.abs(got - ref) / level
        strong = min(h, w) / resize > 6
        assert diff.mean() <= 0.3, (h, w, diff.mean())
        assert (np.percentile(diff, 99) <= 5.0 and diff.max() <= 12.0) if strong else diff.max() <= 1.0 + 1e-3, \
            (h, w, diff.max())
        if (h, w) == (size, size) and resize == size:
            assert diff.max() == 0.0


def test_preprocessing_graph_refuses_an_opset_without_antialias() -> None:
    with pytest.raises(ValueError, match="opset >= 18"):
        preprocessing_graph(32, 32, (0.5,) * 3, (0.5,) * 3, "out", 17)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Params) -> tuple[Params, Path, Path]:
    root = tmp_path_factory.mktemp("raw")
    params = make_tiny_params(root, data__out_dir=str(tiny_shards.data.out_dir))
    stand_in_with_metrics(params)
    export = Path(run_export(params).model_path).parent
    pack = Path(run_pack(params).pack_path).parent
    return params, export, pack


def _images_of_many_sizes(params: Params, folder: Path) -> list[Path]:
    """The test images saved as PNG, some resized (other H and W than the model's input), some grey."""
    folder.mkdir(exist_ok=True)
    paths = []
    sizes = [None, (40, 50), (28, 28), (64, 48)]
    for i, img in enumerate(sample_images(params)):
        size = sizes[i % len(sizes)]
        img = img.convert("RGB") if size is None else img.convert("RGB").resize(size, Image.BILINEAR)
        if i % 7 == 3:
            img = img.convert("L")  # grey: replicated to RGB by the decoder, as lpt.runtime.to_rgb does
        paths.append(folder / f"img{i:03d}.png")
        img.save(paths[-1])
    return paths


def test_export_gates_the_raw_graph_on_the_python_consumer(exported, tmp_path: Path) -> None:
    params, export, _ = exported
    report = json.loads((export / "export.json").read_text())
    raw = report["raw"]
    assert raw["file"] == "model.raw.onnx" and raw["top1_agreement"] >= 0.995 and raw["threshold"] == 0.995
    assert raw["images"] == report["parity"]["images"] and raw["max_abs_diff"] < 0.05
    graph = onnx.load(str(export / "model.raw.onnx"))
    pixels = graph.graph.input[0]
    assert pixels.name == RAW_INPUT_NAME and pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in pixels.type.tensor_type.shape.dim] == ["batch", "height", "width", 3]
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["class_names"] == {p.key: p.value for p in onnx.load(str(export / "model.onnx")).metadata_props}[
        "class_names"] and "input" in meta
    # Predictor takes the raw graph too: decoded pixels in, the same classes as the Python preprocessing
    paths = _images_of_many_sizes(params, tmp_path / "imgs")
    python = [r["labels"][0] for r in Predictor(export / "model.onnx").predict_paths(paths)]
    in_graph = Predictor(export / "model.raw.onnx")
    assert in_graph.raw
    graph_rows = in_graph.predict_paths(paths)
    agreement = np.mean([a == r["labels"][0] for a, r in zip(python, graph_rows)])
    assert agreement >= 0.95, agreement  # resized images included: a harder set than the parity sample


def test_pack_writes_a_raw_backbone_graph_with_the_same_task_inputs(exported, tmp_path: Path) -> None:
    params, _, pack_dir = exported
    report = json.loads((pack_dir / "pack.json").read_text())
    assert report["raw"]["file"] == BACKBONE_RAW_FILE and report["raw"]["top1_agreement"] >= 0.995
    pack = next(pack_dir.glob("*.pack"))
    images = sample_images(params, 24)
    python = Predictor(pack_dir / "backbone.onnx", packs=[pack]).predict_images(images)
    raw = Predictor(pack_dir / BACKBONE_RAW_FILE, packs=[pack])
    assert raw.raw and [i.name for i in raw.session.get_inputs()][0] == RAW_INPUT_NAME
    rows = raw.predict_images(images)
    assert np.mean([a["labels"][0] == b["labels"][0] for a, b in zip(python, rows)]) >= 0.95


def test_triton_config_parses_with_tritons_own_schema_and_matches_the_graph(exported) -> None:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                           reason="tritonclient[grpc] (a dev dependency) is not installed")
    from google.protobuf import text_format

    params, export, _ = exported
    folder = export / "triton" / "lpt"
    config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("lpt", "onnxruntime", 32)
    assert config.HasField("dynamic_batching")
    graph = onnx.load(str(folder / "1" / "model.onnx"))
    assert (folder / "1" / "model.onnx").read_bytes() == (export / "model.raw.onnx").read_bytes()
    types = {onnx.TensorProto.UINT8: model_config_pb2.TYPE_UINT8, onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32,
             onnx.TensorProto.INT64: model_config_pb2.TYPE_INT64}
    for section, values in ((config.input, graph.graph.input), (config.output, graph.graph.output)):
        assert [c.name for c in section] == [v.name for v in values]
        for c, v in zip(section, values):
            assert c.data_type == types[v.type.tensor_type.elem_type], c.name
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim[1:]]
            assert list(c.dims) == dims, c.name  # the batch axis is Triton's (max_batch_size > 0)
    assert list(config.input[0].dims) == [-1, -1, 3]
    logits = next(o for o in config.output if o.name == "logits")
    names = json.loads({p.key: p.value for p in graph.metadata_props}["class_names"])
    assert logits.label_filename == "labels.txt" and (folder / "labels.txt").read_text().splitlines() == names


def _node_client_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed and could not be installed (make node-client installs it from the "
                    "distribution's packages where apt is available)")
    if not (NODE_CLIENT / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("examples/node has no node_modules: `make node-client` (npm install) could not reach npm")
    return node


def test_node_client_agrees_with_lpt_predict(exported, tmp_path: Path) -> None:
    """examples/node/predict.mjs: PNG decoding in JS, raw pixels into model.raw.onnx, class names from the
    model's metadata; its top-1 equals the Python consumer's on >= 99.5 % of the test images."""
    node = _node_client_or_skip()
    params, export, _ = exported
    paths = _images_of_many_sizes(params, tmp_path / "imgs")
    proc = subprocess.run([node, str(NODE_CLIENT / "predict.mjs"), str(export / "model.raw.onnx"),
                           *map(str, paths), "--top-k", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    reference = Predictor(export / "model.raw.onnx").predict_paths(paths, top_k=2)
    same_graph = np.mean([r["labels"][0] == ref["labels"][0] for r, ref in zip(rows, reference)])
    assert same_graph == 1.0  # the same graph on the same pixels: only the PNG decoder differs (both lossless)
    python = Predictor(export / "model.onnx").predict_paths(paths)  # what `lpt predict` prints
    agreement = np.mean([r["labels"][0] == p["labels"][0] for r, p in zip(rows, python)])
    assert agreement >= 0.95, agreement
    on_test_split = [r for r, p in zip(rows, paths) if int(p.stem[3:]) % 4 == 0]  # the images at their own size
    python_test = [p for p, path in zip(python, paths) if int(path.stem[3:]) % 4 == 0]
    assert np.mean([r["labels"][0] == p["labels"][0] for r, p in zip(on_test_split, python_test)]) >= 0.995
    assert all(abs(sum(r["scores"]) - sum(ref["scores"])) < 1e-4 for r, ref in zip(rows, reference))


def test_node_client_reports_an_unreadable_image_by_name_and_goes_on(exported, tmp_path: Path) -> None:
    node = _node_client_or_skip()
    params, export, _ = exported
    good = _images_of_many_sizes(params, tmp_path / "imgs")[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    proc = subprocess.run([node, str(NODE_CLIENT / "predict.mjs"), str(export / "model.raw.onnx"), str(good[0]),
                           str(bad), str(good[1])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.count("error: ") == 1 and str(bad) in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stdout.splitlines()) == 2
