"""One small adapter per timm ViT family: prefix tokens, where prompts go, the feature, RoPE.

LPT's block loop (:class:`lpt.model.lpt.LPTModel`) is the same for every backbone::

    h, ctx = family.embed(bb, x)                        # [B, N, D]: the model's own tokens (prefix + patches)
    for i in blocks:
        tokens = cat([h, prompts_i])                   # [B, N + T, D]: prompts after ALL the model's tokens
        h = family.block(bb, i, tokens, ctx, T)[:, :N]  # prompt outputs dropped after every block
    feature = family.feature(bb, h)                    # [B, D]: the query and the head's input

Everything that differs between timm's ViT implementations lives here and nowhere else:

- **Prefix tokens** come from the model (``num_prefix_tokens``: CLS, registers, distillation token), never
  hard-coded. Prompts are appended after the patch tokens, so they follow every prefix token and the
  model's own token order, positions and ``pos_embed`` are untouched.
- **The feature** is timm's own pooling of the final hidden state:
  ``bb.forward_head(bb.norm(h), pre_logits=True)``. Prompt outputs are dropped after every block, so ``h``
  holds only the model's own tokens and timm's pooling (CLS row, mean over the non-prefix tokens, the
  ``map`` attention pool, CLS + distillation mean) sees exactly what it sees without prompts. With no
  prompts the LPT forward *is* ``forward_head(forward_features(x), pre_logits=True)`` (tested bit-exact).
- **Distilled DeiT** (``deit_*_distilled_*``): timm's ``pre_logits`` feature is the mean of the final-norm
  CLS and distillation tokens; LPT uses that one vector as the phase-2 query *and* as the cosine head's
  input (timm's own inference averages the CLS head and the distillation head; one cosine head over the
  averaged feature is the prompt-tuning equivalent, and query and head see the same feature as for every
  other family).
- **RoPE** (``Eva``: EVA-02, DINOv3, ``vit_*_rope_*``): timm's attention rotates ``q[:, :, npt:]`` and
  ``k[:, :, npt:]`` with a rope tensor sized for the patch tokens. Prompts appended after the patches get
  rope rows of sin = 0, cos = 1 (:func:`extend_rope`): they are not rotated (like the prefix tokens, they
  have no position), and every patch token keeps exactly its own rotation.

:func:`family_of` picks the adapter from the model's class and refuses, in one line naming the class and
the model, anything it cannot handle. :data:`FAMILIES` lists the families with the tiny configs the tests
build (``tests/test_families.py``) and the benchmark times (``bench/families.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lpt.config import BackboneConfig, TransformConfig
from lpt.model.backbone import BackboneError, build_architecture, hub_weights, resolve_transforms

__all__ = ["FamilyInfo", "FAMILIES", "BackboneFamily", "ViTFamily", "DistilledFamily", "EvaFamily", "family_of",
           "extend_rope", "prefix_breakdown", "describe_backbone", "backbone_report", "format_backbone_report",
           "format_family_table", "SUPPORTED_CLASSES"]


@dataclass(frozen=True)
class FamilyInfo:
    """One row of the supported-family table (``lpt backbones``, docs/model.md, the tests, the bench).

    Attributes:
        name: short id (``clip``, ``eva02`` ...).
        title: what users call it.
        timm_names: the timm model-name patterns it covers.
        example: a timm model name of the family.
        tiny_kwargs: ``create_model`` kwargs that shrink ``example`` to a tiny random-weight test model.
    """

    name: str
    title: str
    timm_names: str
    example: str
    tiny_kwargs: dict[str, Any] = field(default_factory=dict)


_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}
_TINY14 = {"img_size": 28, "patch_size": 7, "embed_dim": 48, "depth": 4, "num_heads": 3}

FAMILIES: tuple[FamilyInfo, ...] = (
    FamilyInfo("vit", "ViT with a CLS token (AugReg)", "vit_*_patch*", "vit_tiny_patch16_224", _TINY),
    FamilyInfo("deit3", "DeiT-III (CLS, pos_embed without the class token, layer scale)", "deit3_*",
               "deit3_small_patch16_224", _TINY),
    FamilyInfo("clip", "CLIP image tower (pre-norm, quick-GELU)", "vit_*_clip_*", "vit_base_patch16_clip_quickgelu_224",
               _TINY),
    FamilyInfo("dinov2_reg", "DINOv2 with registers (CLS + 4 registers, layer scale)", "vit_*_reg*_dinov2",
               "vit_small_patch14_reg4_dinov2", _TINY14),
    FamilyInfo("reg_gap", "register tokens, no class token, average pool", "vit_*_reg*_gap_*",
               "vit_base_patch16_reg4_gap_256", _TINY),
    FamilyInfo("deit_distilled", "distilled DeiT (CLS + distillation token)", "deit_*_distilled_*",
               "deit_tiny_distilled_patch16_224", _TINY),
    FamilyInfo("siglip", "SigLIP (no class token, attention pool 'map')", "vit_*_siglip_*",
               "vit_base_patch16_siglip_224", _TINY),
    FamilyInfo("siglip_gap", "SigLIP GAP (no class token, average pool)", "vit_*_siglip_gap_*",
               "vit_base_patch16_siglip_gap_224", _TINY),
    FamilyInfo("eva02", "EVA-02 (RoPE, SwiGLU, sub-LN)", "eva02_*", "eva02_tiny_patch14_224", _TINY14),
    FamilyInfo("dinov3", "DINOv3 (RoPE, CLS + 4 registers, average pool)", "vit_*_dinov3", "vit_small_patch16_dinov3",
               _TINY),
)
"""The families LPT is tested on (each with a tiny random-weight config timm builds offline)."""

SUPPORTED_CLASSES = ("VisionTransformer", "VisionTransformerDistilled", "Eva")
"""timm model classes with an adapter; any other class is refused by :func:`family_of`."""

# RoPE modules whose embedding is the [N_patches, 2 * head_dim] sin|cos layout EvaAttention consumes
# (apply_rot_embed_cat), so an identity row (sin 0, cos 1) per prompt token is exact. Not here:
# RotaryEmbeddingMixed (vit_*_rope_mixed_*): timm 1.0.31's own forward of it does not survive the ONNX
# export (an Expand ORT rejects, even without prompts), so the export stage could never pass.
_ROPE_CAT = ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3")
_POOLS = ("token", "avg", "max", "avgmax", "map")


def prefix_breakdown(bb: nn.Module) -> dict[str, int]:
    """The model's prefix tokens by kind: ``{"cls": 1, "dist": 1, "reg": 4}`` (only the kinds it has).

    The sum is ``bb.num_prefix_tokens`` (checked by :func:`family_of`).
    """
    out: dict[str, int] = {}
    if getattr(bb, "cls_token", None) is not None:
        out["cls"] = 1
    if getattr(bb, "dist_token", None) is not None:
        out["dist"] = 1
    reg = getattr(bb, "reg_token", None)
    if reg is not None:
        out["reg"] = int(reg.shape[1])
    return out


def extend_rope(rope: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Append identity rotations for ``num_prompts`` prompt tokens to a concatenated sin|cos rope tensor.

    timm's EVA attention rotates ``q[:, :, npt:]`` (patches, then the prompts appended after them) with
    ``apply_rot_embed_cat(q, rope)``: ``q * cos + rot(q) * sin`` with ``sin, cos = rope.chunk(2, -1)``. A row
    of sin = 0, cos = 1 leaves a prompt token exactly as it is, and the patch rows keep their own rotation.

    Args:
        rope: ``[..., N_patches, 2 * d]``.
        num_prompts: T prompt tokens appended after the patches.

    Returns:
        ``[..., N_patches + T, 2 * d]``.
    """
    if num_prompts == 0:
        return rope
    half = rope.shape[-1] // 2
    shape = (*rope.shape[:-2], num_prompts, half)
    identity = torch.cat([rope.new_zeros(shape), rope.new_ones(shape)], dim=-1)  # [..., T, 2d]: sin 0 | cos 1
    return torch.cat([rope, identity], dim=-2)


