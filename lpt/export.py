"""ONNX export of the whole LPT inference, gated on ORT-vs-torch parity (the ``lpt export`` stage).

One graph does everything the trained model does at test time::

    image [B,3,S,S] ──► patch embed ──► blocks 0..S-1 (shared prompt) ──┬──► blocks S..L-1 (shared prompt)
    (normalised)                                                        │        └► norm, CLS = query q
                                                                        │    cos(q, keys) ─► TopK k ─► selected [B,k]
                                                                        │    mean of the k group prompts
                                                                        └──► blocks S..L-1 (shared + group prompt)
                                                                                 └► norm, CLS ─► cosine head ─► logits [B,C]

The hidden state after the shared-only blocks is computed once and reused by the prompted pass (block
reuse, :meth:`lpt.model.lpt.LPTModel.forward`). Single-pass methods (``lpt_phase1``, ``vpt_deep``,
``linear_probe``) export the same way with only the ``logits`` output.

The export honours the quality gate itself: it refuses a checkpoint whose evaluated verdict
(``<evaluate.out_dir>/gate.json``, written by ``lpt evaluate``) is missing, failed, or belongs to another
checkpoint (sha256), whether it runs under ``dvc repro`` or directly.

The steps it shares with ``lpt pack`` (gated model, one trace, parity check, atomic output folder) live in
:mod:`lpt.ship`. The output folder (``params.export.out_dir``) is written atomically: everything is built in a temp
folder beside it and renamed into place only after ``onnx.checker`` and the parity gate pass, so a
failed export writes nothing and leaves a previous export as it was (``export.json`` names the checkpoint
each export was made from).

Example:
    >>> from lpt.config import load_params
    >>> from lpt.export import run_export
    >>> result = run_export(load_params("params.yaml"))
    >>> result.model_path, result.max_abs_diff, result.top1_agreement
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lpt.config import Params
from lpt.methods import own
from lpt.model.backbone import ResolvedTransforms, resolve_transforms
from lpt.model.lpt import LPTModel
# the metadata schema belongs to the torch-free consumer; the exporter writes what it reads
from lpt.runtime import LOGITS_NAME, LPT_FORMAT, REQUIRED_METADATA, SELECTED_NAME
from lpt.ship import (ExportError, GateNotPassed, ParityFailed, check_gate_verdict, check_graph, compare_on_test,
                      compare_raw_on_test, optimize_graph, ort_runner, ort_session, parity_failures, parity_sample,
                      raise_parity_failures, raw_failures, shipping, trace_graph, write_metadata)
from lpt.rawpixels import RAW_INPUT_NAME, write_raw_graph
from lpt.triton import TRITON_DIR, write_triton_repository
from lpt.utils import sha256_file, write_json_atomic

__all__ = [
    "ExportError",
    "GateNotPassed",
    "ParityFailed",
    "ExportResult",
    "MODEL_FILE",
    "RAW_FILE",
    "REPORT_FILE",
    "export_onnx",
    "optimize_graph",
    "build_metadata",
    "write_metadata",
    "check_gate_verdict",
    "parity_sample",
    "result_summary",
    "quantize_int8",
    "convert_fp16",
    "run_export",
]

MODEL_FILE = "model.onnx"
RAW_FILE = "model.raw.onnx"
INT8_FILE = "model.int8.onnx"
FP16_FILE = "model.fp16.onnx"
REPORT_FILE = "export.json"


@dataclass
class ExportResult:
    """What :func:`run_export` produced.

    Attributes:
        model_path: the fp32 ONNX graph.
        report_path: ``export.json`` (parity figures, test top-1 counts, sizes).
        max_abs_diff: ORT-vs-torch max absolute logit difference over the test split.
        top1_agreement: share of test images where ORT and torch predict the same class.
        num_images: test images compared.
        torch_correct: correct top-1 predictions of the torch model.
        ort_correct: correct top-1 predictions of the ORT fp32 graph.
        variants: precision -> ONNX path (``fp32`` always; ``int8`` / ``fp16`` when enabled and passed).
        notes: human-readable remarks (e.g. why a variant was skipped).
    """

    model_path: Path
    report_path: Path
    max_abs_diff: float
    top1_agreement: float
    num_images: int
    torch_correct: int
    ort_correct: int
    variants: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)



# ------------------------------------------------------------------------------------------- graph
def export_onnx(model: LPTModel, path: str | Path, *, opset: int = 18, dynamo: bool = False,
                two_pass: bool = False, input_size: int | None = None, optimize: bool = False) -> Path:
    """Export the whole LPT inference of ``model`` to one self-contained ONNX file, the trained tensors as constants.

    Input ``image`` float32 ``[batch, 3, S, S]`` (normalised), outputs ``logits`` float32 ``[batch, C]``
    (raw cosine) and, for two-phase LPT, ``selected`` int64 ``[batch, k]`` (the group prompts used).
    The batch axis is dynamic. :func:`lpt.ship.trace_graph` without task inputs; its arguments.

    Returns:
        ``path``.
    """
    return trace_graph(model, path, opset=opset, dynamo=dynamo, two_pass=two_pass, input_size=input_size,
                       optimize=optimize)


# ---------------------------------------------------------------------------------------- metadata
def build_metadata(params: Params, model: LPTModel, class_names: list[str], checkpoint_meta: dict[str, Any],
                   *, precision: str = "fp32", dynamo: bool = False,
                   transforms: ResolvedTransforms | None = None) -> dict[str, str]:
    """Everything a consumer needs to preprocess, run and interpret the graph (all values strings).

    Lists and numbers are JSON; names are plain strings. See ``docs/export.md`` for the key list. The
    provenance comes from the checkpoint's own record (``model.json``): backbone, geometry and
    ``params_sha256`` = the sha256 of the training recipe that produced it. The preprocessing values are
    the ones actually used: ``params.transforms`` with its nulls filled from the model
    (``transforms``; default :func:`~lpt.model.backbone.resolve_transforms` on the model's backbone).
    """
    import lpt

    t = transforms if transforms is not None else resolve_transforms(params.transforms, model.backbone)
    backbone = checkpoint_meta.get("backbone") or {}
    meta = {
        "lpt_format": str(LPT_FORMAT),
        "lpt_version": lpt.__version__,
        "method": model.method,
        "phase": str(model.phase),
        "class_names": json.dumps(list(class_names)),
        "num_classes": str(len(class_names)),
        # preprocessing = lpt.data.reader.build_transform(train=False)
        "input_size": str(t.input_size),
        "resize": str(t.resize),
        "resize_mode": "shorter_side",  # shorter side -> resize, longer side int(resize * long / short)
        "interpolation": "bilinear",
        "antialias": "true",  # Pillow resampling (what torchvision does on PIL images)
        "crop": "center",
        "color": "RGB",  # grey replicated, alpha dropped (lpt.runtime.to_rgb)
        "pixel_scale": json.dumps(1 / 255),
        "mean": json.dumps(list(t.mean)),
        "std": json.dumps(list(t.std)),
        "layout": "NCHW",
        # outputs
        "logit_scale": json.dumps(own(params.loss.scale, model.spec.recipe, "scale")),
        "outputs": json.dumps({LOGITS_NAME: "raw cosine [B, C]; scores = softmax(logit_scale * logits)",
                               **({SELECTED_NAME: "group prompt indices [B, top_k]"} if model.phase == 2 else {})}),
        # provenance
        "backbone": str(backbone.get("name") or type(model.backbone).__name__),
        "backbone_fingerprint": str(backbone.get("fingerprint") or model.backbone_fingerprint()),
        "backbone_kwargs": json.dumps(backbone.get("timm_kwargs") or {}),
        "model_config": json.dumps(model.model_config()),
        "params_sha256": str(checkpoint_meta.get("recipe_sha256", "")),
        "checkpoint_sha256": str(checkpoint_meta.get("weights_sha256", "")),
        "precision": precision,
        "exporter": "dynamo" if dynamo else "torchscript",
        "optimized": json.dumps(params.export.optimize),  # export.optimize: rewrites + folding applied
        "opset": str(params.export.opset),
        "torch_version": torch.__version__,
    }
    assert all(k in meta for k in REQUIRED_METADATA)
    return meta


# ---------------------------------------------------------------------------------------- variants
INT8_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm")
"""The node types :func:`quantize_int8` quantises (convolutions stay float32)."""


def quantize_int8(src: Path, dst: Path) -> Path:
    """Dynamic INT8 quantisation of the MatMul / Gemm nodes (weights int8, activations quantised on the fly).

    Only the transformer's matrix products are quantised; convolutions (a hybrid ViT's CNN stem, the patch
    projection) stay float32. On the embedded default (EfficientNet-Lite0 stem) quantising every op ORT
    can lost 1.55 points of test top-1 (0.6255 vs 0.6410), MatMul / Gemm only 0.05 (0.6405).
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.disable(logging.WARNING)  # its "consider pre-processing" hint: shape pre-processing fails on this graph
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OP_TYPES))
    finally:
        logging.disable(logging.NOTSET)
    return dst


