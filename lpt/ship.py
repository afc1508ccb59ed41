"""Shipping a trained model: the steps ``lpt export`` and ``lpt pack`` share, in one place.

Both stages do the same thing around their own files::

    check the output folder ─► load the final checkpoint ─► refuse it without a passed gate verdict of its own
      ─► trace one ONNX graph (task tensors as constants, or as graph inputs) ─► metadata ─► onnx.checker
      ─► compare a torch-free consumer with torch over the test split ─► parity gate ─► publish the folder

:func:`shipping` is that frame (output-folder check, gated model, atomic folder); :func:`trace_graph` the one
trace (:class:`InferenceGraph` with or without task inputs, the export-time rewrites, folding);
:func:`compare_on_test` and :func:`parity_failures` the parity check. ``lpt.export`` and ``lpt.pack`` are a
short function each on top of these.

Example:
    >>> from lpt.ship import shipping, trace_graph
    >>> with shipping(params, "models/export", what="export.out_dir", own=("model.onnx",),
    ...               label="export", error=ExportError) as ship:
    ...     trace_graph(ship.model, ship.folder / "model.onnx", input_size=ship.transforms.input_size)
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpt.config import Params
from lpt.model.backbone import BackboneError, ResolvedTransforms, resolve_transforms
from lpt.model.lpt import CheckpointError, LPTModel, load_trained_model
from lpt.runtime import INPUT_NAME, LOGITS_NAME, SELECTED_NAME
from lpt.utils import atomic_dir, check_output_dir, seed_everything

__all__ = [
    "ExportError",
    "GateNotPassed",
    "ParityFailed",
    "GatedModel",
    "load_gated_model",
    "check_gate_verdict",
    "shipping",
    "InferenceGraph",
    "ClsOnlyBlock",
    "export_rewrites",
    "optimize_graph",
    "trace_graph",
    "write_metadata",
    "check_graph",
    "ort_session",
    "Runner",
    "ort_runner",
    "parity_sample",
    "compare_on_test",
    "parity_failures",
    "raise_parity_failures",
    "compare_raw_on_test",
    "raw_failures",
]


class ExportError(RuntimeError):
    """Shipping failed (checker, parity or accuracy gate); the message names the figures and thresholds."""


class GateNotPassed(ExportError):
    """The checkpoint has no passed quality-gate verdict: nothing is shipped."""


class ParityFailed(ExportError):
    """The torch-free consumer disagrees with torch beyond ``export.parity`` (or a variant loses too much accuracy)."""


# ------------------------------------------------------------------------------------ the gated model
@dataclass
class GatedModel:
    """The trained model a stage ships, with everything about it the stage writes down.

    Attributes:
        model: the final trained model (eval mode, CPU).
        checkpoint: its ``model.json``.
        verdict: its passed gate verdict (``gate.json``).
        transforms: the preprocessing actually used (``params.transforms``, nulls filled from the model).
        class_names: from the data manifest, one per class of the model.
        folder: the temp folder the stage writes into (moved into place when the stage succeeds).
    """

    model: LPTModel
    checkpoint: dict[str, Any]
    verdict: dict[str, Any]
    transforms: ResolvedTransforms
    class_names: list[str]
    folder: Path


def check_gate_verdict(params: Params, checkpoint_sha256: str) -> dict[str, Any]:
    """The evaluated gate verdict must exist, have passed, be about this very checkpoint and have been judged
    under the thresholds in force (:func:`lpt.gate.gate_refusal`).

    Raises:
        GateNotPassed: missing or damaged ``gate.json``, a failed verdict, one for another checkpoint, or one
            judged under other thresholds (the message names each changed threshold, old -> new).
    """
    from lpt.gate import gate_refusal

    verdict, reason = gate_refusal(params, checkpoint_sha256)
    if reason is not None:
        raise GateNotPassed(reason)
    assert verdict is not None
    return verdict


def _manifest_class_names(params: Params, num_classes: int) -> list[str]:
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
    """The trained model to ship (eval mode, CPU), its ``model.json``, its passed gate verdict and its preprocessing.

    Sets ``train.threads``, seeds (``backbone.weights=none`` rebuilds the same random backbone as training),
    loads the checkpoint, checks the gate verdict for exactly these weights and fills ``params.transforms``'
    nulls from the model.

    Args:
        params: validated params.
        error: the caller's error class for a model that cannot be loaded or transforms that do not fit.

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


