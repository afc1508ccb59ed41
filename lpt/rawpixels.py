"""Raw pixels in: an exported graph with the test-time preprocessing inside it.

``lpt export`` and ``lpt pack`` write, beside each graph that takes normalised images, one that takes what a
decoder gives (``model.raw.onnx``, ``backbone.raw.onnx``)::

    pixels uint8 [N, H, W, 3] (RGB, any H and W)
      ─► float ─► NCHW ─► Resize (shorter side -> resize, longer side int(resize * long / short); linear,
         antialias, half-pixel: Pillow's bilinear) ─► round to 0..255 (Pillow's images are uint8) ─► zero pad
         where smaller than the crop ─► centre crop (top = round((h - crop) / 2), half to even, as torchvision)
         ─► / 255, - mean, / std ─► image [N, 3, S, S] ─► the graph as exported

so a consumer in any language (ONNX Runtime for C++, Java, C#, Node.js, the browser; Triton) feeds decoded
pixels and gets the same classes as ``lpt predict``. The one difference: Pillow resizes in two 8-bit passes,
ONNX ``Resize`` in float in one; parity is measured on the test split (``export.json`` ``raw``).

Every image of one call has the same H and W (decode and batch same-sized images, or call once per image).

Example:
    >>> from lpt.rawpixels import write_raw_graph
    >>> write_raw_graph("models/export/model.onnx", "models/export/model.raw.onnx", preprocessing)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lpt.runtime import RAW_INPUT_NAME  # the torch-free consumer owns the graph's names

__all__ = ["RAW_INPUT_NAME", "preprocessing_graph", "write_raw_graph"]

_PRE = "preprocess/"
"""Name prefix of the preprocessing nodes and values inside the merged graph."""


def preprocessing_graph(input_size: int, resize: int, mean: tuple[float, ...], std: tuple[float, ...],
                        output_name: str, opset: int) -> Any:
    """The preprocessing alone, as an ONNX model: ``pixels`` uint8 ``[N, H, W, 3]`` -> ``output_name`` float32
    ``[N, 3, input_size, input_size]``.

    Args:
        input_size: the crop S.
        resize: the shorter side before the crop.
        mean, std: per-channel normalisation (of values in 0..1).
        output_name: the name of the output (the model's image input, prefixed when merged).
        opset: the model's opset (>= 18: ``Resize`` antialias).

    Returns:
        An ``onnx.ModelProto``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if opset < 18:
        raise ValueError(f"a raw-pixel graph needs opset >= 18 (Resize with antialias); export.opset is {opset}")
    p = _PRE

    def const(name: str, value: Any, dtype: Any) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), p + name)

    inits = [
        const("resize", [resize], np.int64), const("crop", [input_size], np.int64), const("zero", [0], np.int64),
        const("two", [2], np.int64), const("three", [3], np.int64),
        const("idx_n", [0], np.int64), const("idx_h", [1], np.int64), const("idx_w", [2], np.int64),
        const("axes_hw", [2, 3], np.int64), const("255", 255.0, np.float32), const("half", 2.0, np.float32),
        const("mean", np.asarray(mean, np.float32).reshape(1, 3, 1, 1), np.float32),
        const("std", np.asarray(std, np.float32).reshape(1, 3, 1, 1), np.float32),
    ]
    n = helper.make_node
    nodes = [
        n("Shape", [RAW_INPUT_NAME], [p + "shape"]),
        n("Gather", [p + "shape", p + "idx_n"], [p + "N"]),
        n("Gather", [p + "shape", p + "idx_h"], [p + "H"]),
        n("Gather", [p + "shape", p + "idx_w"], [p + "W"]),
        # torchvision's Resize(int): the shorter side -> resize, the longer -> int(resize * long / short)
        n("LessOrEqual", [p + "W", p + "H"], [p + "w_short"]),
        n("Mul", [p + "resize", p + "H"], [p + "rH"]),
        n("Mul", [p + "resize", p + "W"], [p + "rW"]),
        n("Div", [p + "rH", p + "W"], [p + "H_scaled"]),  # int64: floor, = int() for positive sizes
        n("Div", [p + "rW", p + "H"], [p + "W_scaled"]),
        n("Where", [p + "w_short", p + "H_scaled", p + "resize"], [p + "newH"]),
        n("Where", [p + "w_short", p + "resize", p + "W_scaled"], [p + "newW"]),
        n("Cast", [RAW_INPUT_NAME], [p + "float"], to=TensorProto.FLOAT),
        n("Transpose", [p + "float"], [p + "nchw"], perm=[0, 3, 1, 2]),
        n("Concat", [p + "N", p + "three", p + "newH", p + "newW"], [p + "sizes"], axis=0),
        n("Resize", [p + "nchw", "", "", p + "sizes"], [p + "resized_f"], mode="linear", antialias=1,
          coordinate_transformation_mode="half_pixel"),
        # Pillow's resized image is uint8: round half to even and clip, as the conversion does
        n("Round", [p + "resized_f"], [p + "rounded"]),
        n("Clip", [p + "rounded", p + "zero_f", p + "255"], [p + "resized"]),
        # zero padding where the resized image is smaller than the crop (left/top get the smaller half)
        n("Sub", [p + "crop", p + "newH"], [p + "dh"]),
        n("Sub", [p + "crop", p + "newW"], [p + "dw"]),
        n("Max", [p + "dh", p + "zero"], [p + "pad_h"]),
        n("Max", [p + "dw", p + "zero"], [p + "pad_w"]),
        n("Div", [p + "pad_h", p + "two"], [p + "pad_top"]),
        n("Div", [p + "pad_w", p + "two"], [p + "pad_left"]),
        n("Sub", [p + "pad_h", p + "pad_top"], [p + "pad_bottom"]),
        n("Sub", [p + "pad_w", p + "pad_left"], [p + "pad_right"]),
        n("Concat", [p + "pad_top", p + "pad_left", p + "pad_bottom", p + "pad_right"], [p + "pads"], axis=0),
        n("Pad", [p + "resized", p + "pads", "", p + "axes_hw"], [p + "padded"], mode="constant"),
        n("Add", [p + "newH", p + "pad_h"], [p + "h"]),
        n("Add", [p + "newW", p + "pad_w"], [p + "w"]),
        # centre crop: top = round((h - crop) / 2), half to even (Python's round, ONNX Round)
        n("Sub", [p + "h", p + "crop"], [p + "excess_h"]),
        n("Sub", [p + "w", p + "crop"], [p + "excess_w"]),
        n("Cast", [p + "excess_h"], [p + "excess_h_f"], to=TensorProto.FLOAT),
        n("Cast", [p + "excess_w"], [p + "excess_w_f"], to=TensorProto.FLOAT),
        n("Div", [p + "excess_h_f", p + "half"], [p + "top_f"]),
        n("Div", [p + "excess_w_f", p + "half"], [p + "left_f"]),
        n("Round", [p + "top_f"], [p + "top_r"]),
        n("Round", [p + "left_f"], [p + "left_r"]),
        n("Cast", [p + "top_r"], [p + "top"], to=TensorProto.INT64),
        n("Cast", [p + "left_r"], [p + "left"], to=TensorProto.INT64),
        n("Add", [p + "top", p + "crop"], [p + "bottom"]),
        n("Add", [p + "left", p + "crop"], [p + "right"]),
        n("Concat", [p + "top", p + "left"], [p + "starts"], axis=0),
        n("Concat", [p + "bottom", p + "right"], [p + "ends"], axis=0),
        n("Slice", [p + "padded", p + "starts", p + "ends", p + "axes_hw"], [p + "cropped"]),
        # ToTensor + Normalize, in float32 as the Python preprocessing does them
        n("Div", [p + "cropped", p + "255"], [p + "unit"]),
        n("Sub", [p + "unit", p + "mean"], [p + "centred"]),
        n("Div", [p + "centred", p + "std"], [output_name]),
    ]
    inits.append(const("zero_f", 0.0, np.float32))
    graph = helper.make_graph(
        nodes, "lpt_preprocess",
        [helper.make_tensor_value_info(RAW_INPUT_NAME, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", 3, input_size, input_size])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def write_raw_graph(model_path: str | Path, out_path: str | Path, input_size: int, resize: int,
                    mean: tuple[float, ...], std: tuple[float, ...], image_input: str = "image") -> Path:
    """``model_path`` with the preprocessing in front of its ``image_input``: ``pixels`` uint8 ``[N, H, W, 3]``
    in, the same outputs, the same other inputs (a backbone graph's task tensors) and metadata.

    Args:
        model_path: a graph taking normalised images ``[N, 3, S, S]`` (``model.onnx``, ``backbone.onnx``).
        out_path: where to write the merged graph.
        input_size, resize, mean, std: the model's test-time preprocessing (its metadata).
        image_input: the model's image input name.

    Returns:
        ``out_path``.
    """
    import onnx
    from onnx import compose

    model = onnx.load(str(model_path))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    pre = preprocessing_graph(input_size, resize, mean, std, _PRE + "image", opset)
    pre.ir_version = model.ir_version
    del pre.opset_import[:]
    pre.opset_import.extend(model.opset_import)
    merged = compose.merge_models(pre, model, io_map=[(_PRE + "image", image_input)],
                                  doc_string=model.doc_string, producer_name=model.producer_name)
    inputs = [RAW_INPUT_NAME] + [i.name for i in model.graph.input if i.name != image_input]
    order = {name: k for k, name in enumerate(inputs)}
    kept = sorted(merged.graph.input, key=lambda i: order[i.name])
    del merged.graph.input[:]
    merged.graph.input.extend(kept)
    del merged.metadata_props[:]
    for prop in model.metadata_props:
        merged.metadata_props.add(key=prop.key, value=prop.value)
    merged.metadata_props.add(key="input", value=f"{RAW_INPUT_NAME}: uint8 [N, H, W, 3] RGB, decoded pixels; the "
                                                  "preprocessing metadata is applied inside the graph")
    merged.graph.name = model.graph.name
    onnx.checker.check_model(merged, full_check=True)
    onnx.save(merged, str(out_path))
    return Path(out_path)