def convert_fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and compute with float32 inputs/outputs kept (``keep_io_types``).

    Raises:
        ImportError: this onnxruntime has no ``onnxruntime.transformers.float16`` converter.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return dst


# ---------------------------------------------------------------------------------------------- run
_OWN = (MODEL_FILE, RAW_FILE, INT8_FILE, FP16_FILE, REPORT_FILE, "triton")
"""What ``export.out_dir`` holds: a folder with anything else is never replaced (:func:`lpt.utils.check_output_dir`)."""


def _variants(fp32: Path, folder: Path, params: Params, meta: dict[str, str], doc: str,
              notes: list[str]) -> dict[str, Path]:
    """The fp32 graph and the INT8 / fp16 variants ``export.int8`` / ``export.fp16`` ask for, metadata written."""
    files = {"fp32": fp32}
    if params.export.int8:
        files["int8"] = quantize_int8(fp32, folder / INT8_FILE)
        write_metadata(files["int8"], {**meta, "precision": "int8"}, doc)
    if params.export.fp16:
        try:
            files["fp16"] = convert_fp16(fp32, folder / FP16_FILE)
            write_metadata(files["fp16"], {**meta, "precision": "fp16"}, doc)
        except ImportError as err:
            notes.append(f"fp16 skipped: onnxruntime.transformers.float16 is not available ({err})")
    return files


