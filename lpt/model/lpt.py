"""The LPT model: frozen ViT + shared prompt + group prompt pool + cosine head.

Shapes: B batch, N = the model's own tokens (its prefix tokens, e.g. CLS / registers / distillation, then
the patches), L blocks, S shared-only blocks, T prompt tokens, D embed dim, P pool size, k top-k, C classes.

The block loop is the same for every timm ViT family; what differs (embedding, RoPE, the pooled feature)
is the family adapter's (:mod:`lpt.model.families`).

Phase 1 (``lpt``, ``lpt_phase1``, ``vpt_deep``): VPT-deep with replacement. Before block i the layer-i
shared tokens are appended after all the model's tokens, ``[prefix, patches, shared_i]`` ([B, N+T, D]);
after the block the prompt outputs are dropped ([B, N, D]). The feature is the model's own pooling of the
final hidden state (final-norm CLS for a CLS ViT; see the families); dropout; cosine head.

Phase 2 (``lpt`` built with ``phase=2``): a query pass with the shared prompt only gives
q = that feature (no grad); q picks the top-k group prompts by cosine to the keys; their mean is the
sample's group prompt; blocks S..L-1 of the prompted pass see ``[prefix, patches, shared_i, group_i]``.

Block reuse: blocks 0..S-1 are identical in the query pass and the prompted pass (frozen, shared prompt
only, no dropout), so :meth:`LPTModel.forward` computes them once and feeds that hidden state to both the
rest of the query pass and the prompted pass. Their input is a constant for autograd (the backbone and
the shared prompt are frozen in phase 2), so they run under ``no_grad`` and backward never visits them.
:meth:`LPTModel.forward_two_pass` is the straightforward reference (two full passes).

Adapters (``lift``): :func:`lpt.model.adapters.attach_adapters` puts one on every block's residual, beside
the MLP branch and outside its layer scale (LIFT's AdaptFormer placement), through wrappers of the block's
own ``norm2`` / ``ls2`` modules, so the block loop below runs them without knowing; they are trainable in
phase 1.

The eval-mode forward is ONNX-exportable: python control flow depends only on the phase / method,
never on data; selection is ``torch.topk`` + ``index_select``.

Independence of the phases: every component (shared prompt, head, pool) draws its initial values from a
generator of its own, seeded by ``(seed, component name)``, and only a phase-2 model has the pool: which
tensors a model has and trains comes from the spec (:mod:`lpt.tensors`) and the phase it is built for. Phase 1 therefore reads no phase-2 knob (``pool_size``, ``top_k``, ``shared_blocks``,
``block_reuse``), and resizing the pool never changes a phase-1 number.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lpt.config import BackboneConfig, ModelConfig, Params
from lpt.methods import METHODS, get_method, own
from lpt.model.adapters import attach_adapters, default_adapter_dim
from lpt.model.backbone import backbone_fingerprint, build_architecture, create_backbone
from lpt.model.families import family_of
from lpt.model.prompts import GroupPromptPool, SharedPrompt
from lpt.tensors import TrainedTensor, trained_tensors
from lpt.utils import atomic_path, read_json, save_safetensors, sha256_file, write_json_atomic

__all__ = [
    "METHODS",
    "Method",
    "LPTOutput",
    "CosineHead",
    "LPTModel",
    "CheckpointError",
    "create_lpt_model",
    "save_trained_model",
    "load_trained_model",
    "read_trained_tensors",
    "format_parameter_report",
]

Method = str
"""A name of :data:`lpt.methods.METHODS` (the registry is the one list of names)."""
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A trained-model folder is missing, incomplete or does not fit the current backbone."""


class LPTOutput(NamedTuple):
    """What :meth:`LPTModel.forward` returns."""

    logits: torch.Tensor  # [B, C] raw cosine in [-1, 1] (the loss applies margin and scale)
    sim: torch.Tensor  # scalar key-matching term (sum over batch & k of cos(q, key)) / B; 0 in phase 1
    selected: torch.Tensor | None  # [B, k] int64 pool indices in phase 2, else None
    features: torch.Tensor  # [B, D] the family's pooled feature, e.g. final-norm CLS (before head dropout)