@contextlib.contextmanager
def shipping(params: Params, out_dir: str | Path, *, what: str, own: Collection[str], label: str,
             error: type[Exception]) -> Iterator[GatedModel]:
    """The frame of a shipping stage: yield the gated model and a temp folder; publish the folder on success.

    The output folder is checked before any work (a refusal costs nothing), then the model is loaded and
    its gate verdict checked (:func:`load_gated_model`); the stage writes into :attr:`GatedModel.folder`,
    which replaces ``out_dir`` whole only when the ``with`` body returns (:func:`lpt.utils.atomic_dir`): a
    failed stage writes nothing and leaves the previous output as it was.

    Args:
        params: validated params.
        out_dir: the stage's output folder.
        what: how messages name it (``export.out_dir``).
        own: the top-level entries the stage writes there (names or ``fnmatch`` patterns); a folder holding
            anything else is never replaced (:func:`lpt.utils.check_output_dir`).
        label: the stage's name in the closing ``[label] done in … s`` line.
        error: the stage's error class (a model that cannot be loaded, class names that do not fit).

    Raises:
        OutputDirError: ``out_dir`` is refused; GateNotPassed, ``error``: as :func:`load_gated_model`.
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, what, own)  # before any work: a refusal costs nothing
    started = time.time()
    model, ckpt, verdict, transforms = load_gated_model(params, error)
    class_names = _manifest_class_names(params, model.num_classes)
    with atomic_dir(out_dir, what, own) as tmp:
        yield GatedModel(model=model, checkpoint=ckpt, verdict=verdict, transforms=transforms,
                         class_names=class_names, folder=tmp)
    print(f"[{label}] done in {time.time() - started:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------- graph
@contextlib.contextmanager
def _task_tensors(model: LPTModel, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Let ``model`` compute with ``tensors`` (keyed by parameter path) in place of its own parameters.

    The tracer then records every use of such a tensor as a use of the graph input it was given, so the
    exported graph takes the task as inputs. (``torch.func.functional_call`` does the same swap but
    refuses to run under the tracer.)
    """
    saved = []
    try:
        for path, value in tensors.items():
            owner_name, _, attr = path.rpartition(".")
            owner = model.get_submodule(owner_name)
            saved.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = value  # a plain tensor where the Parameter was
        yield
    finally:
        for owner, attr, param in reversed(saved):
            owner._parameters[attr] = param


