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

The output folder (``params.export.out_dir``) is written atomically: everything is built in a temp
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
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpt.config import Params
from lpt.methods import own
from lpt.model.backbone import BackboneError, ResolvedTransforms, resolve_transforms
from lpt.model.lpt import CheckpointError, LPTModel, load_trained_model
# the metadata schema belongs to the torch-free consumer; the exporter writes what it reads
from lpt.runtime import INPUT_NAME, LOGITS_NAME, LPT_FORMAT, REQUIRED_METADATA, SELECTED_NAME
from lpt.utils import atomic_dir, check_output_dir, seed_everything, sha256_file, write_json_atomic

__all__ = [
    "ExportError",
    "GateNotPassed",
    "ParityFailed",
    "ExportResult",
    "MODEL_FILE",
    "REPORT_FILE",
    "LPTInference",
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
INT8_FILE = "model.int8.onnx"
FP16_FILE = "model.fp16.onnx"
REPORT_FILE = "export.json"


class ExportError(RuntimeError):
    """Export failed (checker, parity or accuracy gate); the message names the figures and thresholds."""


class GateNotPassed(ExportError):
    """The checkpoint has no passed quality-gate verdict: nothing is exported."""


class ParityFailed(ExportError):
    """ORT disagrees with torch beyond ``export.parity`` (or a variant loses too much accuracy)."""


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
class LPTInference(torch.nn.Module):
    """Eval-mode LPT inference with tensor outputs only: ``(logits, selected)`` or ``(logits,)``.

    Args:
        model: a trained :class:`~lpt.model.lpt.LPTModel`.
        two_pass: run :meth:`~lpt.model.lpt.LPTModel.forward_two_pass` (no block reuse; the benchmark's
            reference) instead of the block-reuse forward.
    """

    def __init__(self, model: LPTModel, two_pass: bool = False) -> None:
        super().__init__()
        self.model = model
        self.two_pass = two_pass
        self.has_selected = model.phase == 2
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, 3, S, S] normalised -> logits [B, C] (cosine) and, in phase 2, selected [B, k] int64."""
        out = self.model.forward_two_pass(image) if self.two_pass else self.model(image)
        if self.has_selected:
            return out.logits, out.selected
        return (out.logits,)


class _ClsOnlyBlock(torch.nn.Module):
    """A timm ViT ``Block`` that returns only the first ``rows`` rows ``[B, rows, D]`` of its output
    (export-time only).

    Where the family's feature reads only the leading rows of the last block's output (the CLS row of a
    token-pooled ViT; CLS + distillation rows of a distilled DeiT: :meth:`BackboneFamily.feature_rows`),
    and everything after attention is row-wise, the other rows are dead compute: K and V still come from
    every token, but Q, the attention rows, the projection and the MLP run for those rows only (identical
    math; ~17 % fewer FLOPs for L = 6). ``[:, :n]`` on a ``rows``-row output is those rows.
    """

    def __init__(self, block: torch.nn.Module, rows: int = 1) -> None:
        super().__init__()
        self.block = block
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, a, r = self.block, self.block.attn, self.rows
        batch, n, _ = x.shape
        y = b.norm1(x)
        w, bias = a.qkv.weight, a.qkv.bias
        d = a.attn_dim
        q = torch.nn.functional.linear(y[:, :r], w[:d], None if bias is None else bias[:d])  # [B, r, d]
        kv = torch.nn.functional.linear(y, w[d:], None if bias is None else bias[d:])  # [B, N, 2d]
        q = a.q_norm(q.reshape(batch, r, a.num_heads, a.head_dim).transpose(1, 2))  # [B, H, r, hd]
        k, v = kv.reshape(batch, n, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        k = a.k_norm(k)  # [B, H, N, hd]
        attn = ((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, r, N]
        o = a.norm((attn @ v).transpose(1, 2).reshape(batch, r, d))
        h = x[:, :r] + b.ls1(a.proj(o))  # drop_path / dropout are identities in eval
        return h + b.ls2(b.mlp(b.norm2(h)))


def _cls_only_supported(block: torch.nn.Module) -> bool:
    """True for the plain timm ``Block`` / ``Attention`` this rewrite reproduces (else keep the block)."""
    try:
        from timm.models.vision_transformer import Attention, Block
    except ImportError:  # pragma: no cover - timm is a dependency of the backbone
        return False
    attn = getattr(block, "attn", None)
    return (type(block) is Block and type(attn) is Attention and getattr(attn, "gate", None) is None
            and all(hasattr(attn, k) for k in ("attn_dim", "head_dim", "num_heads", "scale", "q_norm", "k_norm")))


@contextmanager
def _export_rewrites(model: LPTModel, enabled: bool) -> Iterator[dict[str, Any]]:
    """Export-time graph rewrites of the frozen backbone (``export.optimize``), undone on exit.

    - explicit attention (``fused_attn = False``): ``q·scale @ kᵀ → softmax → @ v`` with a constant scale
      instead of ``scaled_dot_product_attention``, whose TorchScript export computes the scale from the
      runtime shape (Shape/Slice/Cast/Sqrt/Div per block that no optimizer can fold);
    - the last block computes only the rows the feature reads (:class:`_ClsOnlyBlock`), where the family
      says the feature reads leading rows only (:meth:`lpt.model.families.BackboneFamily.feature_rows`: the
      CLS row of a token-pooled ViT, CLS + distillation of a distilled DeiT; never an avg / map pool) and the
      block is a plain timm ``Block``.

    Yields what was applied (recorded in ``export.json``).
    """
    blocks = model.backbone.blocks
    applied: dict[str, Any] = {"explicit_attention": False, "cls_only_last_block": False}
    saved_fused = [(blk.attn, blk.attn.fused_attn) for blk in blocks if hasattr(getattr(blk, "attn", None), "fused_attn")]
    last = blocks[-1]
    try:
        if enabled:
            for attn, _ in saved_fused:
                attn.fused_attn = False
            applied["explicit_attention"] = bool(saved_fused)
            rows = model.family.feature_rows(model.backbone)
            if rows and _cls_only_supported(last):
                blocks[-1] = _ClsOnlyBlock(last, rows)
                applied["cls_only_last_block"] = True
        yield applied
    finally:
        blocks[-1] = last
        for attn, fused in saved_fused:
            attn.fused_attn = fused


def optimize_graph(path: Path, cse: bool = True) -> bool:
    """Fold constants / shape arithmetic and drop dead nodes in place (``onnxscript.optimizer``).

    Standard ONNX ops only (no ``com.microsoft`` fusions: they measured slower on CPU for this model and
    would tie the file to onnxruntime), so ``onnx.checker`` still applies. ``cse=False`` skips
    common-subexpression elimination (it would merge the duplicated blocks of the two-pass reference
    graph, i.e. do the block reuse). Returns False when onnxscript is not installed (graph left as is).
    """
    try:
        import onnx_ir as ir
        from onnxscript import optimizer
    except ImportError:
        return False
    model = ir.load(str(path))
    if cse:
        optimizer.optimize(model)
    else:
        optimizer.fold_constants(model)
        optimizer.remove_unused_nodes(model)
    ir.save(model, str(path))
    return True


def export_onnx(model: LPTModel, path: str | Path, *, opset: int = 18, dynamo: bool = False,
                two_pass: bool = False, input_size: int | None = None, optimize: bool = False) -> Path:
    """Export the whole LPT inference of ``model`` to one self-contained ONNX file.

    Input ``image`` float32 ``[batch, 3, S, S]`` (normalised), outputs ``logits`` float32 ``[batch, C]``
    (raw cosine) and, for two-phase LPT, ``selected`` int64 ``[batch, k]`` (the group prompts used).
    The batch axis is dynamic.

    Args:
        model: the trained model (left in eval mode).
        path: destination ``.onnx`` (single file, no external data).
        opset: ONNX opset (>= 17).
        dynamo: use the ``torch.export``-based exporter instead of the (faster) TorchScript one.
        two_pass: export the no-reuse reference forward (benchmarks only).
        input_size: image side; default from the backbone's ``patch_embed.img_size``.
        optimize: apply the export-time rewrites of :func:`_export_rewrites` (explicit attention, CLS-only
            last block) and fold the graph with :func:`optimize_graph` (``export.optimize``); same
            outputs within float tolerance, fewer FLOPs and nodes.

    Returns:
        ``path``.
    """
    path = Path(path)
    wrapper = LPTInference(model.eval(), two_pass)
    if input_size is None:
        input_size = int(model.backbone.patch_embed.img_size[0])
    example = torch.randn(2, 3, input_size, input_size)
    outputs = [LOGITS_NAME] + ([SELECTED_NAME] if wrapper.has_selected else [])
    with warnings.catch_warnings(), torch.no_grad(), _export_rewrites(model, optimize):
        warnings.simplefilter("ignore")  # tracer / deprecation chatter about frozen python ints
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(wrapper, (example,), str(path), dynamo=True, external_data=False,
                              input_names=[INPUT_NAME], output_names=outputs, opset_version=opset,
                              dynamic_shapes={"image": {0: batch}}, verbose=False)
        else:
            torch.onnx.export(wrapper, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=outputs, opset_version=opset, do_constant_folding=True,
                              dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]})
    model.eval()  # the exporter restores the wrapper's mode; make sure dropout stays off afterwards
    if optimize:  # note: with explicit attention torch's exporter already merges a two-pass graph's
        optimize_graph(path, cse=not two_pass)  # duplicated blocks (its JIT CSE); bench exports it unoptimized
    return path


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


def write_metadata(path: str | Path, metadata: dict[str, str], doc: str | None = None) -> None:
    """Replace the model's ``metadata_props`` (keeping foreign keys not in ``metadata``) and save in place."""
    import onnx

    model = onnx.load(str(path))
    kept = {p.key: p.value for p in model.metadata_props if p.key not in metadata}
    del model.metadata_props[:]
    for key, value in {**kept, **metadata}.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "lpt"
    if doc:
        model.doc_string = doc
    onnx.save(model, str(path))


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path.name}: onnx.checker rejected the graph: {err}") from None


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