class BackboneFamily:
    """The adapter interface; subclasses implement one timm class family. Stateless: every method takes
    the backbone, so the adapter never holds (or aliases) a module."""

    name = "base"

    def check(self, bb: nn.Module, label: str) -> None:
        """Raise :class:`BackboneError` naming ``label`` when this configuration cannot be handled."""
        npt = int(getattr(bb, "num_prefix_tokens", -1))
        if npt != sum(prefix_breakdown(bb).values()):
            raise BackboneError(f"backbone {label}: num_prefix_tokens {npt} does not match its tokens "
                                f"{prefix_breakdown(bb)}; LPT cannot tell the model's prefix tokens apart")
        pool = getattr(bb, "global_pool", "")
        if getattr(bb, "attn_pool", None) is None and pool not in _POOLS:
            raise BackboneError(f"backbone {label}: global_pool {pool!r} gives no pooled feature; LPT needs one of "
                                f"{', '.join(_POOLS)} (set backbone.timm_kwargs.global_pool)")
        features = int(getattr(bb, "head_hidden_size", getattr(bb, "num_features", bb.embed_dim)))
        if features != bb.embed_dim:
            raise BackboneError(f"backbone {label}: pooled feature width {features} differs from the token width "
                                f"{bb.embed_dim}; LPT's keys and head expect one width")

    def embed(self, bb: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Images [B, 3, H, W] -> (the model's tokens [B, N, D], per-forward context for the blocks)."""
        raise NotImplementedError

    def block(self, bb: nn.Module, i: int, tokens: torch.Tensor, ctx: Any, num_prompts: int) -> torch.Tensor:
        """Run block ``i`` on ``[B, N + T, D]`` tokens whose last ``num_prompts`` rows are prompts."""
        raise NotImplementedError

    def feature(self, bb: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Final hidden state [B, N, D] -> the pooled feature [B, D] (timm's own ``pre_logits``)."""
        return bb.forward_head(bb.norm(h), pre_logits=True)

    def feature_rows(self, bb: nn.Module) -> int | None:
        """How many leading token rows of the last block's output the feature reads (None: all of them).

        The export's CLS-only last block (:mod:`lpt.export`) is applied only where this is an int.
        """
        return None

    def pooling(self, bb: nn.Module) -> str:
        """The feature in words (``lpt backbones``)."""
        if getattr(bb, "attn_pool", None) is not None:
            scope = "all tokens" if getattr(bb, "pool_include_prefix", False) else "the non-prefix tokens"
            return f"attention pool 'map' over {scope}" + (" + fc_norm" if _has_fc_norm(bb) else "")
        pool = getattr(bb, "global_pool", "")
        if pool == "token":
            return "final-norm CLS token"
        return f"'{pool}' pool over the patch tokens (prefix tokens excluded)" + (" + fc_norm" if _has_fc_norm(bb) else "")

    def rope(self, bb: nn.Module) -> str:
        """RoPE handling in words (``lpt backbones``)."""
        return "none (absolute pos_embed only)"


def _has_fc_norm(bb: nn.Module) -> bool:
    return not isinstance(getattr(bb, "fc_norm", None), (nn.Identity, type(None)))


class ViTFamily(BackboneFamily):
    """timm ``VisionTransformer``: AugReg / DeiT-III / CLIP / registers / SigLIP / hybrids.

    timm's own pieces: ``patch_embed → _pos_embed (prefix tokens + positions) → patch_drop → norm_pre``;
    the blocks take the token tensor alone.
    """

    name = "vit"

    def embed(self, bb: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        h = bb.patch_embed(x)  # [B, Np, D] (or [B, H, W, D] with dynamic_img_size)
        h = bb._pos_embed(h)  # [B, N, D], N = num_prefix_tokens + Np
        return bb.norm_pre(bb.patch_drop(h)), None

    def block(self, bb: nn.Module, i: int, tokens: torch.Tensor, ctx: Any, num_prompts: int) -> torch.Tensor:
        return bb.blocks[i](tokens)  # [B, N + T, D]

    def feature_rows(self, bb: nn.Module) -> int | None:
        # token pooling reads x[:, 0] (row-wise fc_norm after it); avg / map read every patch row
        token = getattr(bb, "attn_pool", None) is None and getattr(bb, "global_pool", "") == "token"
        return 1 if token else None


class DistilledFamily(ViTFamily):
    """timm ``VisionTransformerDistilled`` (``deit_*_distilled_*``): CLS + distillation token.

    The feature is timm's ``pre_logits``: (final-norm CLS + final-norm distillation token) / 2, used both as
    the phase-2 query and as the cosine head's input (see the module docstring).
    """

    name = "deit_distilled"

    def feature_rows(self, bb: nn.Module) -> int | None:
        return 2  # x[:, 0] and x[:, 1]

    def pooling(self, bb: nn.Module) -> str:
        return "mean of the final-norm CLS and distillation tokens (timm's pre_logits)"


class EvaFamily(BackboneFamily):
    """timm ``Eva`` (EVA-02, DINOv3, ``vit_*_rope_*``): RoPE on the patch tokens, SwiGLU, sub-LN.

    ``_pos_embed`` returns the tokens and the rope tensor; each block is called with ``rope=``. Prompt
    tokens get identity rotations (:func:`extend_rope`), so the patch tokens keep theirs exactly.
    """

    name = "eva"

    def check(self, bb: nn.Module, label: str) -> None:
        super().check(bb, label)
        rope = getattr(bb, "rope", None)
        if rope is not None and (type(rope).__name__ not in _ROPE_CAT or getattr(bb, "rope_mixed", False)):
            raise BackboneError(f"backbone {label}: rotary embedding {type(rope).__name__} is not one LPT can extend "
                                f"for prompt tokens and export (supported: {', '.join(_ROPE_CAT)})")
        for i, blk in enumerate(bb.blocks):
            npt = getattr(getattr(blk, "attn", None), "num_prefix_tokens", bb.num_prefix_tokens)
            if rope is not None and npt != bb.num_prefix_tokens:
                raise BackboneError(f"backbone {label}: block {i} rotates from token {npt}, the model has "
                                    f"{bb.num_prefix_tokens} prefix tokens")

    def embed(self, bb: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        h = bb.patch_embed(x)  # [B, Np, D]
        h, rope = bb._pos_embed(h)  # [B, N, D]; rope [Np, 2d] or None
        return bb.norm_pre(h), rope

    def block(self, bb: nn.Module, i: int, tokens: torch.Tensor, ctx: Any, num_prompts: int) -> torch.Tensor:
        rope = None if ctx is None else extend_rope(ctx, num_prompts)  # [Np + T, 2d]: prompts unrotated
        return bb.blocks[i](tokens, rope=rope)  # [B, N + T, D]

    def rope(self, bb: nn.Module) -> str:
        rope = getattr(bb, "rope", None)
        if rope is None:
            return "none (absolute pos_embed only)"
        return (f"{type(rope).__name__} on the patch tokens only; prompt tokens get identity rotations "
                "(sin 0, cos 1), so no patch token's rotation moves")


_ADAPTERS: dict[str, BackboneFamily] = {
    "VisionTransformer": ViTFamily(),
    "VisionTransformerDistilled": DistilledFamily(),
    "Eva": EvaFamily(),
}


def family_of(bb: nn.Module, name: str | None = None) -> BackboneFamily:
    """The adapter for ``bb``, or a refusal naming the model and its class.

    The class must be exactly one of :data:`SUPPORTED_CLASSES` (a subclass may change the forward pieces the
    adapter relies on) and the configuration must pass the adapter's checks (prefix-token count, a pooled
    feature as wide as the tokens, a RoPE layout it can extend).

    Args:
        bb: a timm model (a real one, or one built on the meta device).
        name: the timm name, for the message.

    Raises:
        BackboneError: one line naming the model, its class and what LPT supports.
    """
    cls = type(bb).__name__
    label = f"{name!r} ({cls})" if name else cls
    adapter = _ADAPTERS.get(cls)
    if adapter is None or type(bb).__module__.split(".")[0] != "timm":
        raise BackboneError(
            f"backbone {label}: timm class {cls} is not a ViT family LPT supports; supported classes: "
            f"{', '.join(SUPPORTED_CLASSES)} (families: {', '.join(f.name for f in FAMILIES)}; see `lpt backbones`)")
    adapter.check(bb, label)
    return adapter


def describe_backbone(bb: nn.Module, name: str, *, prompt_length: int, pool_size: int,
                      shared_blocks: int | None = None) -> dict[str, Any]:
    """What LPT does with a backbone: family, prefix tokens, feature, RoPE, S, parameter counts.

    Args:
        bb: the timm model (a meta-device build is enough: only shapes are read).
        name: its timm name.
        prompt_length: T.
        pool_size: P.
        shared_blocks: S; default L // 2 (the paper's 6 of 12).

    Returns:
        A JSON-friendly dict (``lpt backbones NAME`` prints it).

    Raises:
        BackboneError: an unsupported family (:func:`family_of`).
    """
    fam = family_of(bb, name)
    depth, dim = len(bb.blocks), int(bb.embed_dim)
    s = depth // 2 if shared_blocks is None else shared_blocks
    t, p = prompt_length, pool_size
    cfg = dict(getattr(bb, "pretrained_cfg", None) or {})
    num_patches = int(getattr(bb.patch_embed, "num_patches", 0) or 0)
    backbone_params = sum(q.numel() for q in bb.parameters())
    tuned = {"shared_prompt": depth * t * dim, "group_prompts": p * (depth - s) * t * dim, "keys": p * dim}
    return {
        "name": name,
        "class": type(bb).__name__,
        "family": fam.name,
        "depth": depth,
        "embed_dim": dim,
        "patch_tokens": num_patches,
        "prefix_tokens": int(bb.num_prefix_tokens),
        "prefix_breakdown": prefix_breakdown(bb),
        "token_layout": f"[prefix x{bb.num_prefix_tokens}, patches x{num_patches}, prompts x{t}] (prompts dropped "
                        "after every block)",
        "feature": fam.pooling(bb),
        "rope": fam.rope(bb),
        "shared_blocks_default": depth // 2,
        "shared_blocks": s,
        "prompt_length": t,
        "pool_size": p,
        "backbone_params": backbone_params,
        "tuned_params": {**tuned, "total": sum(tuned.values()), "head_per_class": dim},
        "tuned_share_of_backbone": sum(tuned.values()) / backbone_params if backbone_params else float("nan"),
        "pretrained_cfg": {k: cfg.get(k) for k in ("input_size", "mean", "std", "crop_pct", "interpolation")
                           if k in cfg},
    }


def backbone_report(name: str, timm_kwargs: dict[str, Any] | None = None, *, prompt_length: int = 10,
                    pool_size: int = 20, shared_blocks: int | None = None) -> dict[str, Any]:
    """:func:`describe_backbone` for a timm name (built on the meta device: no weights, no memory), plus
    where ``backbone.weights: hub`` would read its weights and whether they are cached (``lpt backbones NAME``).

    Raises:
        BackboneError: unknown name, bad kwargs, or an unsupported family.
    """
    arch = build_architecture(BackboneConfig(name=name, weights="none", timm_kwargs=dict(timm_kwargs or {})))
    report = describe_backbone(arch, name, prompt_length=prompt_length, pool_size=pool_size,
                               shared_blocks=shared_blocks)
    report["hub"] = hub_weights(arch)
    null = TransformConfig(input_size=None, resize=None, mean=None, std=None)
    report["transforms_from_model"] = resolve_transforms(null, arch).as_dict()
    return report


def format_backbone_report(report: dict[str, Any]) -> str:
    """:func:`backbone_report` as text."""
    tuned, total = report["tuned_params"], report["backbone_params"]
    prefix = ", ".join(f"{k} {v}" for k, v in report["prefix_breakdown"].items()) or "none"
    pre = report["pretrained_cfg"]
    lines = [
        f"{report['name']} ({report['class']}): LPT family {report['family']!r}, supported",
        f"  tokens        {report['token_layout']}",
        f"  prefix tokens {report['prefix_tokens']} ({prefix})",
        f"  feature       {report['feature']} = the phase-2 query and the cosine head's input",
        f"  rope          {report['rope']}",
        f"  geometry      L {report['depth']} blocks, D {report['embed_dim']}, S default {report['shared_blocks_default']}"
        f" (L/2, the paper's 6 of 12)",
        f"  parameters    backbone {total:,} (frozen); tuned with T={report['prompt_length']}, P={report['pool_size']}, "
        f"S={report['shared_blocks']}: shared {tuned['shared_prompt']:,} + pool {tuned['group_prompts']:,} + keys "
        f"{tuned['keys']:,} = {tuned['total']:,} ({100 * report['tuned_share_of_backbone']:.2f} % of the backbone), "
        f"+ head {tuned['head_per_class']:,} per class",
        "  pretrained    " + (", ".join(f"{k} {v}" for k, v in pre.items()) or "no pretrained config"),
        "  transforms    null fields resolve to " + ", ".join(f"{k} {v}" for k, v in report["transforms_from_model"].items()),
    ]
    hub = report.get("hub") or {}
    if "repo" in hub:
        state = f"cached: {hub['cached']}" if hub["cached"] else f"NOT in the hub cache {hub['cache_dir']}"
        lines.append(f"  weights hub   {hub['repo']} ({' or '.join(hub['files'])}): {state}")
    elif "url" in hub:
        lines.append(f"  weights hub   {hub['url']} (torch hub cache)")
    else:
        lines.append("  weights hub   timm lists no pretrained weights for this name")
    return "\n".join(lines)


def format_family_table() -> str:
    """The supported families as text (``lpt backbones``)."""
    rows = [("family", "timm names", "example", "what it is")]
    rows += [(f.name, f.timm_names, f.example, f.title) for f in FAMILIES]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.append(f"timm classes with an adapter: {', '.join(SUPPORTED_CLASSES)}; any other class is refused. "
                 "`lpt backbones NAME` shows what LPT does with one model.")
    return "\n".join(lines)