def component_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one model component, seeded by ``(seed, name)`` only.

    Each component drawing from its own stream makes its initial values independent of which other
    components exist and of the order they are built in.
    """
    digest = hashlib.sha256(f"lpt/{int(seed)}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class CosineHead(nn.Module):
    """Cosine classifier: L2-normalised feature · L2-normalised class weights, no bias.

    Computed in float32 even under autocast: the loss multiplies by a scale of ~20, and bf16 cosines
    (8 mantissa bits) would add visible logit noise.

    Args:
        dim: feature dim D.
        num_classes: C.
        generator: random generator for the initial weights.
    """

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))  # [C, D]
        nn.init.trunc_normal_(self.weight, std=0.02, a=-0.04, b=0.04, generator=generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, C] cosine similarities."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            f = F.normalize(features.float(), dim=-1)
            w = F.normalize(self.weight.float(), dim=-1)
            return f @ w.t()


class TrainedTensors(nn.Module):
    """The trained tensors of a model, as the spec (:mod:`lpt.tensors`) describes them: which parameters each
    one is, which of them train in the model's phase, how they are saved, loaded and counted.

    :class:`LPTModel` is built on it; it reads the model's ``tensors`` (the spec entries it has), ``spec`` (its
    method), ``phase``, ``backbone`` and the sizes of :meth:`symbol_sizes`.
    """

    tensors: list[TrainedTensor]
    phase: int
    method: str

    def _extra_tensors(self) -> nn.ParameterDict | None:
        """Spec tensors under ``extra_tensors.<name>``: those without a component of their own above (a tensor
        just added to :mod:`lpt.tensors`), each a plain parameter of its spec shape drawn from its own
        generator. ``None`` when there are none (every tensor of today's methods has its component)."""
        extra = [t for t in self.tensors if t.path.startswith("extra_tensors.")]
        if not extra:
            return None
        sizes = self.symbol_sizes()
        out = nn.ParameterDict()
        for tensor in extra:
            value = torch.empty(*(sizes[d] for d in tensor.dims))
            nn.init.trunc_normal_(value, std=0.02, a=-0.04, b=0.04, generator=component_generator(self.seed, tensor.name))
            out[tensor.path.removeprefix("extra_tensors.")] = nn.Parameter(value)
        return out

    def symbol_sizes(self) -> dict[str, int]:
        """The sizes of the spec's shape symbols for this model: L, S, L-S, T, D, P (configured), C."""
        return {"L": self.depth, "S": self.shared_blocks, "L-S": self.depth - self.shared_blocks,
                "T": self.prompt_length, "D": self.embed_dim, "P": self.cfg.pool_size, "C": self.num_classes}

    def tensor_parameters(self, tensor: TrainedTensor) -> dict[str, nn.Parameter]:
        """The parameters (by name) that one spec tensor of this model is: one, or a group's (adapters)."""
        path = tensor.path
        return {name: p for name, p in self.named_parameters() if name == path or name.startswith(path + ".")}

    def trainable_names(self, phase: int | None = None) -> list[str]:
        """Names of the trained tensors a model of this method has in ``phase`` (default: this model's phase),
        as :meth:`trainable_state_dict` keys them."""
        wanted = {t.name for t in trained_tensors(self.spec.tensors, self.phase if phase is None else phase)}
        return [name for t in self.tensors if t.name in wanted for name in self.tensor_parameters(t)]

    def _apply_trainable(self) -> None:
        """Frozen backbone; each trained tensor trainable exactly in the phases the spec lists for it."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for tensor in self.tensors:
            for p in self.tensor_parameters(tensor).values():
                p.requires_grad_(self.phase in tensor.phases)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Prompts, keys, adapters and head (every tensor that is trainable in some phase), detached CPU copies."""
        return {
            name: p.detach().to("cpu").contiguous().clone()
            for name, p in self.named_parameters()
            if not name.startswith("backbone.")
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True,
                                  phase: int | None = None) -> None:
        """Load tensors written by :meth:`trainable_state_dict`.

        Args:
            state: name -> tensor.
            strict: require exactly the trained tensors of ``phase`` (else missing ones keep their values).
            phase: whose tensors ``state`` holds: default this model's phase; ``1`` loads a phase-1 checkpoint
                into a phase-2 model (the pool keeps its initial values).

        Raises:
            CheckpointError: unknown / missing names or a shape mismatch (named).
        """
        own = {n: p for n, p in self.named_parameters() if not n.startswith("backbone.")}
        expected = set(self.trainable_names(phase)) if phase is not None else set(own)
        unexpected = sorted(set(state) - expected)
        missing = sorted(expected - set(state))
        if unexpected or (strict and missing):
            raise CheckpointError(
                f"trainable tensors do not match the model (method {self.method!r}, phase {phase or self.phase}): "
                f"missing {missing}, unexpected {unexpected}"
            )
        with torch.no_grad():
            for name, value in state.items():
                if tuple(value.shape) != tuple(own[name].shape):
                    raise CheckpointError(
                        f"tensor {name!r} has shape {tuple(value.shape)} in the checkpoint but "
                        f"{tuple(own[name].shape)} in the model (different model.* params?)"
                    )
                own[name].copy_(value)

    def parameter_report(self) -> dict[str, Any]:
        """Trainable vs frozen parameter counts of the current phase.

        Returns:
            dict with ``method``, ``phase``, ``trainable``, ``frozen``, ``total``, ``backbone``,
            ``trainable_share_of_backbone`` (trainable / backbone params), ``tuned_total`` (prompts +
            keys + head over all phases: L*T*D + P*(L-S)*T*D + P*D + C*D for ``lpt``) and
            ``components`` (name -> {params, trainable}).
        """
        components: dict[str, dict[str, Any]] = {}
        for tensor in self.tensors:  # spec order
            params = list(self.tensor_parameters(tensor).values())
            if tensor.dims:  # one tensor
                shape = list(params[0].shape)
            else:  # a group of per-block tensors (adapters): L x the values of one block's
                group = self.get_submodule(tensor.path)
                shape = [len(group), sum(p.numel() for p in group[0].parameters())]
            components[tensor.name] = {"params": sum(p.numel() for p in params), "shape": shape,
                                       "trainable": any(p.requires_grad for p in params)}
        backbone = sum(p.numel() for p in self.backbone.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {
            "method": self.method,
            "phase": self.phase,
            "trainable": trainable,
            "frozen": total - trainable,
            "total": total,
            "backbone": backbone,
            "trainable_share_of_backbone": trainable / backbone if backbone else float("nan"),
            "tuned_total": sum(c["params"] for c in components.values()),
            "components": components,
        }

    def summary(self) -> str:
        """Print-friendly :meth:`parameter_report`."""
        return format_parameter_report(self.parameter_report())


class LPTModel(TrainedTensors):
    """LPT (and its ablations) on a frozen timm ViT.

    Args:
        backbone: a frozen timm ViT of a supported family (:func:`lpt.model.backbone.create_backbone`,
            :func:`lpt.model.families.family_of`).
        num_classes: C.
        cfg: the ``model`` params section. Phase 1 reads ``prompt_length`` and ``head_dropout`` only; the
            pool fields (``pool_size``, ``shared_blocks``, ``top_k``, ``block_reuse``) are read when the
            model is built for phase 2.
        method: a name of :data:`lpt.methods.METHODS`: ``lpt`` (both phases), ``lpt_phase1`` (phase 1
            only), ``vpt_deep*`` (shared prompt + head), ``linear_probe*`` (head only), ``lift`` (adapters
            on every block's residual + head; ``cfg.adapter_dim`` or LIFT's rule sets their width).
        backbone_cfg: the ``backbone`` section it was built from (stored in checkpoints).
        seed: seeds each component's own generator (:func:`component_generator`).
        phase: the phase the model is for, fixed at construction: its tensors are those of the method that
            exist in this phase (:mod:`lpt.tensors`; the pool from phase 2 on), trainable in the phases the
            spec lists. Phase 2 reads the pool fields of ``cfg``.

    Raises:
        ValueError: a phase the method does not have, or ``model.shared_blocks`` outside the backbone depth.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        cfg: ModelConfig,
        method: Method = "lpt",
        backbone_cfg: BackboneConfig | None = None,
        seed: int = 0,
        phase: int = 1,
    ) -> None:
        super().__init__()
        assert method in METHODS, f"method must be one of {tuple(METHODS)}, got {method!r}"
        assert num_classes >= 1, num_classes
        self.method: str = method
        self.spec = get_method(method)
        if phase not in self.spec.phases:
            raise ValueError(f"method {method!r} has no phase {phase} (its phases: "
                             f"{', '.join(map(str, self.spec.phases))}; only 'lpt' has phase 2)")
        depth = len(backbone.blocks)
        self.phase = phase
        self.tensors = trained_tensors(self.spec.tensors, phase)  # what this model has (lpt.tensors)
        has = {t.name for t in self.tensors}
        pool = "group_prompts" in has
        if pool and not 0 <= cfg.shared_blocks < depth:
            raise ValueError(f"model.shared_blocks ({cfg.shared_blocks}) must be in 0..{depth - 1} "
                             f"(backbone depth {depth})")
        self.cfg = cfg
        self.seed = int(seed)
        self.backbone_cfg = backbone_cfg
        self.family = family_of(backbone, backbone_cfg.name if backbone_cfg is not None else None)  # stateless
        self.num_classes = num_classes
        self.depth = depth
        self.embed_dim: int = backbone.embed_dim
        self.prompt_length: int = cfg.prompt_length
        self.head_dropout: float = own(cfg.head_dropout, self.spec.recipe, "head_dropout")  # null: the method's own
        self.shared_blocks: int = cfg.shared_blocks if pool else depth  # blocks that see the shared prompt only
        self.block_reuse: bool = cfg.block_reuse if pool else True
        self.backbone = backbone
        self.shared_prompt = (
            SharedPrompt(self.depth, self.prompt_length, self.embed_dim,
                         generator=component_generator(seed, "shared_prompt"))
            if "shared_prompt" in has else None
        )
        self.head_drop = nn.Dropout(self.head_dropout)
        self.head = CosineHead(self.embed_dim, num_classes, generator=component_generator(seed, "head"))
        self._fingerprint: str | None = None
        self.adapter_dim: int | None = None
        self.adapters: nn.ModuleList | None = None
        if "adapters" in has:  # LIFT: an AdaptFormer adapter on every block's residual (lpt.model.adapters)
            self._fingerprint = backbone_fingerprint(backbone)  # the frozen weights', before the wraps rename modules
            self.adapter_dim = cfg.adapter_dim or default_adapter_dim(num_classes, self.depth)
            self.adapters = attach_adapters(backbone.blocks, self.embed_dim, self.adapter_dim,
                                            generator=component_generator(seed, "adapters"))
        # registered last, after the phase-1 components (the parameter order a phase-2 run has always had)
        self.group_pool = (
            GroupPromptPool(cfg.pool_size, self.depth - cfg.shared_blocks, self.prompt_length, self.embed_dim,
                            cfg.top_k, generator=component_generator(self.seed, "group_pool"))
            if pool else None
        )
        self.extra_tensors = self._extra_tensors()
        self._apply_trainable()
        self.backbone.eval()

    # ------------------------------------------------------------------------------ phases & modes
    def model_config(self) -> dict[str, Any]:
        """The geometry this model was built with (what ``model.json`` records and :func:`load_trained_model`
        rebuilds from): phase-1 fields, plus the pool's once it exists."""
        out: dict[str, Any] = {"prompt_length": self.prompt_length, "head_dropout": self.head_dropout}
        if self.adapter_dim is not None:
            out["adapter_dim"] = self.adapter_dim
        if self.group_pool is not None:
            out.update(pool_size=int(self.group_pool.prompts.shape[0]), shared_blocks=self.shared_blocks,
                       top_k=self.group_pool.top_k, block_reuse=self.block_reuse)
        return out

    def train(self, mode: bool = True) -> LPTModel:
        """Train/eval mode for the head dropout; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ------------------------------------------------------------------------------ building blocks
    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Images [B, 3, H, W] -> (the model's tokens [B, N, D], the family's block context, e.g. RoPE)."""
        return self.family.embed(self.backbone, x)

    def _blocks(
        self, h: torch.Tensor, ctx: Any, start: int, end: int, group: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run blocks ``start..end-1`` with prompt replacement.

        Args:
            h: [B, N, D] hidden state entering block ``start`` (the model's own tokens only).
            ctx: the family's block context from :meth:`_embed` (RoPE for EVA; None for a plain ViT).
            start: first block.
            end: one past the last block.
            group: [B, L-S, T, D] per-sample group prompts for blocks S..L-1, or None.

        Returns:
            [B, N, D] hidden state after block ``end - 1`` (prompt outputs dropped).
        """
        batch, n = h.shape[0], h.shape[1]
        for i in range(start, end):
            parts = [h]
            if self.shared_prompt is not None:
                parts.append(self.shared_prompt.layer(i, batch).to(h.dtype))  # [B, T, D]
            if group is not None:
                parts.append(group[:, i - self.shared_blocks].to(h.dtype))  # [B, T, D]
            tokens = torch.cat(parts, dim=1) if len(parts) > 1 else h  # [B, N + T (+ T), D]
            out = self.family.block(self.backbone, i, tokens, ctx, tokens.shape[1] - n)  # [B, N + T (+ T), D]
            h = out[:, :n]  # [B, N, D]: prompt outputs dropped (replacement)
        return h

    def _feature(self, h: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> the model's own pooled feature [B, D] (timm's pre_logits: final-norm CLS, avg, map...)."""
        return self.family.feature(self.backbone, h)

    def _output(self, features: torch.Tensor, sim: torch.Tensor, selected: torch.Tensor | None) -> LPTOutput:
        logits = self.head(self.head_drop(features))  # [B, C]
        return LPTOutput(logits=logits, sim=sim, selected=selected, features=features)

    # ------------------------------------------------------------------------------ forwards
    def forward(self, x: torch.Tensor) -> LPTOutput:
        """Classify a batch.

        Args:
            x: [B, 3, H, W] normalised images.

        Returns:
            :class:`LPTOutput` (raw cosine logits, key-matching sim, selected pool indices, features).
        """
        if self.phase == 2 and self.block_reuse:
            return self._forward_phase2_reuse(x)
        if self.phase == 2:
            return self.forward_two_pass(x)
        return self._forward_phase1(x)

    def _forward_phase1(self, x: torch.Tensor) -> LPTOutput:
        h, ctx = self._embed(x)  # [B, N, D]
        h = self._blocks(h, ctx, 0, self.depth)  # [B, N, D]
        return self._output(self._feature(h), x.new_zeros(()), None)

    def _forward_phase2_reuse(self, x: torch.Tensor) -> LPTOutput:
        s = self.shared_blocks
        assert self.group_pool is not None
        # Blocks 0..S-1 once, shared by both passes. Everything here is frozen in phase 2, so the
        # result is a constant for autograd: no graph, no saved activations, no backward through them.
        with torch.no_grad():
            h0, ctx = self._embed(x)  # [B, N, D]
            h_shared = self._blocks(h0, ctx, 0, s)  # [B, N, D]
            query = self._feature(self._blocks(h_shared, ctx, s, self.depth))  # [B, D] = phase-1 feature
        sel = self.group_pool.select(query)
        h = self._blocks(h_shared, ctx, s, self.depth, group=sel.prompts)  # [B, N, D]
        return self._output(self._feature(h), sel.sim, sel.selected)

    def forward_two_pass(self, x: torch.Tensor) -> LPTOutput:
        """Reference forward without block reuse: a full query pass, then a full prompted pass.

        Identical outputs to :meth:`forward` (to float tolerance); about (2L)/(2L-S) times the block
        compute. In phase 1 it is the plain forward.
        """
        if self.phase == 1:
            return self._forward_phase1(x)
        assert self.group_pool is not None
        s = self.shared_blocks
        with torch.no_grad():
            h, ctx = self._embed(x)  # [B, N, D]
            query = self._feature(self._blocks(h, ctx, 0, self.depth))  # [B, D]
        sel = self.group_pool.select(query)
        h, ctx = self._embed(x)
        h = self._blocks(h, ctx, 0, s)  # [B, N, D]
        h = self._blocks(h, ctx, s, self.depth, group=sel.prompts)
        return self._output(self._feature(h), sel.sim, sel.selected)

    @torch.no_grad()
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-style raw cosine logits [B, C] (argmax = prediction; no noise, no margin at test time)."""
        return self(x).logits

    def no_weight_decay(self) -> set[str]:
        """Names (timm convention) an optimizer may exclude from weight decay: none by default (spec)."""
        return set()

    def backbone_fingerprint(self) -> str:
        """Cached :func:`lpt.model.backbone.backbone_fingerprint` (the backbone never changes)."""
        if self._fingerprint is None:
            self._fingerprint = backbone_fingerprint(self.backbone)
        return self._fingerprint



def format_parameter_report(report: dict[str, Any]) -> str:
    """Render :meth:`LPTModel.parameter_report` as a small text table."""
    lines = [
        f"LPT model: method={report['method']} phase={report['phase']}",
        f"  {'component':<15} {'shape':<22} {'params':>12}  trainable",
    ]
    for name, c in report["components"].items():
        shape = "x".join(str(s) for s in c["shape"])
        lines.append(f"  {name:<15} {shape:<22} {c['params']:>12,}  {'yes' if c['trainable'] else 'no'}")
    lines.append(f"  {'backbone':<15} {'(frozen)':<22} {report['backbone']:>12,}  no")
    lines.append(
        f"  trainable {report['trainable']:,} / frozen {report['frozen']:,} "
        f"({100 * report['trainable_share_of_backbone']:.2f} % of the backbone)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- factories / io
def create_lpt_model(params: Params, num_classes: int, phase: int = 1) -> LPTModel:
    """Build the backbone from ``params.backbone`` and wrap it for ``params.train.method``.

    Args:
        params: reads ``seed``, ``backbone``, ``pretrain.out_dir`` (for ``weights: pretrain``),
            ``train.method``, ``model.prompt_length`` / ``head_dropout`` and, with ``phase=2``, the pool fields.
        num_classes: C.
        phase: 2 builds the group prompt pool too (LPT only).
    """
    family_of(build_architecture(params.backbone), params.backbone.name)  # refuse a family before loading weights
    backbone = create_backbone(params.backbone, pretrain_dir=params.pretrain.out_dir)
    return LPTModel(backbone, num_classes, params.model, params.train.method, backbone_cfg=params.backbone,
                    seed=params.seed, phase=phase)


def final_model_dir(train_out_dir: str | Path) -> Path:
    """The folder of the final model of every method: ``<train.out_dir>/phase2`` (the one-phase methods
    copy their phase-1 model there)."""
    return Path(train_out_dir) / "phase2"


def save_trained_model(model: LPTModel, folder: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``folder/model.safetensors`` (trainable tensors) and ``folder/model.json``, each atomically.

    The weights are written first; ``model.json`` records their sha256, so a reader never pairs a new
    json with old weights unnoticed.

    Args:
        model: the model.
        folder: e.g. a temporary folder that replaces ``<train.out_dir>/phase1`` when complete.
        meta: caller's fields (``class_counts``, ``recipe``, ``best_val_acc``...). The model's own fields
            (method, phase, num_classes, backbone name + fingerprint, model config) are added and win
            over same-named caller keys.

    Returns:
        The path of ``model.json``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_safetensors(model.trainable_state_dict(), tmp, metadata={"format": str(CHECKPOINT_FORMAT)})
    bcfg = model.backbone_cfg
    out = dict(meta)
    out.update({
        "format": CHECKPOINT_FORMAT,
        "method": model.method,
        "phase": model.phase,
        "num_classes": model.num_classes,
        "backbone": {
            "name": bcfg.name if bcfg is not None else type(model.backbone).__name__,
            "fingerprint": model.backbone_fingerprint(),
            "timm_kwargs": dict(bcfg.timm_kwargs) if bcfg is not None else None,
            "ln_eps": bcfg.ln_eps if bcfg is not None else None,
            "weights": str(bcfg.weights) if bcfg is not None else None,
        },
        "model_config": model.model_config(),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_file(weights),
        "parameters": {k: v for k, v in model.parameter_report().items() if k != "components"},
    })
    return write_json_atomic(folder / META_FILE, out)


def read_checkpoint_meta(phase_dir: str | Path) -> dict[str, Any]:
    """``model.json`` of a checkpoint folder, checked for the fields a loader needs.

    Raises:
        CheckpointError: missing, not JSON, or without the required fields (the message names them).
    """
    from lpt.utils import JsonFileError

    path = Path(phase_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"trained model not found: {path} is missing (train the phase first)")
    try:
        meta = read_json(path, "checkpoint metadata")
    except JsonFileError as err:
        raise CheckpointError(str(err)) from None
    problems = [f"{key} ({kind.__name__})" for key, kind in _META_FIELDS.items() if not isinstance(meta.get(key), kind)]
    if problems:
        raise CheckpointError(f"{path}: checkpoint metadata lacks or mistypes {', '.join(problems)}; "
                              "it was not written by `lpt train`: retrain the phase")
    if meta["method"] not in METHODS:
        raise CheckpointError(f"{path}: unknown method {meta['method']!r} (expected one of {', '.join(METHODS)})")
    return meta


_META_FIELDS: dict[str, type] = {"method": str, "phase": int, "num_classes": int, "backbone": dict,
                                 "model_config": dict, "weights_sha256": str}


def read_trained_tensors(phase_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trained tensors of a checkpoint folder and its ``model.json``, the weights sha256-checked against it.

    The one reader of trained tensors: :func:`load_trained_model` and phase 2 (which starts from phase 1's)
    both go through it.

    Returns:
        ``(name -> tensor as :meth:`LPTModel.trainable_state_dict` keys them, checkpoint meta dict)``.

    Raises:
        CheckpointError: missing ``model.json`` or weights, a sha256 that differs from the one recorded, or
            a file safetensors cannot read (each message names the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    phase_dir = Path(phase_dir)
    weights_path = phase_dir / WEIGHTS_FILE
    meta = read_checkpoint_meta(phase_dir)
    if not weights_path.is_file():
        raise CheckpointError(f"trained model not found: {weights_path} is missing (train the phase first)")
    if sha256_file(weights_path) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights_path}: sha256 differs from {phase_dir / META_FILE} "
                              "(damaged, interrupted or mixed write): retrain the phase")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({err})") from None
    return state, meta


def load_trained_model(
    params: Params, phase_dir: Path | None = None, device: str | torch.device = "cpu"
) -> tuple[LPTModel, dict[str, Any]]:
    """Rebuild a trained model from a checkpoint folder.

    Everything about the model comes from the checkpoint's ``model.json`` (method, phase, class count,
    backbone architecture, prompt geometry); the params say only where the backbone weights live
    (``backbone.weights``, ``pretrain.out_dir``). The rebuilt backbone's fingerprint must match the
    recorded one.

    Args:
        params: reads ``backbone.weights``, ``pretrain.out_dir`` and (default folder) ``train.out_dir``.
        phase_dir: folder with ``model.safetensors`` + ``model.json``; default :func:`final_model_dir`.
        device: where to put the model.

    Returns:
        ``(model in eval mode, checkpoint meta dict)``.

    Raises:
        CheckpointError: missing or damaged files (:func:`read_trained_tensors`), or a different backbone.
        BackboneError: the backbone's family is not supported, or its weights cannot be loaded.
    """
    phase_dir = Path(phase_dir) if phase_dir is not None else final_model_dir(params.train.out_dir)
    state, meta = read_trained_tensors(phase_dir)
    recorded = meta["backbone"]
    try:
        bcfg = BackboneConfig(name=recorded["name"], timm_kwargs=recorded.get("timm_kwargs") or {},
                              ln_eps=recorded["ln_eps"], weights=params.backbone.weights)
        mcfg = ModelConfig(**meta["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{phase_dir / META_FILE}: backbone or model_config record is invalid ({err})") from None
    family_of(build_architecture(bcfg), bcfg.name)  # refuse a family before loading weights
    backbone = create_backbone(bcfg, pretrain_dir=params.pretrain.out_dir)
    try:
        model = LPTModel(backbone, meta["num_classes"], mcfg, meta["method"], backbone_cfg=bcfg, phase=meta["phase"])
    except ValueError as err:
        raise CheckpointError(f"{phase_dir / META_FILE}: {err}") from None
    if recorded.get("fingerprint") and model.backbone_fingerprint() != recorded["fingerprint"]:
        raise CheckpointError(
            f"{phase_dir}: trained on backbone {recorded['fingerprint']} but backbone.weights={bcfg.weights!r} "
            f"gives {model.backbone_fingerprint()}: point backbone.weights at the weights it was trained with"
        )
    model.load_trainable_state_dict(state)
    return model.to(device).eval(), meta
