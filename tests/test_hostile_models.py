"""Hostile model files for the torch-free runtime: a damaged .onnx, or one whose image input is of another
shape or type than its metadata says, is one `error:` line naming the file and exit 2 from `lpt predict`,
whether the failure comes when ONNX Runtime loads the graph or when it runs it (docs/security.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lpt.runtime import ModelFileError, PredictError, Predictor

from test_runtime import INPUT, NUM_CLASSES, make_toy_onnx, random_image, run_torch_free_cli, toy_metadata
from test_untrusted_input import _assert_one_error_line, _cli


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    random_image(20, 20, seed=5).save(path)
    return path


def _odd_graph(path: Path, image_dims: list, elem: int = TensorProto.FLOAT, w_rows: int = 3) -> Path:
    """The toy graph (mean colour @ W) with LPT metadata for 16 px RGB, but an image input of ``image_dims``
    / element type ``elem`` and a ``w_rows x C`` weight (rows != 3: the product fails when it runs)."""
    w = np.ones((w_rows, NUM_CLASSES), np.float32)
    cast = [helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT)]
    nodes = cast + [helper.make_node("ReduceMean", ["image_f", "axes"], ["colour"], keepdims=0),
                    helper.make_node("MatMul", ["colour", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "odd", [helper.make_tensor_value_info("image", elem, image_dims)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=[numpy_helper.from_array(np.array([2, 3], np.int64), "axes"), numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    helper.set_model_props(model, toy_metadata())
    onnx.checker.check_model(model, full_check=True)  # a valid graph: only its contract with the metadata is off
    onnx.save(model, path)
    return path


def test_truncated_onnx_is_one_line_naming_the_file(tmp_path: Path) -> None:
    good = make_toy_onnx(tmp_path / "good.onnx", toy_metadata())
    model = tmp_path / "truncated.onnx"
    model.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated.onnx: cannot load as an ONNX model"):
        Predictor(model)
    _assert_one_error_line(_cli("predict", str(model), str(_image(tmp_path))), 2, str(model), "cannot load")


def test_truncated_onnx_is_one_line_without_torch(tmp_path: Path) -> None:
    """The same refusal in the torch-free runtime (torch, timm, onnx blocked in a fresh interpreter)."""
    good = make_toy_onnx(tmp_path / "good.onnx", toy_metadata())
    model = tmp_path / "cut.onnx"
    model.write_bytes(good.read_bytes()[:200])
    proc = run_torch_free_cli("predict", str(model), str(_image(tmp_path)))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(model) in errors[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("dims, elem, w_rows, needle", [
    (["batch", 3, INPUT + 4, INPUT + 4], TensorProto.FLOAT, 3,
     f"is tensor(float) ['batch', 3, {INPUT + 4}, {INPUT + 4}]"),
    (["batch", 1, INPUT, INPUT], TensorProto.FLOAT, 1, "is tensor(float) ['batch', 1, 16, 16]"),
    (["batch", 3, INPUT, INPUT + 1], TensorProto.FLOAT, 3, "is tensor(float) ['batch', 3, 16, 17]"),
    (["batch", 3, INPUT, INPUT], TensorProto.DOUBLE, 3, "is tensor(double)"),
])
def test_image_input_unlike_the_metadata_is_refused_at_load(tmp_path: Path, dims: list, elem: int, w_rows: int,
                                                            needle: str) -> None:
    model = _odd_graph(tmp_path / "odd.onnx", dims, elem, w_rows)
    with pytest.raises(ModelFileError, match="graph input 'image'") as info:
        Predictor(model)
    assert needle in str(info.value) and "float [B, 3, 16, 16]" in str(info.value)
    _assert_one_error_line(_cli("predict", str(model), str(_image(tmp_path))), 2, str(model), needle)


def test_shape_error_while_running_is_one_line_naming_the_file(tmp_path: Path) -> None:
    """The channel dimension is symbolic, so the graph loads; its 4-row weight cannot take 3 colours: ORT
    fails inside run() (MatMul), which becomes one line naming the model, never a traceback."""
    model = _odd_graph(tmp_path / "late.onnx", ["batch", "channels", INPUT, INPUT], w_rows=4)
    predictor = Predictor(model)  # loads: nothing in the declared shapes contradicts the metadata
    with pytest.raises(ModelFileError, match="late.onnx: ONNX Runtime cannot run the graph") as info:
        predictor.run(np.zeros((2, 3, INPUT, INPUT), np.float32))
    assert "\n" not in str(info.value)
    _assert_one_error_line(_cli("predict", str(model), str(_image(tmp_path))), 2, str(model),
                           "ONNX Runtime cannot run the graph")


def test_image_errors_keep_their_own_exit_code(tmp_path: Path) -> None:
    """An unreadable image is not a model problem: still exit 1 (lpt.exitcodes.ERROR), as before."""
    model = make_toy_onnx(tmp_path / "good.onnx", toy_metadata())
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    result = _cli("predict", str(model), str(junk))
    _assert_one_error_line(result, 1, "junk.png")
    assert issubclass(ModelFileError, PredictError)
