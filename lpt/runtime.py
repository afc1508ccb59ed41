"""Torch-free inference for LPT ONNX exports: numpy + onnxruntime + Pillow, nothing else.

The exported graph (``lpt export``) holds the whole LPT inference (query pass, key matching, top-k
prompt selection, prompted pass, cosine head); everything a consumer needs to feed it is in the ONNX
``metadata_props`` (see :data:`REQUIRED_METADATA` and ``docs/export.md``). This module reads that
metadata and reproduces training's *test* transform exactly (``lpt.data.reader.build_transform(train=False)``):

1. read and decode with :mod:`lpt.data.imageio` (regular files, allowed formats and sizes only) and convert to
   RGB (:func:`to_rgb`: the pixels ingest stores for the same file),
2. resize the shorter side to ``resize`` (bilinear, antialiased: Pillow's resampling, as torchvision
   does on PIL images); the longer side becomes ``int(resize * long / short)``,
3. center-crop ``input_size`` x ``input_size`` (zero padding where the image is smaller, as torchvision),
4. ``float32 / 255`` then ``(x - mean) / std`` per channel, channels first.

Task packs (``lpt pack``, ``docs/export.md``): one *backbone graph* (the frozen ViT with the task tensors
as graph inputs) serves many tasks; a task is a ``.pack`` file (safetensors: shared prompt, group prompts,
keys, head; its JSON metadata in one header key: class names, preprocessing, backbone fingerprint,
geometry, recipe hash, metrics, gate verdict). :func:`read_pack` reads one with numpy (safetensors' numpy
API, imported only when a pack is read); ``Predictor(backbone, packs=[...])`` classifies every image for
every task with one copy of the backbone in memory.

Example:
    >>> from lpt.runtime import Predictor, format_predictions
    >>> predictor = Predictor("models/export/model.onnx")
    >>> rows = predictor.predict_paths(["photo.png", "folder/"], top_k=3)
    >>> print(format_predictions(rows, fmt="text"))
    >>> packs = Predictor("models/pack/backbone.onnx", packs=["a.pack", "b.pack"])
    >>> rows = packs.predict_paths(["folder/"])  # one row per image and task (key ``task``)

Only the standard library, numpy, onnxruntime, Pillow and (for packs) safetensors' numpy API may be
imported here: ``pip install 'lpt[ort]'`` gives a working ``lpt predict`` without torch.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from lpt.data.imageio import DECODE_ERRORS, ImageRefused, decode_error, open_image, read_image_file, to_rgb_array
from lpt.escaping import csv_cell, text_line
from lpt.tensors import DYNAMIC_DIMS
from lpt.tensors import task_inputs as spec_task_inputs

__all__ = [
    "ModelFileError",
    "LPT_FORMAT",
    "REQUIRED_METADATA",
    "PACK_FORMAT",
    "PACK_SUFFIX",
    "PACK_METADATA_KEY",
    "BACKBONE_KIND",
    "TASK_INPUTS",
    "TaskPack",
    "read_pack",
    "geometry_differences",
    "IMAGE_EXTENSIONS",
    "PredictError",
    "PredictRefused",
    "Preprocessing",
    "Predictor",
    "ExportPredictor",
    "PackPredictor",
    "to_rgb",
    "load_image",
    "preprocess_image",
    "collect_image_paths",
    "format_predictions",
]

LPT_FORMAT = 1
"""Version of the export layout (graph I/O + metadata keys); bumped on incompatible changes."""

INPUT_NAME = "image"
RAW_INPUT_NAME = "pixels"
"""A raw-pixel graph's image input (:mod:`lpt.rawpixels`): uint8 ``[N, H, W, 3]`` RGB."""
LOGITS_NAME = "logits"
SELECTED_NAME = "selected"

REQUIRED_METADATA: tuple[str, ...] = (
    "lpt_format",  # "1"
    "class_names",  # JSON list of C names, index = class label
    "input_size",  # JSON int: side of the square network input
    "resize",  # JSON int: shorter side before the center crop
    "mean",  # JSON list of 3 floats (RGB)
    "std",  # JSON list of 3 floats (RGB)
    "interpolation",  # "bilinear"
    "crop",  # "center"
    "logit_scale",  # JSON float: softmax(logit_scale * cosine) gives the scores
)
"""Metadata keys every LPT export carries (all values are strings; lists and numbers are JSON)."""

PACK_FORMAT = 1
"""Version of the task-pack layout (tensor names + metadata fields); a reader refuses other versions."""

PACK_SUFFIX = ".pack"
PACK_METADATA_KEY = "lpt_pack"
"""The one safetensors header key holding a pack's JSON metadata (safetensors keeps header metadata in a
hash map whose order changes from process to process: one key keeps the file's bytes reproducible)."""

BACKBONE_KIND = "backbone"
"""``lpt_kind`` metadata of a backbone graph for task packs (single-task exports have no ``lpt_kind``)."""