class InferenceGraph(torch.nn.Module):
    """Eval-mode LPT inference with tensor outputs only: ``(logits, selected)`` or ``(logits,)``.

    ``forward(image, *task)``: with ``task_inputs`` the listed trained tensors are forward arguments in that
    order (the pack's backbone graph), without them they are the model's own (the single-task export).

    Args:
        model: a trained :class:`~lpt.model.lpt.LPTModel`.
        task_inputs: graph-input name -> the model's parameter path it stands for, in input order.
        two_pass: run :meth:`~lpt.model.lpt.LPTModel.forward_two_pass` (no block reuse; the benchmark's
            reference) instead of the block-reuse forward.
    """

    def __init__(self, model: LPTModel, task_inputs: Mapping[str, str] | None = None, two_pass: bool = False) -> None:
        super().__init__()
        self.model = model
        self.task_inputs = dict(task_inputs or {})
        self.two_pass = two_pass
        self.has_selected = model.group_pool is not None and model.phase == 2
        self.eval()

    def forward(self, image: torch.Tensor, *task: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[B, 3, S, S] normalised (+ the task tensors) -> logits [B, C] and, in phase 2, selected [B, k] int64."""
        swap = dict(zip(self.task_inputs.values(), task, strict=True))
        with _task_tensors(self.model, swap):
            out = self.model.forward_two_pass(image) if self.two_pass else self.model(image)
        return (out.logits, out.selected) if self.has_selected else (out.logits,)


class ClsOnlyBlock(torch.nn.Module):
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


@contextlib.contextmanager
def export_rewrites(model: LPTModel, enabled: bool) -> Iterator[dict[str, Any]]:
    """Export-time graph rewrites of the frozen backbone (``export.optimize``), undone on exit.

    - explicit attention (``fused_attn = False``): ``q·scale @ kᵀ → softmax → @ v`` with a constant scale
      instead of ``scaled_dot_product_attention``, whose TorchScript export computes the scale from the
      runtime shape (Shape/Slice/Cast/Sqrt/Div per block that no optimizer can fold);
    - the last block computes only the rows the feature reads (:class:`ClsOnlyBlock`), where the family
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
                blocks[-1] = ClsOnlyBlock(last, rows)
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


def trace_graph(model: LPTModel, path: str | Path, *, task: Mapping[str, tuple[str, torch.Tensor]] | None = None,
                dynamic_axes: Mapping[str, dict[int, str]] | None = None, opset: int = 18, dynamo: bool = False,
                two_pass: bool = False, input_size: int | None = None, optimize: bool = False) -> Path:
    """Trace the whole LPT inference of ``model`` into one self-contained ONNX file (the one exporter).

    Input ``image`` float32 ``[batch, 3, S, S]`` (normalised), then the ``task`` graph inputs if any;
    outputs ``logits`` float32 ``[batch, C]`` (raw cosine) and, for two-phase LPT, ``selected`` int64
    ``[batch, k]`` (the group prompts used).

    Args:
        model: the trained model (left in eval mode).
        path: destination ``.onnx`` (single file, no external data).
        task: graph-input name -> (the model's parameter path it replaces, an example value), in input order;
            ``None``: the trained tensors are constants of the graph.
        dynamic_axes: graph name -> its dynamic axes; default the batch axis of every input and output.
        opset: ONNX opset (>= 17).
        dynamo: use the ``torch.export``-based exporter (batch axis only; no ``task``) instead of the (faster)
            TorchScript one.
        two_pass: trace the no-reuse reference forward (benchmarks only).
        input_size: image side; default from the backbone's ``patch_embed.img_size``.
        optimize: apply :func:`export_rewrites` (explicit attention, CLS-only last block) and fold the graph
            with :func:`optimize_graph` (``export.optimize``); same outputs within float tolerance, fewer FLOPs
            and nodes. A two-pass graph is folded without common-subexpression elimination.

    Returns:
        ``path``.
    """
    path = Path(path)
    task = dict(task or {})
    wrapper = InferenceGraph(model.eval(), {name: param for name, (param, _) in task.items()}, two_pass)
    if input_size is None:
        input_size = int(model.backbone.patch_embed.img_size[0])
    example = (torch.randn(2, 3, input_size, input_size), *(value for _, value in task.values()))
    inputs = [INPUT_NAME, *task]
    outputs = [LOGITS_NAME] + ([SELECTED_NAME] if wrapper.has_selected else [])
    axes = dict(dynamic_axes) if dynamic_axes is not None else {name: {0: "batch"} for name in [*inputs, *outputs]}
    with warnings.catch_warnings(), torch.no_grad(), export_rewrites(model, optimize):
        warnings.simplefilter("ignore")  # tracer / deprecation chatter about frozen python ints
        if dynamo:
            if task:
                raise ValueError("trace_graph: the dynamo exporter takes no task inputs")
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(wrapper, example, str(path), dynamo=True, external_data=False,
                              input_names=inputs, output_names=outputs, opset_version=opset,
                              dynamic_shapes={"image": {0: batch}}, verbose=False)
        else:
            torch.onnx.export(wrapper, example, str(path), dynamo=False, input_names=inputs,
                              output_names=outputs, opset_version=opset, do_constant_folding=True,
                              dynamic_axes={name: dict(axes[name]) for name in [*inputs, *outputs]})
    model.eval()  # the exporter restores the wrapper's mode; make sure dropout stays off afterwards
    if optimize:  # note: with explicit attention torch's exporter already merges a two-pass graph's
        optimize_graph(path, cse=not two_pass)  # duplicated blocks (its JIT CSE); bench exports it unoptimized
    return path


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


def check_graph(path: Path) -> None:
    """``onnx.checker`` (full check) on a written graph.

    Raises:
        ExportError: the checker rejected it (names the file and the checker's reason).
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path.name}: onnx.checker rejected the graph: {err}") from None


# ------------------------------------------------------------------------------------------ parity
Runner = Callable[[np.ndarray], Sequence[Any]]
"""A torch-free consumer under test: normalised images ``[b, 3, S, S]`` -> ``(logits [b, C], selected [b, k] or None)``."""


def ort_session(path: Path, threads: int) -> Any:
    """A CPU ONNX Runtime session for ``path`` (``threads`` intra-op threads; 0 = ORT's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session: Any) -> Runner:
    """The consumer that feeds a graph's ``image`` input and returns its outputs in graph order."""
    return lambda images: session.run(None, {INPUT_NAME: images})


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


def compare_on_test(model: LPTModel, runners: Mapping[str, Runner], params: Params,
                    transforms: ResolvedTransforms) -> dict[str, Any]:
    """Run torch and every consumer over the test split (or its ``export.parity.max_images`` sample).

    Returns:
        ``num_images``, ``test_images``, ``classes``, ``torch_correct``, ``torch_accuracy`` and, per
        consumer, ``max_abs_diff`` (logits), ``top1_agreement`` with torch, ``correct``, ``accuracy`` and
        ``prompt_agreement`` (selected group prompts equal as sets; ``None`` without a group pool).
    """
    from lpt.data.reader import ShardImages, build_transform

    dataset = ShardImages(Path(params.data.out_dir), "test")
    transform = build_transform(transforms, train=False)
    if len(dataset) == 0:
        raise ExportError(f"{params.data.out_dir}: the test split is empty; nothing to check parity on")
    sample = parity_sample(dataset.labels, params.export.parity.max_images, params.seed)
    n = len(sample)
    batch_size = params.evaluate.batch_size
    labels = np.asarray(dataset.labels, dtype=np.int64)[sample]
    preds = {name: np.empty(n, np.int64) for name in ["torch", *runners]}
    max_diff = {name: 0.0 for name in runners}
    prompts_same = {name: 0 for name in runners}
    has_selected = model.phase == 2
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            x = torch.stack([transform(dataset[int(sample[i])][0]) for i in idx])  # [b, 3, S, S]
            out = model(x)
            ref = out.logits.float().numpy()
            preds["torch"][start:start + len(idx)] = ref.argmax(1)
            for name, run in runners.items():
                got = run(x.numpy())
                logits = got[0].astype(np.float32)
                max_diff[name] = max(max_diff[name], float(np.abs(logits - ref).max()))
                preds[name][start:start + len(idx)] = logits.argmax(1)
                if has_selected:  # order of equal-score keys may differ: compare as sets
                    same = np.sort(got[1], 1) == np.sort(out.selected.numpy(), 1)
                    prompts_same[name] += int(same.all(1).sum())
    stats: dict[str, Any] = {"num_images": n, "test_images": len(dataset), "classes": int(len(np.unique(labels))),
                             "torch_correct": int((preds["torch"] == labels).sum())}
    for name in runners:
        stats[name] = {
            "max_abs_diff": max_diff[name],
            "top1_agreement": float((preds[name] == preds["torch"]).mean()),
            "correct": int((preds[name] == labels).sum()),
            "accuracy": float((preds[name] == labels).mean()),
            "prompt_agreement": prompts_same[name] / n if has_selected else None,
        }
    stats["torch_accuracy"] = stats["torch_correct"] / n
    return stats


def parity_failures(figures: Mapping[str, Any], params: Params, who: str) -> list[str]:
    """The ``export.parity`` thresholds ``figures`` (one consumer's :func:`compare_on_test` entry) misses.

    Args:
        figures: ``max_abs_diff`` and ``top1_agreement`` of one consumer.
        params: reads ``export.parity``.
        who: how the lines name the comparison (``ORT-vs-torch``).

    Returns:
        One line per missed threshold, naming the figure and the threshold; empty when both hold.
    """
    parity = params.export.parity
    failures = []
    if not figures["max_abs_diff"] <= parity.max_abs_diff:
        failures.append(f"{who} max abs logit diff {figures['max_abs_diff']:.3g} > "
                        f"export.parity.max_abs_diff {parity.max_abs_diff:g}")
    if not figures["top1_agreement"] >= parity.min_agreement:
        failures.append(f"{who} top-1 agreement {figures['top1_agreement']:.4f} < "
                        f"export.parity.min_agreement {parity.min_agreement:g}")
    return failures


def raise_parity_failures(failures: Sequence[str], label: str, num_images: int) -> None:
    """Raise :class:`ParityFailed` listing ``failures`` (nothing when there are none).

    Args:
        failures: the missed thresholds, one line each.
        label: the stage (``export``, ``pack``).
        num_images: the test images compared.
    """
    if failures:
        raise ParityFailed(f"{label} parity gate failed on the test split ({num_images} images); nothing written:\n"
                           + "\n".join(f"  - {f}" for f in failures))


def compare_raw_on_test(pairs: Mapping[str, tuple[Runner, Runner]], params: Params,
                        transforms: ResolvedTransforms) -> dict[str, Any]:
    """A raw-pixel graph against the Python consumer over the test split (or its parity sample).

    Each pair is ``(reference, raw)``: the reference takes images preprocessed in Python exactly as
    :class:`lpt.runtime.Predictor` does (:func:`lpt.runtime.preprocess_image`), the raw one the decoded uint8 RGB
    pixels ``[b, H, W, 3]`` (images of one size per call).

    Returns:
        Per pair: ``max_abs_diff`` (logits), ``top1_agreement``, ``images``.
    """
    from lpt.data.reader import ShardImages
    from lpt.runtime import Preprocessing, preprocess_image, to_rgb

    dataset = ShardImages(Path(params.data.out_dir), "test")
    if len(dataset) == 0:
        raise ExportError(f"{params.data.out_dir}: the test split is empty; nothing to check parity on")
    sample = parity_sample(dataset.labels, params.export.parity.max_images, params.seed)
    pre = Preprocessing(input_size=transforms.input_size, resize=transforms.resize, mean=tuple(transforms.mean),
                        std=tuple(transforms.std))
    max_diff = {name: 0.0 for name in pairs}
    same = {name: 0 for name in pairs}
    batch_size = params.evaluate.batch_size
    for start in range(0, len(sample), batch_size):
        images = [to_rgb(dataset[int(i)][0]) for i in sample[start:start + batch_size]]
        by_size: dict[tuple[int, int], list[Any]] = {}
        for image in images:
            by_size.setdefault(image.size, []).append(image)
        for group in by_size.values():  # one call per image size: the raw graph takes [b, H, W, 3]
            x = np.stack([preprocess_image(im, pre) for im in group])  # [b, 3, S, S]
            pixels = np.stack([np.asarray(im, dtype=np.uint8) for im in group])  # [b, H, W, 3]
            for name, (reference, raw) in pairs.items():
                ref = np.asarray(reference(x)[0], dtype=np.float32)
                got = np.asarray(raw(pixels)[0], dtype=np.float32)
                max_diff[name] = max(max_diff[name], float(np.abs(got - ref).max()))
                same[name] += int((got.argmax(1) == ref.argmax(1)).sum())
    return {name: {"max_abs_diff": max_diff[name], "top1_agreement": same[name] / len(sample),
                   "images": int(len(sample))} for name in pairs}


def raw_failures(figures: Mapping[str, Any], params: Params, who: str) -> list[str]:
    """The ``export.parity.raw_min_agreement`` threshold ``figures`` (:func:`compare_raw_on_test`) misses, as a line."""
    want = params.export.parity.raw_min_agreement
    if figures["top1_agreement"] >= want:
        return []
    return [f"{who} top-1 agreement {figures['top1_agreement']:.4f} < export.parity.raw_min_agreement {want:g} "
            f"(max |logit difference| {figures['max_abs_diff']:.3g})"]
