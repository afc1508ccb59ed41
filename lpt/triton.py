"""A Triton Inference Server model repository for an exported model (``export.triton``).

``lpt export`` writes, inside ``export.out_dir``::

    triton/<name>/config.pbtxt      ONNX Runtime backend, the raw-pixel input, dynamic batching
    triton/<name>/1/model.onnx      the raw-pixel graph (model.raw.onnx): decoded pixels in, logits out
    triton/<name>/labels.txt        class names, one per line (Triton's classification extension)

Serve it with ``docker run --rm -p8000:8000 -p8001:8001 -v $PWD/models/export/triton:/models
nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models`` (docs/export.md). The input
is the raw graph's ``pixels`` (uint8, ``[-1, -1, 3]`` per image: any H and W, RGB); Triton batches requests of
the same image size up to ``export.triton_max_batch_size``.

Example:
    >>> from lpt.triton import write_triton_repository
    >>> write_triton_repository(Path("models/export/triton"), Path("models/export/model.raw.onnx"), "lpt", 32)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lpt.escaping import text_line

__all__ = ["TRITON_DIR", "CONFIG_FILE", "LABELS_FILE", "triton_config", "write_triton_repository"]

TRITON_DIR = "triton"
"""The repository's folder inside ``export.out_dir``."""
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"

_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 10: "TYPE_FP16"}
"""ONNX TensorProto element type -> Triton data type."""


def _dims(value: Any) -> list[int]:
    """An ONNX value's shape without its batch axis, ``-1`` for a symbolic dimension."""
    dims = value.type.tensor_type.shape.dim[1:]
    return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def triton_config(model: Any, name: str, max_batch_size: int) -> str:
    """``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``) for an ONNX graph with a batch axis.

    Args:
        model: the ``onnx.ModelProto`` served (every input and output has the batch as its first axis).
        name: the model's name in the repository.
        max_batch_size: the largest batch Triton forms (dynamic batching on).

    Raises:
        ValueError: an input or output of an element type Triton's ONNX backend is not given here.
    """
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {int(max_batch_size)}"]
    for section, values in (("input", model.graph.input), ("output", model.graph.output)):
        entries = []
        for value in values:
            elem = value.type.tensor_type.elem_type
            if elem not in _TYPES:
                raise ValueError(f"{section} {value.name!r}: ONNX element type {elem} has no Triton type here")
            extra = f' label_filename: "{LABELS_FILE}"' if value.name == "logits" else ""
            dims = ", ".join(str(d) for d in _dims(value))
            entries.append(f'  {{ name: "{value.name}" data_type: {_TYPES[elem]} dims: [ {dims} ]{extra} }}')
        lines.append(f"{section} [\n" + ",\n".join(entries) + "\n]")
    lines.append("dynamic_batching { }")
    lines.append('instance_group [ { kind: KIND_AUTO } ]')
    return "\n".join(lines) + "\n"


def write_triton_repository(root: Path, raw_graph: Path, name: str, max_batch_size: int,
                            class_names: list[str]) -> Path:
    """Write ``root/<name>/`` (config, version 1's model, labels) for the raw-pixel graph ``raw_graph``.

    Returns:
        The model's folder.
    """
    import onnx

    model = onnx.load(str(raw_graph))
    folder = root / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(raw_graph, folder / "1" / "model.onnx")
    (folder / CONFIG_FILE).write_text(triton_config(model, name, max_batch_size))
    (folder / LABELS_FILE).write_text("".join(text_line(c) + "\n" for c in class_names))
    return folder