TASK_INPUTS: dict[str, tuple[str, ...]] = spec_task_inputs()
"""The task tensors a backbone graph can take as inputs (name -> dims; :func:`lpt.tensors.task_inputs`). L, D, S
are fixed by the graph (``geometry``); T (prompt length), P (pool size) and C (classes) may differ from pack to
pack."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
"""Files picked up when a *folder* is given; files named explicitly are always tried."""

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


class PredictError(RuntimeError):
    """A model or image cannot be used; the message names the file and what is wrong."""


class PredictRefused(PredictError):
    """An input refused by policy (an image format outside the allowlist, too many pixels, a FIFO or device
    instead of a file: :mod:`lpt.data.imageio`); ``lpt predict`` exits 2 on it, 1 on other errors."""


class ModelFileError(PredictError):
    """ONNX Runtime cannot load or run a model file (damaged, not ONNX, inputs of another shape or type than
    its metadata says); one line naming the file. ``lpt predict`` exits 2 on it (a bad argument)."""


def _one_line(err: BaseException) -> str:
    """An ORT error (often several lines, with a C++ source location) as one line."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


# ------------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """The test transform, read from the export's metadata.

    Attributes:
        input_size: side of the square network input.
        resize: the shorter image side is resized to this before the center crop.
        mean: per-channel (RGB) mean subtracted after scaling to [0, 1].
        std: per-channel (RGB) std divided by after subtracting the mean.
        interpolation: Pillow resampling filter name (``bilinear`` in every export so far).
    """

    input_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "model") -> Preprocessing:
        """Parse the preprocessing keys of an export's metadata.

        Raises:
            PredictError: a key is missing or malformed (names the key and the file).
        """
        try:
            pre = cls(input_size=int(json.loads(meta["input_size"])), resize=int(json.loads(meta["resize"])),
                      mean=tuple(float(v) for v in json.loads(meta["mean"])),  # type: ignore[arg-type]
                      std=tuple(float(v) for v in json.loads(meta["std"])),  # type: ignore[arg-type]
                      interpolation=meta.get("interpolation", "bilinear"))
        except (KeyError, ValueError, TypeError) as err:
            raise PredictError(f"{source}: malformed LPT preprocessing metadata ({err!r})") from None
        if len(pre.mean) != 3 or len(pre.std) != 3 or any(s == 0 for s in pre.std):
            raise PredictError(f"{source}: metadata mean/std must be 3 non-zero values, got {pre.mean} / {pre.std}")
        if pre.interpolation not in _RESAMPLE:
            raise PredictError(f"{source}: unsupported interpolation {pre.interpolation!r} "
                               f"(supported: {sorted(_RESAMPLE)})")
        if meta.get("crop", "center") != "center":
            raise PredictError(f"{source}: unsupported crop policy {meta.get('crop')!r} (supported: 'center')")
        return pre


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB, the way training sees images.

    The pixels are :func:`lpt.data.imageio.to_rgb_array`'s, the conversion ingest stores in the shards:

    * ``RGB``: unchanged.
    * ``L``/``1``/``P``/``CMYK``/``YCbCr``/...: Pillow's ``convert("RGB")`` (grey is replicated to the
      three channels, palettes are expanded).
    * With alpha (``RGBA``, ``LA``, ``PA``, palettes with transparency): the alpha channel is dropped.
    * High-bit-depth grey: ``I;16*`` and ``I`` (16-bit data) as ``value >> 8``, ``F`` (intensities in [0, 1])
      as ``round(value * 255)``; ``I`` outside 0..65535 or ``F`` outside [0, 1] raises ``ValueError``.

    Args:
        img: a decoded Pillow image.

    Returns:
        An ``RGB`` image (the same object when it already is one).
    """
    if img.mode == "RGB":
        return img
    return Image.fromarray(to_rgb_array(img))  # HxWx3 uint8: RGB


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Read and decode an image file into RGB (:mod:`lpt.data.imageio`: a regular file of an allowed format
    and size).

    Raises:
        PredictRefused: a format outside the allowlist, too many pixels, or not a regular file (names the
            file and why).
        PredictError: the file is missing or is not an image Pillow can decode (names the file).
    """
    path = Path(path)
    try:
        data = read_image_file(path)
        with open_image(data) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise PredictError(f"{path}: no such image file") from None
    except ImageRefused as err:
        raise PredictRefused(f"{path}: {err}") from None
    except DECODE_ERRORS as err:  # whatever a damaged file makes Pillow raise (lpt.data.imageio)
        raise PredictError(f"{path}: {decode_error(err)}") from None


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int): shorter side -> size, longer side -> int(size * long / short)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess_image(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Apply the test transform to one image.

    Args:
        img: any Pillow image (converted with :func:`to_rgb`).
        pre: the export's preprocessing.

    Returns:
        float32 array ``[3, input_size, input_size]``, normalised.
    """
    img = to_rgb(img)
    new_w, new_h = _resized_size(img.width, img.height, pre.resize)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), _RESAMPLE[pre.interpolation])
    arr = np.asarray(img, dtype=np.uint8)  # [H, W, 3]
    crop = pre.input_size
    h, w = arr.shape[:2]
    if crop > h or crop > w:  # torchvision pads with zeros (left/top get the smaller half), then crops
        pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
        arr = np.pad(arr, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = arr.shape[:2]
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    arr = arr[top:top + crop, left:left + crop]
    x = arr.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def collect_image_paths(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders into a list of image files.

    Files named explicitly are kept whatever their extension (a non-image fails later, naming the file);
    folders are searched recursively for :data:`IMAGE_EXTENSIONS`, sorted. Entries that exist but are not
    regular files (a FIFO named ``x.png``) are kept too: :func:`load_image` refuses them by name, without
    opening them.

    Raises:
        PredictError: a path does not exist, or nothing was found.
    """
    paths = list(paths)
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.exists()
                              and not f.is_dir()))
        elif p.exists():
            out.append(p)
        else:
            raise PredictError(f"{p}: no such file or folder")
    if not out:
        raise PredictError("no images found in " + ", ".join(str(p) for p in paths))
    return out


# -------------------------------------------------------------------------------------- task packs
@dataclass(frozen=True)
class TaskPack:
    """One task of a frozen backbone, read from a ``.pack`` file (:func:`read_pack`).

    Attributes:
        path: the file.
        name: the task's name (``pack.name`` when it was written).
        tensors: graph input name -> float32 array (:data:`TASK_INPUTS`): exactly the trained model's
            trainable tensors.
        class_names: class index -> name.
        preprocessing: the test transform the task was trained and evaluated with.
        logit_scale: scores are ``softmax(logit_scale * cosine)``.
        backbone_fingerprint: sha256 prefix of the frozen backbone weights it was trained on.
        geometry: what a backbone graph must fix to run it (``task_inputs``, ``outputs``, ``depth``,
            ``embed_dim``, ``shared_blocks``, ``top_k``, ``input_size``, ``ln_eps``).
        metadata: the whole JSON metadata (metrics, gate verdict, recipe hash, ...).
    """

    path: Path
    name: str
    tensors: dict[str, np.ndarray]
    class_names: list[str]
    preprocessing: Preprocessing
    logit_scale: float
    backbone_fingerprint: str
    geometry: dict[str, Any]
    metadata: dict[str, Any]

    @property
    def backbone_name(self) -> str:
        """The timm name of the backbone it was trained on."""
        return str((self.metadata.get("backbone") or {}).get("name", "?"))

    def backbone_graph_path(self) -> Path:
        """The backbone graph written beside this pack (``backbone_graph`` in its metadata).

        Raises:
            PredictError: the graph is a link that resolves outside the pack's folder.
        """
        path = self.path.parent / _backbone_graph_name(self.metadata, self.path)
        if not path.resolve().is_relative_to(self.path.parent.resolve()):
            raise PredictError(f"{self.path}: backbone_graph {path} resolves to {path.resolve()}, outside the pack's "
                               "folder (a link out of it is not followed); give the graph with --backbone")
        return path


def _backbone_graph_name(meta: dict[str, Any], path: Path) -> str:
    """The pack's ``backbone_graph``: a plain file name in the pack's own folder (no folder, ``..`` or absolute path).

    Raises:
        PredictError: anything else (the message names the pack and the field).
    """
    name = meta.get("backbone_graph") or "backbone.onnx"  # absent in hand-made packs: the default name
    if not (isinstance(name, str) and name not in (".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and Path(name).name == name):
        raise PredictError(f"{path}: task-pack metadata backbone_graph {name!r} must be a file name in the pack's own "
                           "folder (no folders, '..' or absolute paths)")
    return name


def _dims_of(pack_geometry: dict[str, Any], num_classes: int) -> dict[str, int | None]:
    """Fixed dim sizes (L, D, L-S, C) from the geometry; T and P are found from the tensors."""
    depth, dim, shared = pack_geometry.get("depth"), pack_geometry.get("embed_dim"), pack_geometry.get("shared_blocks")
    return {"L": depth, "D": dim, "L-S": depth - shared if isinstance(depth, int) and isinstance(shared, int) else None,
            "C": num_classes, "T": None, "P": None}


def _read_pack_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A pack's tensors and its JSON metadata, the format and the required fields checked (numpy only)."""
    if not path.is_file():
        raise PredictError(f"{path}: no such task pack file")
    try:  # safetensors' numpy API only (no torch); imported here so single-model prediction never needs it
        from safetensors import safe_open
    except ImportError as err:  # pragma: no cover - a base dependency
        raise PredictError(f"{path}: reading task packs needs the safetensors package ({err})") from None
    try:
        with safe_open(str(path), framework="np") as fh:
            header = fh.metadata() or {}
            names = list(fh.keys())
            raw = header.get(PACK_METADATA_KEY)
            if raw is None:
                raise PredictError(f"{path}: not an LPT task pack (no '{PACK_METADATA_KEY}' header metadata); "
                                   "write one with `lpt pack`")
            tensors = {name: fh.get_tensor(name) for name in names}
    except PredictError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError, OSError, ValueError...
        raise PredictError(f"{path}: not a readable task pack ({type(err).__name__}: {err})") from None
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise PredictError(f"{path}: malformed task-pack metadata ({err})") from None
    if not isinstance(meta, dict):
        raise PredictError(f"{path}: task-pack metadata must be a JSON object, got {type(meta).__name__}")
    fmt = meta.get("pack_format")
    if fmt != PACK_FORMAT:
        raise PredictError(f"{path}: task-pack format {fmt!r} is not supported by this runtime (supports "
                           f"{PACK_FORMAT}); re-pack or upgrade lpt")
    wanted = {"name": str, "class_names": list, "preprocessing": dict, "logit_scale": (int, float),
              "backbone": dict, "geometry": dict}
    bad = [key for key, kind in wanted.items()
           if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool)]
    if bad:
        raise PredictError(f"{path}: task-pack metadata lacks or mistypes {', '.join(bad)}")
    return tensors, meta


def _check_pack_tensors(path: Path, tensors: dict[str, np.ndarray], geometry: dict[str, Any],
                        num_classes: int) -> dict[str, int | None]:
    """Exactly the tensors the geometry names (:func:`lpt.tensors.task_inputs`), float32, with shapes that agree
    with each other, with the geometry and with the class count; the symbol sizes found (L, D, L-S, T, P, C)."""
    task_inputs = geometry.get("task_inputs")
    known = spec_task_inputs()
    if not (isinstance(task_inputs, list) and task_inputs and all(n in known for n in task_inputs)):
        raise PredictError(f"{path}: geometry.task_inputs must list some of {list(known)}, got {task_inputs!r}")
    if sorted(tensors) != sorted(task_inputs):
        raise PredictError(f"{path}: holds tensors {sorted(tensors)} but its geometry names {sorted(task_inputs)}")
    dims = _dims_of(geometry, num_classes)
    for name in task_inputs:
        arr = tensors[name]
        if arr.dtype != np.float32:
            raise PredictError(f"{path}: tensor {name!r} is {arr.dtype}, expected float32")
        symbols = known[name]
        if arr.ndim != len(symbols):
            raise PredictError(f"{path}: tensor {name!r} has shape {list(arr.shape)}, expected "
                               f"[{', '.join(symbols)}]")
        for symbol, size in zip(symbols, arr.shape):
            if dims.get(symbol) is None and symbol in DYNAMIC_DIMS:  # T and P: read from the tensors
                dims[symbol] = int(size)
            if dims.get(symbol) != size:
                raise PredictError(f"{path}: tensor {name!r} has shape {list(arr.shape)}: its {symbol} is {size}, "
                                   f"but the pack's geometry / other tensors / {num_classes} class names say "
                                   f"{dims.get(symbol)}")
    return dims


def read_pack(path: str | os.PathLike[str]) -> TaskPack:
    """Read and check a task pack (numpy only; nothing in the file is executed).

    Checks: a safetensors file with the ``lpt_pack`` header key, a supported ``pack_format``, the
    required metadata fields, exactly the tensors its geometry names, float32, and shapes that agree
    with each other, with the geometry and with the class names.

    Args:
        path: a ``.pack`` file written by ``lpt pack``.

    Returns:
        The :class:`TaskPack`.

    Raises:
        PredictError: missing, unreadable, not a pack, or inconsistent (the message names the file and
            the field or tensor).
    """
    path = Path(path)
    tensors, meta = _read_pack_file(path)
    geometry, backbone = meta["geometry"], meta["backbone"]
    fingerprint = backbone.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise PredictError(f"{path}: task-pack metadata has no backbone fingerprint")
    class_names = [str(c) for c in meta["class_names"]]
    dims = _check_pack_tensors(path, tensors, geometry, len(class_names))
    top_k = geometry.get("top_k")
    if dims["P"] is not None and isinstance(top_k, int) and not 1 <= top_k <= dims["P"]:
        raise PredictError(f"{path}: top_k {top_k} does not fit a pool of {dims['P']} prompts")
    preprocessing = Preprocessing.from_metadata({k: str(v) for k, v in meta["preprocessing"].items()}, str(path))
    _backbone_graph_name(meta, path)
    return TaskPack(path=path, name=meta["name"], tensors=tensors, class_names=class_names,
                    preprocessing=preprocessing, logit_scale=float(meta["logit_scale"]),
                    backbone_fingerprint=fingerprint, geometry=geometry, metadata=meta)


def geometry_differences(pack: dict[str, Any], graph: dict[str, Any]) -> list[str]:
    """What differs between a pack's geometry and a backbone graph's, as ``"key pack-value vs graph-value"``."""
    keys = sorted(set(pack) | set(graph))
    return [f"{k} {pack.get(k)!r} vs {graph.get(k)!r}" for k in keys if pack.get(k) != graph.get(k)]


# ---------------------------------------------------------------------------------------- predictor
def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """Classify images with an LPT ONNX export, or with a backbone graph and task packs.

    ``Predictor(path)`` gives an :class:`ExportPredictor` (one task: the file ``lpt export`` writes),
    ``Predictor(path, packs=[...])`` a :class:`PackPredictor` (the ``backbone.onnx`` ``lpt pack`` writes, every
    image classified for every task, one copy of the backbone weights in memory). This class is their shared
    core: the ONNX Runtime session, the metadata checks common to both, preprocessing, running a batch and
    turning logits into rows.

    Args:
        path: the ``.onnx`` file written by ``lpt export`` (one task), or with ``packs`` the backbone graph
            written by ``lpt pack`` (the task tensors are its inputs).
        packs: task packs (``.pack`` paths or :class:`TaskPack`) to run on the backbone graph ``path``. A
            pack trained on another backbone (fingerprint) or with a geometry the graph does not fix the same
            way (shared blocks, top-k, method, ...) is refused, naming both files.
        providers: ONNX Runtime execution providers; default CUDA when this onnxruntime build has it
            (falling back to CPU), else CPU. The provider actually used is in :attr:`provider`.
        intra_op_num_threads: ORT threads per operator (0 = ORT's default).

    Attributes:
        metadata: the graph's metadata (strings).
        preprocessing: the test transform (with packs, the one every pack shares).
        provider: the execution provider the session runs on.

    Raises:
        PredictError: the file is missing, not ONNX, not an LPT export / backbone graph, or a pack does
            not fit it.
    """

    preprocessing: Preprocessing

    def __new__(cls, path: str | os.PathLike[str], packs: Sequence[str | os.PathLike[str] | TaskPack] | None = None,
                providers: Sequence[str] | None = None, intra_op_num_threads: int = 0) -> Predictor:
        if cls is Predictor:  # the case decides the class: one task, or packs on a backbone graph
            cls = PackPredictor if packs else ExportPredictor
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike[str], packs: Sequence[str | os.PathLike[str] | TaskPack] | None = None,
                 providers: Sequence[str] | None = None, intra_op_num_threads: int = 0) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise PredictError(f"{self.path}: no such model file")
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider",) if p in ort.get_available_providers()]
            providers = [*providers, "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: keeps `lpt predict` output clean
        if intra_op_num_threads:
            options.intra_op_num_threads = intra_op_num_threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as err:  # ORT raises its own exception types (InvalidProtobuf, Fail, ...)
            raise ModelFileError(f"{self.path}: cannot load as an ONNX model ({_one_line(err)})") from None
        # get_available_providers() lists CUDA even without a GPU: trust what the session really got.
        self.provider: str = self.session.get_providers()[0]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self._output_names: list[str] = []
        # a raw-pixel graph (model.raw.onnx, backbone.raw.onnx: lpt.rawpixels) preprocesses inside: feed pixels
        self.raw: bool = RAW_INPUT_NAME in {i.name for i in self.session.get_inputs()}
        self.image_input = RAW_INPUT_NAME if self.raw else INPUT_NAME

    @property
    def is_backbone_graph(self) -> bool:
        """The file is a backbone graph for task packs (``lpt_kind`` metadata), not a single-task export."""
        return self.metadata.get("lpt_kind") == BACKBONE_KIND

    def _check_format(self, what: str) -> None:
        meta, src = self.metadata, str(self.path)
        if "lpt_format" not in meta:
            how = "`lpt export` or `lpt pack`" if what == "backbone" else "`lpt export`"
            raise PredictError(f"{src}: not an LPT export (no 'lpt_format' metadata); export a trained model "
                               f"with {how}")
        try:
            fmt = int(meta["lpt_format"])
        except ValueError:
            raise PredictError(f"{src}: malformed lpt_format {meta['lpt_format']!r}") from None
        if fmt != LPT_FORMAT:
            raise PredictError(f"{src}: LPT export format {fmt} is not supported by this runtime "
                               f"(supports {LPT_FORMAT}); re-export or upgrade lpt")

    def _check_image_input(self, image: Any, size: int | None) -> None:
        """The graph's image input must take what :meth:`run` feeds: float32 ``[B, 3, size, size]`` (a raw graph:
        uint8 ``[B, H, W, 3]``).

        Raises:
            ModelFileError: another element type, rank or fixed size (a symbolic dimension is accepted).
        """
        if self.raw:
            shape = list(image.shape) if isinstance(image.shape, (list, tuple)) else []
            channels_ok = len(shape) == 4 and (shape[3] == 3 or not isinstance(shape[3], int))  # 3, or symbolic
            if image.type != "tensor(uint8)" or not channels_ok:
                raise ModelFileError(f"{self.path}: graph input '{RAW_INPUT_NAME}' is {image.type} {shape}, expected "
                                     "uint8 [B, H, W, 3]: re-export the model")
            return
        want: list[int | None] = [None, 3, size, size]
        shape = list(image.shape) if isinstance(image.shape, (list, tuple)) else []
        fits = len(shape) == 4 and all(w is None or not isinstance(d, int) or d == w for d, w in zip(shape, want))
        if image.type != "tensor(float)" or not fits:
            expected = f"float [B, 3, {size if size is not None else 'S'}, {size if size is not None else 'S'}]"
            raise ModelFileError(f"{self.path}: graph input '{INPUT_NAME}' is {image.type} {shape}, but its metadata "
                                 f"says the images are {expected}: re-export the model")

    # -- what differs between the two cases --------------------------------------------------------
    def _tasks(self) -> list[tuple[str | None, list[str], float]]:
        """``(task name or None, class names, logit scale)`` per task, in order."""
        raise NotImplementedError

    def _task_feed(self, task: int | str | None) -> dict[str, np.ndarray]:
        """The graph inputs besides the image for ``task``."""
        raise NotImplementedError

    # -- inference -------------------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> np.ndarray:
        """The test transform of this export: ``[3, S, S]`` float32 (see :func:`preprocess_image`); for a raw-pixel
        graph the decoded RGB pixels ``[H, W, 3]`` uint8 (the graph preprocesses)."""
        if self.raw:
            return np.asarray(to_rgb(img), dtype=np.uint8)
        return preprocess_image(img, self.preprocessing)

    def _predict_preprocessed(self, arrays: list[np.ndarray], top_k: int) -> list[dict[str, Any]]:
        """:meth:`predict_arrays` over preprocessed images: one call when they share a shape (always, unless
        raw pixels of different sizes), else one per image; rows in input order."""
        if len({a.shape for a in arrays}) <= 1:
            return self.predict_arrays(np.stack(arrays), top_k)
        return [row for a in arrays for row in self.predict_arrays(a[None], top_k)]

    def run(self, batch: np.ndarray, task: int | str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the graph on a normalised batch.

        Args:
            batch: float32 ``[B, 3, S, S]``, already preprocessed.
            task: with packs, which one (index or name); ``None`` for a single-task export.

        Returns:
            ``(logits [B, C] cosine, selected [B, k] prompt indices or None for single-pass methods)``.
        """
        extra = self._task_feed(task)
        s = self.preprocessing.input_size
        if self.raw:
            if batch.ndim != 4 or batch.shape[3] != 3:
                raise PredictError(f"expected decoded pixels of shape [B, H, W, 3], got {list(batch.shape)}")
            feed = {RAW_INPUT_NAME: np.ascontiguousarray(batch, dtype=np.uint8), **extra}
        elif batch.ndim != 4 or batch.shape[1:] != (3, s, s):
            raise PredictError(f"expected a batch of shape [B, 3, {s}, {s}], got {list(batch.shape)}")
        else:
            feed = {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32), **extra}
        try:
            out = self.session.run(self._output_names, feed)
        except Exception as err:  # ORT's own types (InvalidArgument, Fail, RuntimeException): shape/type errors
            raise ModelFileError(f"{self.path}: ONNX Runtime cannot run the graph on a [B, 3, {s}, {s}] batch "
                                 f"({_one_line(err)})") from None
        return out[0], (out[1] if len(out) > 1 else None)

    def predict_arrays(self, batch: np.ndarray, top_k: int = 1) -> list[dict[str, Any]]:
        """Top-k predictions for a preprocessed batch.

        Args:
            batch: float32 ``[B, 3, S, S]`` (from :meth:`preprocess`).
            top_k: classes per image, 1..C (with packs: 1..the smallest C of them).

        Returns:
            One dict per image (with packs: per image and task, tasks in pack order, key ``task``):
            ``labels`` (class indices, best first), ``classes`` (names), ``scores``
            (``softmax(logit_scale * cosine)``) and, for two-pass LPT, ``prompts`` (the group prompts the
            image selected).
        """
        tasks = self._tasks()
        fewest = min(tasks, key=lambda t: len(t[1]))
        if not 1 <= top_k <= len(fewest[1]):
            where = f"task {fewest[0]!r}" if fewest[0] is not None else "this model"
            raise PredictError(f"top_k must be between 1 and {len(fewest[1])} (classes in {where}), got {top_k}")
        per_task = [self._rows(*self.run(batch, index if name is not None else None), names, scale, top_k, name)
                    for index, (name, names, scale) in enumerate(tasks)]
        return [row for image_rows in zip(*per_task) for row in image_rows]  # image-major, tasks in order

    @staticmethod
    def _rows(logits: np.ndarray, selected: np.ndarray | None, class_names: list[str], logit_scale: float,
              top_k: int, task: str | None) -> list[dict[str, Any]]:
        probs = _softmax(logit_scale * logits.astype(np.float64))
        # stable sort on -logits: ties keep the lower index first, as argmax does
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        rows = []
        for i in range(len(logits)):
            labels = [int(j) for j in order[i]]
            row: dict[str, Any] = {} if task is None else {"task": task}
            row.update({"labels": labels, "classes": [class_names[j] for j in labels],
                        "scores": [float(probs[i, j]) for j in labels]})
            if selected is not None:
                row["prompts"] = [int(p) for p in selected[i]]
            rows.append(row)
        return rows

    def predict_images(self, images: Sequence[Image.Image], top_k: int = 1,
                       batch_size: int = 32) -> list[dict[str, Any]]:
        """Top-k predictions for decoded Pillow images (any mode), in batches of ``batch_size``."""
        if batch_size < 1:
            raise PredictError(f"batch_size must be >= 1, got {batch_size}")
        rows: list[dict[str, Any]] = []
        for start in range(0, len(images), batch_size):
            rows.extend(self._predict_preprocessed([self.preprocess(im) for im in images[start:start + batch_size]],
                                                   top_k))
        return rows

    def predict_paths(self, paths: Iterable[str | os.PathLike[str]], top_k: int = 1,
                      batch_size: int = 32) -> list[dict[str, Any]]:
        """Top-k predictions for image files and folders (folders searched recursively).

        Args:
            paths: image files and/or folders.
            top_k: classes per image.
            batch_size: images per ORT call (images are decoded one batch at a time, once for all tasks).

        Returns:
            One dict per image (with packs: per image and task), in input order: ``path`` plus the keys of
            :meth:`predict_arrays`.

        Raises:
            PredictError: a path is missing or a file is not a readable image (names the file).
        """
        if batch_size < 1:
            raise PredictError(f"batch_size must be >= 1, got {batch_size}")
        files = collect_image_paths(paths)
        per_image = len(self._tasks())
        rows: list[dict[str, Any]] = []
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            predicted = self._predict_preprocessed([self.preprocess(load_image(f)) for f in chunk], top_k)
            for i, row in enumerate(predicted):
                rows.append({"path": str(chunk[i // per_image]), **row})
        return rows


class ExportPredictor(Predictor):
    """One task: the graph ``lpt export`` writes, its trained tensors baked in (``Predictor(path)``).

    Attributes:
        class_names: class index -> name.
        logit_scale: scores are ``softmax(logit_scale * cosine)``.
    """

    def __init__(self, path: str | os.PathLike[str], packs: Sequence[str | os.PathLike[str] | TaskPack] | None = None,
                 providers: Sequence[str] | None = None, intra_op_num_threads: int = 0) -> None:
        super().__init__(path, None, providers, intra_op_num_threads)
        if self.is_backbone_graph:
            raise PredictError(f"{self.path}: a backbone graph for task packs, not a single-task export: give "
                               "the packs to run on it (`lpt predict --pack TASK.pack IMAGES`)")
        self._validate()
        if packs:
            raise PredictError(f"{self.path}: a single-task export, not a backbone graph for task packs: run "
                               "packs on the backbone.onnx that `lpt pack` writes beside them")

    def _validate(self) -> None:
        meta, src = self.metadata, str(self.path)
        self._check_format("model")
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise PredictError(f"{src}: LPT export is missing metadata keys {missing}")
        self.preprocessing = Preprocessing.from_metadata(meta, src)
        try:
            self.class_names: list[str] = [str(c) for c in json.loads(meta["class_names"])]
            self.logit_scale = float(json.loads(meta["logit_scale"]))
        except (ValueError, TypeError) as err:
            raise PredictError(f"{src}: malformed class_names/logit_scale metadata ({err})") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if self.image_input not in inputs or LOGITS_NAME not in outputs:
            raise PredictError(f"{src}: expected input '{INPUT_NAME}' (or '{RAW_INPUT_NAME}') and output "
                               f"'{LOGITS_NAME}', found inputs {sorted(inputs)} outputs {sorted(outputs)}")
        self._check_image_input(inputs[self.image_input], self.preprocessing.input_size)
        n_out = outputs[LOGITS_NAME].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.class_names):
            raise PredictError(f"{src}: logits have {n_out} classes but metadata names {len(self.class_names)}")
        self._output_names = [LOGITS_NAME] + ([SELECTED_NAME] if SELECTED_NAME in outputs else [])

    def _tasks(self) -> list[tuple[str | None, list[str], float]]:
        return [(None, self.class_names, self.logit_scale)]

    def _task_feed(self, task: int | str | None) -> dict[str, np.ndarray]:
        if task is not None:
            raise PredictError(f"{self.path}: a single-task export has no task {task!r}")
        return {}


class PackPredictor(Predictor):
    """Task packs on the backbone graph ``lpt pack`` writes: the task tensors are graph inputs, fed per task
    (``Predictor(path, packs=[...])``).

    Attributes:
        packs: the task packs, in the given order.
        geometry: what the graph fixes and every pack must match (:func:`geometry_differences`).
        backbone_fingerprint: the frozen backbone the graph (and every pack) was made from.
    """

    def __init__(self, path: str | os.PathLike[str], packs: Sequence[str | os.PathLike[str] | TaskPack] | None = None,
                 providers: Sequence[str] | None = None, intra_op_num_threads: int = 0) -> None:
        super().__init__(path, packs, providers, intra_op_num_threads)
        if not self.is_backbone_graph:
            ExportPredictor._validate(self)  # type: ignore[arg-type]  # an export's own errors come first
            raise PredictError(f"{self.path}: a single-task export, not a backbone graph for task packs: run "
                               "packs on the backbone.onnx that `lpt pack` writes beside them")
        if not packs:
            raise PredictError(f"{self.path}: a backbone graph for task packs, not a single-task export: give "
                               "the packs to run on it (`lpt predict --pack TASK.pack IMAGES`)")
        self._validate_backbone()
        self.packs: list[TaskPack] = []
        self._load_packs(packs)

    def _validate_backbone(self) -> None:
        meta, src = self.metadata, str(self.path)
        self._check_format("backbone")
        try:
            self.geometry: dict[str, Any] = json.loads(meta["geometry"])
            self.backbone_fingerprint = str(meta["backbone_fingerprint"])
        except (KeyError, ValueError, TypeError) as err:
            raise PredictError(f"{src}: backbone graph without readable geometry/backbone_fingerprint metadata "
                               f"({err!r})") from None
        if not isinstance(self.geometry, dict):
            raise PredictError(f"{src}: geometry metadata must be a JSON object")
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        expected = {self.image_input, *self.geometry.get("task_inputs", [])}
        if inputs != expected or LOGITS_NAME not in outputs:
            raise PredictError(f"{src}: backbone graph inputs {sorted(inputs)} / outputs {sorted(outputs)} do not "
                               f"match its geometry (inputs {sorted(expected)}, output '{LOGITS_NAME}')")
        self._output_names = [LOGITS_NAME] + ([SELECTED_NAME] if SELECTED_NAME in outputs else [])
        image = next(i for i in self.session.get_inputs() if i.name == self.image_input)
        size = self.geometry.get("input_size")
        self._check_image_input(image, size if isinstance(size, int) and not isinstance(size, bool) else None)

    def _load_packs(self, packs: Sequence[str | os.PathLike[str] | TaskPack]) -> None:
        src, name = str(self.path), self.metadata.get("backbone", "?")
        for item in packs:
            pack = item if isinstance(item, TaskPack) else read_pack(item)
            if pack.backbone_fingerprint != self.backbone_fingerprint:
                raise PredictError(f"{pack.path}: trained on backbone {pack.backbone_name} "
                                   f"{pack.backbone_fingerprint}, but {src} is backbone {name} "
                                   f"{self.backbone_fingerprint}: use the backbone graph written with this pack "
                                   "(same frozen weights)")
            differences = geometry_differences(pack.geometry, self.geometry)
            if differences:
                raise PredictError(f"{pack.path}: geometry does not fit backbone graph {src} (pack vs graph: "
                                   f"{'; '.join(differences)}): use a backbone graph exported for this geometry")
            for other in self.packs:
                if other.name == pack.name:
                    raise PredictError(f"{pack.path} and {other.path} are both task {pack.name!r}: give each task once")
                if other.preprocessing != pack.preprocessing:
                    raise PredictError(f"{pack.path} and {other.path} preprocess images differently "
                                       f"({pack.preprocessing} vs {other.preprocessing}): run them in separate "
                                       "predictors")
            self.packs.append(pack)
        self.preprocessing = self.packs[0].preprocessing
        if self.preprocessing.input_size != self.geometry.get("input_size"):
            raise PredictError(f"{self.packs[0].path}: input size {self.preprocessing.input_size} but backbone graph "
                               f"{src} takes {self.geometry.get('input_size')}")

    def _tasks(self) -> list[tuple[str | None, list[str], float]]:
        return [(p.name, p.class_names, p.logit_scale) for p in self.packs]

    def _task_feed(self, task: int | str | None) -> dict[str, np.ndarray]:
        """The pack's tensors: the task is its tensors (one graph, one copy of the backbone)."""
        names = [p.name for p in self.packs]
        if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < len(self.packs):
            return self.packs[task].tensors
        if isinstance(task, str) and task in names:
            return self.packs[names.index(task)].tensors
        raise PredictError(f"task must be one of {names} (or its index), got {task!r}")


# --------------------------------------------------------------------------------------- formatting
def format_predictions(rows: Sequence[dict[str, Any]], fmt: Literal["text", "json", "csv"] = "text") -> str:
    """Render prediction rows.

    Args:
        rows: from :meth:`Predictor.predict_paths` (``path`` optional; ``task`` with packs).
        fmt: ``text`` (one line per image: ``path: class (score), ...``; with packs ``path [task]: ...``),
            ``json`` (JSON lines, one object per row) or ``csv`` (header ``path,rank,label,class,score``, one
            line per class; with packs ``path,task,rank,label,class,score``). Names and paths are escaped in
            text and CSV (:mod:`lpt.escaping`: control characters, a leading ``=+-@``); JSON keeps them exact.

    Returns:
        The rendered text (no trailing newline).
    """
    if fmt == "json":
        return "\n".join(json.dumps(r) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        tasks = any("task" in r for r in rows)
        writer.writerow(["path", *(["task"] if tasks else []), "rank", "label", "class", "score"])
        for r in rows:
            for rank, (label, name, score) in enumerate(zip(r["labels"], r["classes"], r["scores"]), 1):
                writer.writerow([csv_cell(r.get("path", "")), *([csv_cell(r.get("task", ""))] if tasks else []),
                                 rank, label, csv_cell(name), f"{score:.6f}"])
        return buf.getvalue().rstrip("\n")
    if fmt == "text":
        lines = []
        for i, r in enumerate(rows):
            preds = ", ".join(f"{text_line(n)} ({s:.3f})" for n, s in zip(r["classes"], r["scores"]))
            task = f" [{text_line(r['task'])}]" if "task" in r else ""
            lines.append(f"{text_line(r.get('path', i))}{task}: {preds}")
        return "\n".join(lines)
    raise PredictError(f"unknown output format {fmt!r} (text, json or csv)")
