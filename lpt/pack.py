"""Task packs: one frozen backbone serves many long-tailed tasks (the ``lpt pack`` stage).

Prompt tuning never changes the backbone: a task is only its shared prompt, group prompts, keys and head.
A **pack** is exactly those tensors (the final model's trainable tensors) in a small safetensors file,
with everything a consumer needs in one JSON header key (class names, preprocessing, the backbone's name
and fingerprint, the geometry a backbone graph must fix, the recipe hash, the evaluated metrics and the
gate verdict). A **backbone graph** is the whole LPT inference of :mod:`lpt.export` with the task tensors
as graph inputs instead of constants::

    image [B,3,S,S] ─┐
    shared_prompt [L,T,D]  group_prompts [P,L-S,T,D]  keys [P,D]  head [C,D]   (graph inputs, one pack)
                     └─► query pass, top-k key matching, prompted pass with block reuse, cosine head
                         ─► logits [B,C], selected [B,k]

so one ONNX Runtime session (one copy of the backbone weights) runs every pack of that backbone: the
runtime feeds each pack's tensors with the image batch (:class:`lpt.runtime.Predictor` with ``packs``).
What changes the graph's structure is fixed per graph (its ``geometry``: method family = which task
tensors exist, depth L, width D, shared-only blocks S, top-k k, input size, LayerNorm eps); T (prompt
length), P (pool size) and C (classes) are dynamic axes, so packs of one backbone may differ in them.

Graph inputs were chosen over shared initializers (one session per task, the backbone weights shared across
sessions with ``SessionOptions.add_external_initializers``) with ``python -m bench.packs``: every session
keeps its own graph, kernels and state, so memory grew by ~8 MB per task even with one shared arena, against
~0.5 MB per task with graph inputs; shared initializers were not faster (docs/export.md, "Task packs").

``run_pack(params)`` (the DVC stage) honours the quality gate like the export (:func:`lpt.export.check_gate_verdict`),
writes ``<pack.out_dir>/<pack.name>.pack``, ``backbone.onnx`` and ``pack.json`` atomically, and gates the pack
on parity: the torch-free consumer (backbone graph + the pack as read back from disk) against the torch
model over the test split, with the ``export.parity`` thresholds.

Example:
    >>> from lpt.config import load_params
    >>> from lpt.pack import run_pack
    >>> result = run_pack(load_params("params.yaml"))
    >>> result.pack_path, result.backbone_path, result.max_abs_diff
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpt.config import Params
from lpt.export import build_metadata
from lpt.model.backbone import ResolvedTransforms
from lpt.model.lpt import LPTModel
from lpt.runtime import (BACKBONE_KIND, INPUT_NAME, LOGITS_NAME, LPT_FORMAT, PACK_FORMAT, PACK_METADATA_KEY,
                         PACK_SUFFIX, SELECTED_NAME, PredictError, Predictor)
from lpt.rawpixels import RAW_INPUT_NAME, write_raw_graph
from lpt.ship import (ExportError, check_graph, compare_on_test, compare_raw_on_test, ort_session, parity_failures,
                      raise_parity_failures, raw_failures, shipping, trace_graph, write_metadata)
from lpt.tensors import dynamic_axes, pack_names, task_inputs
from lpt.utils import atomic_path, read_json, save_safetensors, sha256_file, write_json_atomic

__all__ = [
    "PackError",
    "PackResult",
    "PACK_TENSORS",
    "BACKBONE_GRAPH_FILE",
    "BACKBONE_RAW_FILE",
    "REPORT_FILE",
    "PREPROCESSING_KEYS",
    "pack_tensors",
    "pack_geometry",
    "export_backbone_graph",
    "backbone_graph_metadata",
    "build_pack_metadata",
    "write_pack",
    "run_pack",
    "result_summary",
]

PACK_TENSORS: dict[str, str] = pack_names()
"""Trainable tensor of :class:`~lpt.model.lpt.LPTModel` -> its name in a pack and as a backbone-graph input
(:func:`lpt.tensors.pack_names`: every packable tensor of the spec)."""

BACKBONE_GRAPH_FILE = "backbone.onnx"
BACKBONE_RAW_FILE = "backbone.raw.onnx"
"""The backbone graph with the preprocessing inside (``export.raw``): uint8 RGB pixels + the task tensors in."""
REPORT_FILE = "pack.json"

PREPROCESSING_KEYS: tuple[str, ...] = ("input_size", "resize", "resize_mode", "interpolation", "antialias", "crop",
                                       "color", "pixel_scale", "mean", "std", "layout")
"""The single-task export's preprocessing metadata keys (:func:`lpt.export.build_metadata`) a pack carries."""