def _variant_drops(stats: dict[str, Any], max_drop: float) -> list[str]:
    """Each variant's top-1 drop against fp32 (recorded in ``stats``); a line per drop over ``max_drop``."""
    fp = stats["fp32"]
    failures = []
    for variant in ("int8", "fp16"):
        if variant in stats:
            drop = fp["accuracy"] - stats[variant]["accuracy"]
            stats[variant]["accuracy_drop"] = drop
            if drop > max_drop:
                failures.append(f"{variant} top-1 {stats[variant]['accuracy']:.4f} vs fp32 {fp['accuracy']:.4f}: "
                                f"drop {drop:.4f} > export.max_accuracy_drop {max_drop:g}")
    return failures


def _raw_graph(fp32: Path, folder: Path, transforms: ResolvedTransforms) -> Path:
    """``model.raw.onnx``: ``model.onnx`` with the test-time preprocessing inside (:mod:`lpt.rawpixels`), checked."""
    raw = write_raw_graph(fp32, folder / RAW_FILE, transforms.input_size, transforms.resize, tuple(transforms.mean),
                          tuple(transforms.std))
    check_graph(raw)
    return raw


def _report(params: Params, model: LPTModel, meta: dict[str, str], stats: dict[str, Any],
            files: dict[str, Path], notes: list[str], raw: Path | None = None) -> dict[str, Any]:
    """``export.json``: parity figures, test top-1 counts, each variant's file, size, sha256 and figures; the
    raw-pixel graph's file and parity against the Python preprocessing; the Triton repository."""
    cfg, fp = params.export, stats["fp32"]
    report = {
        "format": LPT_FORMAT,
        "method": model.method,
        "phase": model.phase,
        "opset": cfg.opset,
        "exporter": meta["exporter"],
        "optimize": cfg.optimize,
        "parity": {"max_abs_diff": fp["max_abs_diff"], "top1_agreement": fp["top1_agreement"],
                   "prompt_agreement": fp["prompt_agreement"],
                   "images": stats["num_images"], "of_test_images": stats["test_images"],
                   "classes": stats["classes"],
                   "thresholds": cfg.parity.model_dump(mode="json")},
        "test": {"num_images": stats["num_images"], "torch_correct": stats["torch_correct"],
                 "ort_correct": fp["correct"], "torch_accuracy": stats["torch_accuracy"],
                 "ort_accuracy": fp["accuracy"]},
        "variants": {k: {"file": p.name, "bytes": p.stat().st_size, "sha256": sha256_file(p),
                         **{m: v for m, v in stats[k].items()}} for k, p in files.items()},
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "params_sha256": meta["params_sha256"],
        "checkpoint_sha256": meta["checkpoint_sha256"],
        "notes": notes,
    }
    if raw is not None:
        report["raw"] = {"file": raw.name, "bytes": raw.stat().st_size, "sha256": sha256_file(raw),
                         "input": f"{RAW_INPUT_NAME}: uint8 [N, H, W, 3] RGB", **stats["raw"],
                         "threshold": cfg.parity.raw_min_agreement,
                         "note": "vs lpt.runtime's Python preprocessing + model.onnx; the only difference is the "
                                 "resize kernel (Pillow: two 8-bit passes; ONNX Resize: float, one pass)"}
        if cfg.triton.enabled:
            report["triton"] = {"repository": TRITON_DIR, "model": cfg.triton.name,
                                "max_batch_size": cfg.triton.max_batch_size}
    return report