# ------------------------------------------------------------------------------------------ parity
def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity_sample(labels: np.ndarray, max_images: int | None, seed: int) -> np.ndarray:
    """Indices of the test images the parity check runs on: all of them, or a class-stratified sample.

    Each class's images are taken in a seeded random order, one per class per round (the classes of a
    round also in a seeded order), so the first ``C`` images cover every class once before any class
    gets a second, and a cap below ``C`` takes one image of ``max_images`` different classes.

    Args:
        labels: test labels.
        max_images: the cap (``export.parity.max_images``); None = every image.
        seed: ``params.seed``.

    Returns:
        Sorted int64 indices into the test split.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if max_images is None or max_images >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng([seed, 5])  # its own stream: the sample does not depend on anything else
    order = rng.permutation(len(labels))  # images in random order ...
    order = order[np.argsort(labels[order], kind="stable")]  # ... grouped by class
    cls = labels[order]
    starts = np.r_[0, np.flatnonzero(np.diff(cls)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))  # position in its class
    class_key = rng.permutation(int(cls.max()) + 1)[cls]  # classes in random order within a round
    pick = order[np.lexsort((class_key, rank))[:max_images]]  # round by round
    return np.sort(pick)


def _compare_on_test(model: LPTModel, sessions: dict[str, Any], params: Params,
                     transforms: ResolvedTransforms) -> dict[str, Any]:
    """Run torch and every ORT session over the test split (or its ``export.parity.max_images`` sample);
    logits, top-1 and prompt agreement."""
    from lpt.data.reader import ShardImages, build_transform

    dataset = ShardImages(Path(params.data.out_dir), "test")
    transform = build_transform(transforms, train=False)
    if len(dataset) == 0:
        raise ExportError(f"{params.data.out_dir}: the test split is empty; nothing to check parity on")
    sample = parity_sample(dataset.labels, params.export.parity.max_images, params.seed)
    n = len(sample)
    batch_size = params.evaluate.batch_size
    labels = np.asarray(dataset.labels, dtype=np.int64)[sample]
    preds = {name: np.empty(n, np.int64) for name in ["torch", *sessions]}
    max_diff = {name: 0.0 for name in sessions}
    prompts_same = {name: 0 for name in sessions}
    has_selected = model.phase == 2
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            x = torch.stack([transform(dataset[int(sample[i])][0]) for i in idx])  # [b, 3, S, S]
            out = model(x)
            ref = out.logits.float().numpy()
            preds["torch"][start:start + len(idx)] = ref.argmax(1)
            for name, sess in sessions.items():
                got = sess.run(None, {INPUT_NAME: x.numpy()})
                logits = got[0].astype(np.float32)
                max_diff[name] = max(max_diff[name], float(np.abs(logits - ref).max()))
                preds[name][start:start + len(idx)] = logits.argmax(1)
                if has_selected:  # order of equal-score keys may differ: compare as sets
                    same = np.sort(got[1], 1) == np.sort(out.selected.numpy(), 1)
                    prompts_same[name] += int(same.all(1).sum())
    stats: dict[str, Any] = {"num_images": n, "test_images": len(dataset), "classes": int(len(np.unique(labels))),
                             "torch_correct": int((preds["torch"] == labels).sum())}
    for name in sessions:
        stats[name] = {
            "max_abs_diff": max_diff[name],
            "top1_agreement": float((preds[name] == preds["torch"]).mean()),
            "correct": int((preds[name] == labels).sum()),
            "accuracy": float((preds[name] == labels).mean()),
            "prompt_agreement": prompts_same[name] / n if has_selected else None,
        }
    stats["torch_accuracy"] = stats["torch_correct"] / n
    return stats


# ---------------------------------------------------------------------------------------------- run
_OUTPUT = {"what": "export.out_dir", "own": (MODEL_FILE, INT8_FILE, FP16_FILE, REPORT_FILE)}
"""What ``export.out_dir`` holds: a folder with anything else is never replaced (:func:`lpt.utils.check_output_dir`)."""


def check_gate_verdict(params: Params, checkpoint_sha256: str) -> dict[str, Any]:
    """The evaluated gate verdict must exist, have passed, be about this very checkpoint and have been judged
    under the thresholds in force (``evaluate.gate``: stricter or looser ones need a new verdict).

    Raises:
        GateNotPassed: missing or damaged ``gate.json``, a failed verdict, one for another checkpoint, or one
            judged under other thresholds (the message names each changed threshold, old -> new).
    """
    from lpt.gate import GATE_FILE, read_gate_verdict, threshold_changes
    from lpt.utils import JsonFileError

    path = Path(params.evaluate.out_dir) / GATE_FILE
    try:
        verdict = read_gate_verdict(params.evaluate.out_dir)
    except JsonFileError as err:
        raise GateNotPassed(f"{err}: run `lpt evaluate` (dvc stage evaluate) first; export only ships a model "
                            "that passed the quality gate") from None
    if verdict.get("checkpoint_sha256") != checkpoint_sha256:
        raise GateNotPassed(f"{path} judged checkpoint {str(verdict.get('checkpoint_sha256'))[:12]}…, not the one "
                            f"being exported ({checkpoint_sha256[:12]}…): run `lpt evaluate` on it first")
    changes = threshold_changes(verdict, params)
    if changes:
        raise GateNotPassed(f"{path} was judged under other gate thresholds than evaluate.gate sets now "
                            f"({'; '.join(changes)}): re-run `lpt evaluate` (dvc stage evaluate) to judge the "
                            "checkpoint under them")
    if verdict.get("passed") is not True:
        failures = "; ".join(str(f) for f in verdict.get("failures") or []) or "no reason recorded"
        raise GateNotPassed(f"{path}: the quality gate failed for this checkpoint ({failures}); nothing exported")
    return verdict


def _class_names(params: Params, num_classes: int) -> list[str]:
    from lpt.data.reader import load_manifest

    try:
        names = list(load_manifest(params.data.out_dir).get("class_names") or [])
    except FileNotFoundError:
        names = []
    if len(names) != num_classes:
        raise ExportError(f"{params.data.out_dir}/manifest.json: {len(names)} class names for a model with {num_classes} "
                          "classes; re-run ingest (the manifest must match the trained model)")
    return [str(n) for n in names]



def load_gated_model(params: Params, error: type[Exception]
                     ) -> tuple[LPTModel, dict[str, Any], dict[str, Any], ResolvedTransforms]:
    """The trained model to ship (eval mode, CPU), its passed gate verdict and its resolved preprocessing.

    Shared by ``lpt export`` and ``lpt pack``: sets ``train.threads``, seeds (``backbone.weights=none``
    rebuilds the same random backbone as training), loads the checkpoint, checks the gate verdict for
    exactly these weights and fills ``params.transforms``' nulls from the model.

    Args:
        params: validated params.
        error: the caller's error class for a model that cannot be loaded or transforms that do not fit.

    Returns:
        ``(model, checkpoint model.json, gate verdict, transforms)``.

    Raises:
        GateNotPassed: no passed gate verdict for this checkpoint (:func:`check_gate_verdict`).
        error: the model cannot be loaded, or its transforms cannot be resolved.
    """
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    seed_everything(params.seed)
    try:
        model, ckpt = load_trained_model(params, device="cpu")
    except (CheckpointError, BackboneError) as err:
        raise error(f"cannot load the trained model: {err}") from None
    model.eval()
    verdict = check_gate_verdict(params, ckpt["weights_sha256"])
    try:  # the preprocessing actually used: params.transforms, nulls filled from the model
        transforms = resolve_transforms(params.transforms, model.backbone)
    except BackboneError as err:
        raise error(str(err)) from None
    return model, ckpt, verdict, transforms


def run_export(params: Params) -> ExportResult:
    """Export the final trained model to ONNX and gate it on parity (the ``lpt export`` stage).

    Steps: load the trained model (:func:`lpt.model.lpt.load_trained_model`); export one graph
    (``params.export.opset``, ``dynamo``, ``optimize``); write the metadata; ``onnx.checker`` (full check); optional
    INT8 / fp16 variants; run torch and ORT over the test split; check max-abs logit difference and
    top-1 agreement against ``params.export.parity`` and each variant's top-1 drop against
    ``params.export.max_accuracy_drop``; write ``export.json``; move the folder into place.

    Args:
        params: validated params (sections backbone, transforms, model, export; data for the test split).

    Returns:
        :class:`ExportResult`.

    Raises:
        GateNotPassed: no passed gate verdict for this checkpoint (:func:`check_gate_verdict`).
        ParityFailed: the parity gate or a variant's accuracy check failed (the message names the
            measured numbers and the thresholds).
        ExportError: the checker failed or the trained model cannot be loaded.
        OutputDirError: ``export.out_dir`` is ``.``, a repository root, ... or holds files that are not an
            export's (it is replaced whole). In every case nothing is written to ``export.out_dir``.
    """
    cfg = params.export
    out_dir = Path(cfg.out_dir)
    check_output_dir(out_dir, **_OUTPUT)  # before any work: a refusal costs nothing
    started = time.time()
    model, ckpt, _, transforms = load_gated_model(params, ExportError)
    class_names = _class_names(params, model.num_classes)
    notes: list[str] = []
    threads = torch.get_num_threads()
    doc = (f"LPT ({model.method}) inference: image [B,3,{transforms.input_size},"
           f"{transforms.input_size}] normalised -> logits (cosine)"
           + (" + selected (group prompts)" if model.phase == 2 else "") + ". See metadata_props.")

    with atomic_dir(out_dir, **_OUTPUT) as tmp:
        fp32 = export_onnx(model, tmp / MODEL_FILE, opset=cfg.opset, dynamo=cfg.dynamo,
                           input_size=transforms.input_size, optimize=cfg.optimize)
        meta = build_metadata(params, model, class_names, ckpt, dynamo=cfg.dynamo, transforms=transforms)
        write_metadata(fp32, meta, doc)
        _check(fp32)
        files = {"fp32": fp32}
        if cfg.int8:
            files["int8"] = quantize_int8(fp32, tmp / INT8_FILE)
            write_metadata(files["int8"], {**meta, "precision": "int8"}, doc)
        if cfg.fp16:
            try:
                files["fp16"] = convert_fp16(fp32, tmp / FP16_FILE)
                write_metadata(files["fp16"], {**meta, "precision": "fp16"}, doc)
            except ImportError as err:
                notes.append(f"fp16 skipped: onnxruntime.transformers.float16 is not available ({err})")

        stats = _compare_on_test(model, {k: _session(p, threads) for k, p in files.items()}, params, transforms)
        fp = stats["fp32"]
        failures = []
        if not fp["max_abs_diff"] <= cfg.parity.max_abs_diff:
            failures.append(f"ORT-vs-torch max abs logit diff {fp['max_abs_diff']:.3g} > "
                            f"export.parity.max_abs_diff {cfg.parity.max_abs_diff:g}")
        if not fp["top1_agreement"] >= cfg.parity.min_agreement:
            failures.append(f"ORT-vs-torch top-1 agreement {fp['top1_agreement']:.4f} < "
                            f"export.parity.min_agreement {cfg.parity.min_agreement:g}")
        for variant in ("int8", "fp16"):
            if variant in stats:
                drop = fp["accuracy"] - stats[variant]["accuracy"]
                stats[variant]["accuracy_drop"] = drop
                if drop > cfg.max_accuracy_drop:
                    failures.append(f"{variant} top-1 {stats[variant]['accuracy']:.4f} vs fp32 {fp['accuracy']:.4f}: "
                                    f"drop {drop:.4f} > export.max_accuracy_drop {cfg.max_accuracy_drop:g}")
        if failures:
            raise ParityFailed("export parity gate failed on the test split "
                          f"({stats['num_images']} images); nothing written:\n"
                              + "\n".join(f"  - {f}" for f in failures))

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
        write_json_atomic(tmp / REPORT_FILE, report)
    print(f"[export] done in {time.time() - started:.1f} s", flush=True)

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

