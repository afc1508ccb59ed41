"""Torch-free inference for LPT ONNX exports: numpy + onnxruntime + Pillow, nothing else.

The exported graph (``lpt export``) holds the whole LPT inference (query pass, key matching, top-k
prompt selection, prompted pass, cosine head); everything a consumer needs to feed it is in the ONNX
``metadata_props`` (see :data:`REQUIRED_METADATA` and ``docs/export.md``). This module reads that
metadata and reproduces training's *test* transform exactly (``lpt.data.reader.build_transform(train=False)``):

1. decode with Pillow and convert to RGB (:func:`to_rgb`),
2. resize the shorter side to ``resize`` (bilinear, antialiased: Pillow's resampling, as torchvision
   does on PIL images); the longer side becomes ``int(resize * long / short)``,
3. center-crop ``input_size`` x ``input_size`` (zero padding where the image is smaller, as torchvision),
4. ``float32 / 255`` then ``(x - mean) / std`` per channel, channels first.

Example:
    >>> from lpt.runtime import Predictor, format_predictions
    >>> predictor = Predictor("models/export/model.onnx")
    >>> rows = predictor.predict_paths(["photo.png", "folder/"], top_k=3)
    >>> print(format_predictions(rows, fmt="text"))

Only the standard library, numpy, onnxruntime and Pillow may be imported here: ``pip install 'lpt[ort]'``
gives a working ``lpt predict`` without torch.
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
from PIL import Image, UnidentifiedImageError

__all__ = [
    "LPT_FORMAT",
    "REQUIRED_METADATA",
    "IMAGE_EXTENSIONS",
    "PredictError",
    "Preprocessing",
    "Predictor",
    "to_rgb",
    "load_image",
    "preprocess_image",
    "collect_image_paths",
    "format_predictions",
]

LPT_FORMAT = 1
"""Version of the export layout (graph I/O + metadata keys); bumped on incompatible changes."""

INPUT_NAME = "image"
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

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
"""Files picked up when a *folder* is given; files named explicitly are always tried."""

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


class PredictError(RuntimeError):
    """A model or image cannot be used; the message names the file and what is wrong."""


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

    * ``RGB``: unchanged.
    * ``L``/``1``/``P``/``CMYK``/``YCbCr``/...: Pillow's ``convert("RGB")`` (grey is replicated to the
      three channels, palettes are expanded).
    * With alpha (``RGBA``, ``LA``, ``PA``, palettes with transparency): the alpha channel is dropped
      (``convert("RGB")``), exactly as the ingest path decodes training images.
    * 16-bit grey (``I;16*``): scaled to 8 bits (``value >> 8``) instead of Pillow's clipping to 255;
      32-bit ``I``/``F``: clipped to 0..255.

    Args:
        img: a decoded Pillow image.

    Returns:
        An ``RGB`` image (the same object when it already is one).
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        arr = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.clip(np.asarray(img, dtype=np.float64), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's warning; alpha is dropped next, as for RGBA
    return img.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image file into RGB.

    Raises:
        PredictError: the file is missing or is not an image Pillow can decode (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise PredictError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


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
    folders are searched recursively for :data:`IMAGE_EXTENSIONS`, sorted.

    Raises:
        PredictError: a path does not exist, or nothing was found.
    """
    paths = list(paths)
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS))
        elif p.is_file():
            out.append(p)
        else:
            raise PredictError(f"{p}: no such file or folder")
    if not out:
        raise PredictError("no images found in " + ", ".join(str(p) for p in paths))
    return out