class PackError(ExportError):
    """A pack cannot be made (unsupported method, missing inputs, foreign files in ``pack.out_dir``)."""


@dataclass
class PackResult:
    """What :func:`run_pack` produced.

    Attributes:
        pack_path: ``<pack.out_dir>/<pack.name>.pack``.
        backbone_path: ``<pack.out_dir>/backbone.onnx``, the graph every pack of this backbone runs on.
        report_path: ``pack.json`` (parity figures, sizes, sha256s).
        max_abs_diff: consumer-vs-torch max absolute logit difference over the test split.
        top1_agreement: share of test images where the consumer and torch predict the same class.
        num_images: test images compared.
        torch_correct: correct top-1 predictions of the torch model.
        pack_correct: correct top-1 predictions of backbone graph + pack.
        pack_bytes: size of the pack file.
        backbone_bytes: size of the backbone graph.
    """

    pack_path: Path
    backbone_path: Path
    report_path: Path
    max_abs_diff: float
    top1_agreement: float
    num_images: int
    torch_correct: int
    pack_correct: int
    pack_bytes: int
    backbone_bytes: int


# ------------------------------------------------------------------------------------------ tensors
def pack_tensors(model: LPTModel) -> dict[str, torch.Tensor]:
    """The model's trainable tensors under their pack names (:data:`PACK_TENSORS`), float32 CPU copies.

    Raises:
        PackError: the method trains tensors a backbone graph cannot take as inputs (the message names
            the method and the tensors).
    """
    state = model.trainable_state_dict()
    # also a trainable tensor living inside the backbone (an adapter wrapping a block): the graph would bake
    # it in as a constant of the backbone, so no other task could run on that graph
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    names = pack_names()
    unsupported = sorted((set(state) | trainable) - set(names))
    if unsupported:
        raise PackError(f"method {model.method!r} is not supported by task packs: its trainable tensors "
                        f"{unsupported} have no backbone-graph input (supported: {sorted(names)})")
    # graph-input order (the spec's), so the pack, the graph and the geometry list them alike
    order = {name: i for i, name in enumerate(task_inputs())}
    return dict(sorted(((names[k], v.float().contiguous()) for k, v in state.items()),
                       key=lambda kv: order[kv[0]]))


def pack_geometry(model: LPTModel, input_size: int | None = None) -> dict[str, Any]:
    """What a backbone graph fixes and a pack must match (T, P and C are free).

    Returns:
        ``task_inputs`` (graph inputs besides the image, i.e. the method family), ``outputs``, ``depth`` L,
        ``embed_dim`` D, ``shared_blocks`` S and ``top_k`` k (``None`` without a group pool), ``input_size``
        and ``ln_eps`` (the backbone's LayerNorm eps: not in its fingerprint, but in the computation).
    """
    if input_size is None:
        input_size = int(model.backbone.patch_embed.img_size[0])
    two_pass = model.group_pool is not None and model.phase == 2
    eps = {float(m.eps) for m in model.backbone.modules() if isinstance(m, torch.nn.LayerNorm)}
    return {
        "task_inputs": list(pack_tensors(model)),
        "outputs": [LOGITS_NAME, SELECTED_NAME] if two_pass else [LOGITS_NAME],
        "depth": model.depth,
        "embed_dim": model.embed_dim,
        "shared_blocks": model.shared_blocks if two_pass else None,
        "top_k": model.group_pool.top_k if two_pass else None,
        "input_size": int(input_size),
        "ln_eps": eps.pop() if len(eps) == 1 else sorted(eps),
    }


def _canonical_task(model: LPTModel) -> list[torch.Tensor]:
    """Example task tensors of fixed small sizes (T = 2, P = k + 1, C = 3): the traced graph then depends on
    the backbone and the geometry only, so every task of one backbone exports byte-identical graphs."""
    k = model.group_pool.top_k if model.group_pool is not None else 1
    sizes = {**model.symbol_sizes(), "T": 2, "P": k + 1, "C": 3}  # L, D, L-S as the model has them
    gen = torch.Generator().manual_seed(0)
    dims = task_inputs()
    return [torch.randn(*(sizes[d] for d in dims[name]), generator=gen) for name in pack_tensors(model)]