def run_export(params: Params) -> ExportResult:
    """Export the final trained model to ONNX and gate it on parity (the ``lpt export`` stage).

    Steps (:func:`lpt.ship.shipping` frames them: output-folder check, gated model, atomic folder): export one
    graph (``params.export.opset``, ``dynamo``, ``optimize``); write the metadata; ``onnx.checker`` (full
    check); optional INT8 / fp16 variants; run torch and ORT over the test split; check max-abs logit difference
    and top-1 agreement against ``params.export.parity`` and each variant's top-1 drop against
    ``params.export.max_accuracy_drop``; write ``export.json``; move the folder into place.

    Args:
        params: validated params (sections backbone, transforms, model, export; data for the test split).

    Returns:
        :class:`ExportResult`.

    Raises:
        GateNotPassed: no passed gate verdict for this checkpoint (:func:`lpt.ship.check_gate_verdict`).
        ParityFailed: the parity gate or a variant's accuracy check failed (the message names the
            measured numbers and the thresholds).
        ExportError: the checker failed or the trained model cannot be loaded.
        OutputDirError: ``export.out_dir`` is ``.``, a repository root, ... or holds files that are not an
            export's (it is replaced whole). In every case nothing is written to ``export.out_dir``.
    """
    cfg = params.export
    out_dir = Path(cfg.out_dir)
    notes: list[str] = []
    with shipping(params, out_dir, what="export.out_dir", own=_OWN, label="export", error=ExportError) as ship:
        model, size = ship.model, ship.transforms.input_size
        doc = (f"LPT ({model.method}) inference: image [B,3,{size},{size}] normalised -> logits (cosine)"
               + (" + selected (group prompts)" if model.phase == 2 else "") + ". See metadata_props.")
        fp32 = export_onnx(model, ship.folder / MODEL_FILE, opset=cfg.opset, dynamo=cfg.dynamo,
                           input_size=size, optimize=cfg.optimize)
        meta = build_metadata(params, model, ship.class_names, ship.checkpoint, dynamo=cfg.dynamo,
                              transforms=ship.transforms)
        write_metadata(fp32, meta, doc)
        check_graph(fp32)
        files = _variants(fp32, ship.folder, params, meta, doc, notes)
        threads = torch.get_num_threads()
        sessions = {k: ort_session(p, threads) for k, p in files.items()}
        stats = compare_on_test(model, {k: ort_runner(v) for k, v in sessions.items()}, params, ship.transforms)
        failures = parity_failures(stats["fp32"], params, "ORT-vs-torch") + _variant_drops(stats, cfg.max_accuracy_drop)
        raw = _raw_graph(fp32, ship.folder, ship.transforms) if cfg.raw else None
        if raw is not None:
            raw_session = ort_session(raw, threads)
            stats["raw"] = compare_raw_on_test({"raw": (ort_runner(sessions["fp32"]),
                                                        lambda px: raw_session.run(None, {RAW_INPUT_NAME: px}))},
                                               params, ship.transforms)["raw"]
            failures += raw_failures(stats["raw"], params, "model.raw.onnx-vs-Python-preprocessing")
        raise_parity_failures(failures, "export", stats["num_images"])
        if raw is not None and cfg.triton.enabled:
            write_triton_repository(ship.folder / TRITON_DIR, raw, cfg.triton.name, cfg.triton.max_batch_size,
                                    ship.class_names)
        write_json_atomic(ship.folder / REPORT_FILE, _report(params, model, meta, stats, files, notes, raw))
    fp = stats["fp32"]
    return ExportResult(
        model_path=out_dir / MODEL_FILE, report_path=out_dir / REPORT_FILE,
        max_abs_diff=fp["max_abs_diff"], top1_agreement=fp["top1_agreement"], num_images=stats["num_images"],
        torch_correct=stats["torch_correct"], ort_correct=fp["correct"],
        variants={k: out_dir / p.name for k, p in files.items()}, notes=notes,
    )


def result_summary(result: ExportResult) -> str:
    """One-paragraph text for the CLI."""
    lines = [f"onnx: {result.model_path}",
             f"parity on {result.num_images} test images: max |Δlogit| {result.max_abs_diff:.2e}, "
             f"top-1 agreement {result.top1_agreement:.4f}, correct torch {result.torch_correct} / "
             f"ORT {result.ort_correct}"]
    lines += [f"{k}: {p}" for k, p in result.variants.items() if k != "fp32"]
    lines += result.notes
    return "\n".join(lines)