# ---------------------------------------------------------------------------------------- predictor
def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """Classify images with an LPT ONNX export.

    Args:
        path: the ``.onnx`` file written by ``lpt export``.
        providers: ONNX Runtime execution providers; default CUDA when this onnxruntime build has it
            (falling back to CPU), else CPU. The provider actually used is in :attr:`provider`.
        intra_op_num_threads: ORT threads per operator (0 = ORT's default).

    Attributes:
        metadata: the export's metadata (strings).
        class_names: class index -> name.
        preprocessing: the test transform.
        logit_scale: scores are ``softmax(logit_scale * cosine)``.
        provider: the execution provider the session runs on.

    Raises:
        PredictError: the file is missing, not ONNX, or not an LPT export.
    """

    def __init__(self, path: str | os.PathLike[str], providers: Sequence[str] | None = None,
                 intra_op_num_threads: int = 0) -> None:
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
            raise PredictError(f"{self.path}: cannot load as an ONNX model ({type(err).__name__}: {err})") from None
        # get_available_providers() lists CUDA even without a GPU: trust what the session really got.
        self.provider: str = self.session.get_providers()[0]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self._validate()

    def _validate(self) -> None:
        meta, src = self.metadata, str(self.path)
        if "lpt_format" not in meta:
            raise PredictError(f"{src}: not an LPT export (no 'lpt_format' metadata); "
                               "export a trained model with `lpt export`")
        try:
            fmt = int(meta["lpt_format"])
        except ValueError:
            raise PredictError(f"{src}: malformed lpt_format {meta['lpt_format']!r}") from None
        if fmt != LPT_FORMAT:
            raise PredictError(f"{src}: LPT export format {fmt} is not supported by this runtime "
                               f"(supports {LPT_FORMAT}); re-export or upgrade lpt")
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
        if INPUT_NAME not in inputs or LOGITS_NAME not in outputs:
            raise PredictError(f"{src}: expected input '{INPUT_NAME}' and output '{LOGITS_NAME}', "
                               f"found inputs {sorted(inputs)} outputs {sorted(outputs)}")
        n_out = outputs[LOGITS_NAME].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.class_names):
            raise PredictError(f"{src}: logits have {n_out} classes but metadata names {len(self.class_names)}")
        self._output_names = [LOGITS_NAME] + ([SELECTED_NAME] if SELECTED_NAME in outputs else [])

    # -- inference -------------------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> np.ndarray:
        """The test transform of this export: ``[3, S, S]`` float32 (see :func:`preprocess_image`)."""
        return preprocess_image(img, self.preprocessing)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the graph on a normalised batch.

        Args:
            batch: float32 ``[B, 3, S, S]``, already preprocessed.

        Returns:
            ``(logits [B, C] cosine, selected [B, k] prompt indices or None for single-pass methods)``.
        """
        s = self.preprocessing.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, s, s):
            raise PredictError(f"expected a batch of shape [B, 3, {s}, {s}], got {list(batch.shape)}")
        out = self.session.run(self._output_names, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return out[0], (out[1] if len(out) > 1 else None)

    def predict_arrays(self, batch: np.ndarray, top_k: int = 1) -> list[dict[str, Any]]:
        """Top-k predictions for a preprocessed batch.

        Args:
            batch: float32 ``[B, 3, S, S]`` (from :meth:`preprocess`).
            top_k: classes per image, 1..C.

        Returns:
            One dict per image: ``labels`` (class indices, best first), ``classes`` (names), ``scores``
            (``softmax(logit_scale * cosine)``) and, for two-pass LPT exports, ``prompts`` (the group
            prompts the image selected).
        """
        n_classes = len(self.class_names)
        if not 1 <= top_k <= n_classes:
            raise PredictError(f"top_k must be between 1 and {n_classes} (classes in this model), got {top_k}")
        logits, selected = self.run(batch)
        probs = _softmax(self.logit_scale * logits.astype(np.float64))
        # stable sort on -logits: ties keep the lower index first, as argmax does
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
        rows = []
        for i in range(len(logits)):
            labels = [int(j) for j in order[i]]
            row: dict[str, Any] = {"labels": labels, "classes": [self.class_names[j] for j in labels],
                                   "scores": [float(probs[i, j]) for j in labels]}
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
            batch = np.stack([self.preprocess(im) for im in images[start:start + batch_size]])
            rows.extend(self.predict_arrays(batch, top_k))
        return rows

    def predict_paths(self, paths: Iterable[str | os.PathLike[str]], top_k: int = 1,
                      batch_size: int = 32) -> list[dict[str, Any]]:
        """Top-k predictions for image files and folders (folders searched recursively).

        Args:
            paths: image files and/or folders.
            top_k: classes per image.
            batch_size: images per ORT call (images are decoded one batch at a time).

        Returns:
            One dict per image, in input order: ``path`` plus the keys of :meth:`predict_arrays`.

        Raises:
            PredictError: a path is missing or a file is not a readable image (names the file).
        """
        if batch_size < 1:
            raise PredictError(f"batch_size must be >= 1, got {batch_size}")
        files = collect_image_paths(paths)
        rows: list[dict[str, Any]] = []
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            batch = np.stack([self.preprocess(load_image(f)) for f in chunk])
            for f, row in zip(chunk, self.predict_arrays(batch, top_k)):
                rows.append({"path": str(f), **row})
        return rows


# --------------------------------------------------------------------------------------- formatting
def format_predictions(rows: Sequence[dict[str, Any]], fmt: Literal["text", "json", "csv"] = "text") -> str:
    """Render prediction rows.

    Args:
        rows: from :meth:`Predictor.predict_paths` (``path`` optional).
        fmt: ``text`` (one line per image: ``path: class (score), ...``), ``json`` (JSON lines, one
            object per image) or ``csv`` (header ``path,rank,label,class,score``, one line per class).

    Returns:
        The rendered text (no trailing newline).
    """
    if fmt == "json":
        return "\n".join(json.dumps(r) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "rank", "label", "class", "score"])
        for r in rows:
            for rank, (label, name, score) in enumerate(zip(r["labels"], r["classes"], r["scores"]), 1):
                writer.writerow([r.get("path", ""), rank, label, name, f"{score:.6f}"])
        return buf.getvalue().rstrip("\n")
    if fmt == "text":
        lines = []
        for i, r in enumerate(rows):
            preds = ", ".join(f"{n} ({s:.3f})" for n, s in zip(r["classes"], r["scores"]))
            lines.append(f"{r.get('path', i)}: {preds}")
        return "\n".join(lines)
    raise PredictError(f"unknown output format {fmt!r} (text, json or csv)")