def export_backbone_graph(model: LPTModel, path: str | Path, *, opset: int = 18, optimize: bool = True,
                          input_size: int | None = None) -> Path:
    """Export the LPT inference of ``model``'s backbone and geometry with the task tensors as graph inputs.

    Inputs ``image`` float32 ``[batch, 3, S, S]`` and the task tensors (:func:`pack_geometry`
    ``task_inputs``; dynamic T, P, C); outputs as :func:`lpt.export.export_onnx`. Same export-time
    rewrites and folding as the single-task export (``optimize``); TorchScript exporter; one file
    (:func:`lpt.ship.trace_graph` with the task tensors as graph inputs).

    Args:
        model: a model of the geometry to export (its task values are not used: any pack of the same
            backbone and geometry runs on the graph).
        path: destination ``.onnx``.
        opset: ONNX opset (>= 17).
        optimize: :func:`lpt.ship.export_rewrites` + :func:`lpt.ship.optimize_graph` (``export.optimize``).
        input_size: image side; default the backbone's ``patch_embed.img_size``.

    Returns:
        ``path``.
    """
    by_pack_name = {v: k for k, v in pack_names().items()}
    task = {name: (by_pack_name[name], value)
            for name, value in zip(pack_tensors(model), _canonical_task(model), strict=True)}
    dims = task_inputs()
    axes = {INPUT_NAME: {0: "batch"}, **{name: dynamic_axes(dims[name]) for name in task},
            LOGITS_NAME: {0: "batch", 1: "num_classes"}, SELECTED_NAME: {0: "batch"}}
    return trace_graph(model, path, task=task, dynamic_axes=axes, opset=opset, input_size=input_size,
                       optimize=optimize)


def backbone_graph_metadata(model: LPTModel, checkpoint_meta: dict[str, Any], geometry: dict[str, Any], *,
                            opset: int, optimize: bool) -> dict[str, str]:
    """The backbone graph's ``metadata_props``: what it is, which backbone, which geometry (all strings).

    Nothing task-specific: graphs exported from two tasks of one backbone and geometry are the same file.
    """
    import lpt

    backbone = checkpoint_meta.get("backbone") or {}
    return {
        "lpt_format": str(LPT_FORMAT),
        "lpt_kind": BACKBONE_KIND,
        "lpt_version": lpt.__version__,
        "backbone": str(backbone.get("name") or type(model.backbone).__name__),
        "backbone_fingerprint": model.backbone_fingerprint(),
        "backbone_kwargs": json.dumps(backbone.get("timm_kwargs") or {}, sort_keys=True),
        "geometry": json.dumps(geometry, sort_keys=True),
        "dynamic_axes": json.dumps({"prompt_length": "T", "pool_size": "P", "num_classes": "C"}),
        "outputs": json.dumps({LOGITS_NAME: "raw cosine [B, C]; scores = softmax(the pack's logit_scale * logits)",
                               **({SELECTED_NAME: "group prompt indices [B, top_k]"}
                                  if SELECTED_NAME in geometry["outputs"] else {})}),
        "exporter": "torchscript",
        "optimized": json.dumps(optimize),
        "opset": str(opset),
        "torch_version": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------- packs
def build_pack_metadata(params: Params, model: LPTModel, class_names: list[str], checkpoint_meta: dict[str, Any],
                        metrics: dict[str, Any], verdict: dict[str, Any], geometry: dict[str, Any],
                        transforms: ResolvedTransforms | None = None) -> dict[str, Any]:
    """The pack's JSON metadata (stored under :data:`lpt.runtime.PACK_METADATA_KEY`).

    Args:
        params: reads ``pack.name`` and what :func:`lpt.export.build_metadata` reads (preprocessing, scale).
        model: the trained model.
        class_names: from the data manifest.
        checkpoint_meta: the checkpoint's ``model.json``.
        metrics: the evaluated test metrics (scalars).
        verdict: the passed gate verdict (``gate.json``).
        geometry: :func:`pack_geometry`.
        transforms: the preprocessing actually used (default: ``params.transforms`` resolved on the model).
    """
    import lpt

    export_meta = build_metadata(params, model, class_names, checkpoint_meta, transforms=transforms)
    backbone = checkpoint_meta.get("backbone") or {}
    return {
        "pack_format": PACK_FORMAT,
        "lpt_version": lpt.__version__,
        "name": params.pack.name,
        "method": model.method,
        "phase": model.phase,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "preprocessing": {k: export_meta[k] for k in PREPROCESSING_KEYS},  # strings, as in an export's metadata
        "logit_scale": float(json.loads(export_meta["logit_scale"])),
        "backbone": {"name": export_meta["backbone"], "fingerprint": model.backbone_fingerprint(),
                     "timm_kwargs": backbone.get("timm_kwargs") or {}, "ln_eps": backbone.get("ln_eps")},
        "backbone_graph": BACKBONE_GRAPH_FILE,
        "geometry": geometry,
        "model_config": model.model_config(),
        "recipe_sha256": str(checkpoint_meta.get("recipe_sha256", "")),
        "checkpoint_sha256": str(checkpoint_meta.get("weights_sha256", "")),
        "metrics": metrics,
        "gate": {"passed": verdict.get("passed"), "failures": verdict.get("failures") or [],
                 "thresholds": verdict.get("thresholds")},
    }


def write_pack(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write a pack atomically: safetensors with the JSON metadata as ONE sorted header key.

    Safetensors keeps header metadata in a hash map whose order changes per process; with a single key the
    same pack gives the same bytes on every run (DVC output).

    Returns:
        ``path``.
    """
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    header = {PACK_METADATA_KEY: json.dumps(metadata, sort_keys=True, separators=(",", ":"))}
    with atomic_path(path) as tmp:
        save_safetensors(state, tmp, metadata=header)
    return Path(path)


# ---------------------------------------------------------------------------------------------- run
def _scalar_metrics(params: Params) -> dict[str, Any]:
    """The evaluated test metrics (numbers and booleans only) from ``<evaluate.out_dir>/metrics.json``."""
    from lpt.utils import JsonFileError

    try:
        metrics = read_json(Path(params.evaluate.out_dir) / "metrics.json", "evaluated metrics")
    except JsonFileError as err:
        raise PackError(f"{err}: run `lpt evaluate` (dvc stage evaluate) first") from None
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool)) or v is None}


_OWN = (BACKBONE_GRAPH_FILE, BACKBONE_RAW_FILE, REPORT_FILE, f"*{PACK_SUFFIX}")
"""What ``pack.out_dir`` holds: a folder with anything else is never replaced (:func:`lpt.utils.check_output_dir`)."""


def _consumer(graph: Path, pack: Path) -> Predictor:
    """The torch-free consumer under test: the backbone graph + the pack as read back from disk."""
    try:  # the consumer reads what was written: the check covers the files, not just the tensors in memory
        return Predictor(graph, packs=[pack], providers=["CPUExecutionProvider"],
                         intra_op_num_threads=torch.get_num_threads())
    except PredictError as err:
        raise PackError(f"the written pack does not load in the runtime: {err}") from None


def _raw_parity(graph: Path, folder: Path, consumer: Predictor, params: Params,
                transforms: ResolvedTransforms) -> tuple[Path, dict[str, Any]]:
    """``backbone.raw.onnx`` (the preprocessing inside, :mod:`lpt.rawpixels`) and its parity with the Python
    consumer: the same pack's tensors fed beside decoded pixels."""
    raw = write_raw_graph(graph, folder / BACKBONE_RAW_FILE, transforms.input_size, transforms.resize,
                          tuple(transforms.mean), tuple(transforms.std))
    check_graph(raw)
    session = ort_session(raw, torch.get_num_threads())
    task = consumer.packs[0].tensors  # as read back from the .pack file

    def run_raw(pixels: Any) -> Any:
        return session.run(None, {RAW_INPUT_NAME: pixels, **task})

    pairs = {"raw": (lambda x: consumer.run(x, task=0), run_raw)}
    return raw, compare_raw_on_test(pairs, params, transforms)["raw"]


def _report(params: Params, model: LPTModel, ckpt: dict[str, Any], geometry: dict[str, Any],
            stats: dict[str, Any], files: dict[str, Path]) -> dict[str, Any]:
    """``pack.json``: the geometry, parity figures, test top-1 counts, each file's size and sha256."""
    got = stats["pack"]
    return {
        "pack_format": PACK_FORMAT,
        "name": params.pack.name,
        "method": model.method,
        "phase": model.phase,
        "geometry": geometry,
        "parity": {"max_abs_diff": got["max_abs_diff"], "top1_agreement": got["top1_agreement"],
                   "prompt_agreement": got["prompt_agreement"],
                   "thresholds": params.export.parity.model_dump(mode="json")},
        "test": {"num_images": stats["num_images"], "torch_correct": stats["torch_correct"],
                 "pack_correct": got["correct"], "torch_accuracy": stats["torch_accuracy"],
                 "pack_accuracy": got["accuracy"]},
        "files": {name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for name, p in files.items()},
        **({"raw": {"file": BACKBONE_RAW_FILE, **stats["raw"], "threshold": params.export.parity.raw_min_agreement}}
           if "raw" in stats else {}),
        "backbone_fingerprint": model.backbone_fingerprint(),
        "recipe_sha256": str(ckpt.get("recipe_sha256", "")),
        "checkpoint_sha256": ckpt["weights_sha256"],
    }


def run_pack(params: Params) -> PackResult:
    """Write the task pack of the final trained model and its backbone graph, gated on parity (``lpt pack``).

    Steps (:func:`lpt.ship.shipping` frames them: output-folder check, the model refused without a passed gate
    verdict of its own, atomic folder): export the backbone graph (``export.opset``, ``export.optimize``);
    write ``<pack.name>.pack``; read both back through :class:`lpt.runtime.Predictor` and compare with the
    torch model over the test split (``export.parity`` thresholds); write ``pack.json``; move the folder
    into place.

    Args:
        params: validated params.

    Returns:
        :class:`PackResult`.

    Raises:
        GateNotPassed: no passed gate verdict for this checkpoint.
        ParityFailed: the consumer disagrees with torch beyond ``export.parity`` (names both figures).
        PackError: unsupported method, missing metrics, or the model cannot be loaded.
        OutputDirError: ``pack.out_dir`` is ``.``, a repository root, ... or holds files that are not a
            pack's (it is replaced whole). In every case nothing is written to ``pack.out_dir``.
    """
    out_dir = Path(params.pack.out_dir)
    pack_file = f"{params.pack.name}{PACK_SUFFIX}"
    with shipping(params, out_dir, what="pack.out_dir", own=_OWN, label="pack", error=PackError) as ship:
        model, size = ship.model, ship.transforms.input_size
        tensors = pack_tensors(model)  # refuses an unsupported method before any work
        metrics = _scalar_metrics(params)
        geometry = pack_geometry(model, size)
        graph = export_backbone_graph(model, ship.folder / BACKBONE_GRAPH_FILE, opset=params.export.opset,
                                      optimize=params.export.optimize, input_size=size)
        doc = (f"LPT backbone graph for task packs ({model.backbone_cfg.name if model.backbone_cfg else 'ViT'}): image "
               f"[B,3,{size},{size}] normalised + task tensors {geometry['task_inputs']} -> logits (cosine)"
               + (" + selected (group prompts)" if SELECTED_NAME in geometry["outputs"] else "")
               + ". See metadata_props.")
        write_metadata(graph, backbone_graph_metadata(model, ship.checkpoint, geometry, opset=params.export.opset,
                                                      optimize=params.export.optimize), doc)
        check_graph(graph)
        pack = write_pack(ship.folder / pack_file, tensors,
                          build_pack_metadata(params, model, ship.class_names, ship.checkpoint, metrics, ship.verdict,
                                              geometry, ship.transforms))
        consumer = _consumer(graph, pack)
        try:
            stats = compare_on_test(model, {"pack": lambda x: consumer.run(x, task=0)}, params, ship.transforms)
            failures = parity_failures(stats["pack"], params, "pack-vs-torch")
            files = {pack_file: pack, BACKBONE_GRAPH_FILE: graph}
            if params.export.raw:
                files[BACKBONE_RAW_FILE], stats["raw"] = _raw_parity(graph, ship.folder, consumer, params,
                                                                     ship.transforms)
                failures += raw_failures(stats["raw"], params, "backbone.raw.onnx-vs-Python-preprocessing")
        except PredictError as err:
            raise PackError(f"the written pack does not run in the runtime: {err}") from None
        raise_parity_failures(failures, "pack", stats["num_images"])
        write_json_atomic(ship.folder / REPORT_FILE, _report(params, model, ship.checkpoint, geometry, stats, files))
        sizes = {name: p.stat().st_size for name, p in files.items()}
    got = stats["pack"]
    return PackResult(pack_path=out_dir / pack_file, backbone_path=out_dir / BACKBONE_GRAPH_FILE,
                      report_path=out_dir / REPORT_FILE, max_abs_diff=got["max_abs_diff"],
                      top1_agreement=got["top1_agreement"], num_images=stats["num_images"],
                      torch_correct=stats["torch_correct"], pack_correct=got["correct"],
                      pack_bytes=sizes[pack_file], backbone_bytes=sizes[BACKBONE_GRAPH_FILE])


def result_summary(result: PackResult) -> str:
    """A few lines for the CLI."""
    return "\n".join([
        f"pack: {result.pack_path} ({result.pack_bytes / 1e3:.1f} kB)",
        f"backbone graph: {result.backbone_path} ({result.backbone_bytes / 1e6:.2f} MB; shared by every pack of "
        "this backbone and geometry)",
        f"parity on {result.num_images} test images (backbone graph + pack vs torch): max |Δlogit| "
        f"{result.max_abs_diff:.2e}, top-1 agreement {result.top1_agreement:.4f}, correct torch "
        f"{result.torch_correct} / pack {result.pack_correct}",
    ])
