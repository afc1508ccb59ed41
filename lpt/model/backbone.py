"""The frozen ViT backbone: any timm VisionTransformer by name, weights from hub / file / our pretrain stage.

Nothing in the backbone ever trains (LPT tunes prompts and a head only). :func:`create_backbone` builds
the model with every dropout / stochastic-depth knob at 0, loads the weights named by
``backbone.weights``, sets the LayerNorm eps knob on every LayerNorm, and freezes it.

Weights (``backbone.weights``):
    - ``hub``: timm's pretrained mechanism (HF hub cache). Offline with no cached copy -> a clear
      :class:`BackboneError` that says how to supply a local file instead.
    - ``none``: random init (tests, benchmarks).
    - ``pretrain``: ``<pretrain.out_dir>/backbone.safetensors`` (:func:`pretrained_backbone_path`), written by
      this project's pretrain stage (:func:`save_backbone`).
    - a path: ``.safetensors``; ``.pth`` / ``.pt`` (``torch.load(weights_only=True)``, a ``state_dict`` /
      ``model`` wrapper is accepted); ``.npz`` (Google JAX/big_vision layout via timm's loader).
      ``pos_embed`` is resampled when the checkpoint's grid differs from ``img_size`` (as timm does);
      a head in the checkpoint is ignored; any other shape mismatch is an error naming the tensor.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lpt.config import BackboneConfig
from lpt.utils import atomic_path

__all__ = ["BackboneError", "BACKBONE_FILE", "create_backbone", "backbone_fingerprint", "save_backbone",
           "load_backbone_weights", "pretrained_backbone_path"]

BACKBONE_FILE = "backbone.safetensors"
"""The pretrain stage's backbone inside ``pretrain.out_dir``."""

# Keys forced to 0: the spec has no stochastic depth and no attention / pos / proj dropout anywhere in the
# backbone. That is also what makes block reuse exact (blocks 0..S-1 are deterministic).
_NO_DROPOUT = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
# Checkpoint entries that belong to a classifier we don't use (num_classes=0).
_HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.", "pre_logits.")


class BackboneError(RuntimeError):
    """Backbone weights could not be found or do not fit the model; the message says which and how to fix."""


def pretrained_backbone_path(pretrain_dir: str | Path) -> Path:
    """Where the pretrain stage writes (and ``backbone.weights: pretrain`` reads) the backbone."""
    return Path(pretrain_dir) / BACKBONE_FILE


def create_backbone(cfg: BackboneConfig, *, num_classes: int = 0, frozen: bool = True,
                    pretrain_dir: str | Path | None = None) -> nn.Module:
    """Build the timm ViT named by ``cfg.name`` with the weights of ``cfg.weights``.

    Args:
        cfg: the ``backbone`` params section.
        pretrain_dir: ``pretrain.out_dir``, where ``backbone.weights: pretrain`` finds its file.
        num_classes: classifier outputs; 0 (default) = no head. The pretrain stage passes its class count.
        frozen: freeze every parameter and put the model in eval mode (default). The pretrain stage
            passes False to train it.

    Returns:
        A ``timm.models.vision_transformer.VisionTransformer`` (or compatible) with a CLS token.

    Raises:
        BackboneError: unknown model name, dropout requested, weights missing or of the wrong shape.
    """
    import timm

    import lpt.model.hybrid  # noqa: F401 - registers the project's hybrid ViT names with timm

    kwargs: dict[str, Any] = dict(cfg.timm_kwargs)
    for key in _NO_DROPOUT:
        if float(kwargs.get(key, 0.0) or 0.0) != 0.0:
            raise BackboneError(
                f"backbone.timm_kwargs.{key} = {kwargs[key]!r}: the LPT backbone has no dropout or stochastic "
                "depth (block reuse relies on it); remove the key"
            )
        kwargs[key] = 0.0
    weights = str(cfg.weights)
    try:
        if weights == "hub":
            model = _create_from_hub(timm, cfg.name, num_classes, kwargs)
        else:
            model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, **kwargs)
    except BackboneError:
        raise
    except RuntimeError as err:
        if "Unknown model" in str(err) or "unknown model" in str(err).lower():
            raise BackboneError(f"backbone.name {cfg.name!r}: {err}") from None
        raise
    if getattr(model, "cls_token", None) is None or not hasattr(model, "blocks"):
        raise BackboneError(f"backbone.name {cfg.name!r}: LPT needs a ViT with a CLS token and .blocks")

    if weights == "pretrain":
        if pretrain_dir is None:
            raise BackboneError("backbone.weights is 'pretrain' but no pretrain.out_dir was given to find it in")
        path = pretrained_backbone_path(pretrain_dir)
        if not path.is_file():
            raise BackboneError(
                f"backbone.weights is 'pretrain' but {path} does not exist: run the pretrain stage first "
                "(`lpt pretrain` / `dvc repro pretrain`), or set backbone.weights to a weights file or 'hub'"
            )
        load_backbone_weights(model, path)
    elif weights not in ("hub", "none"):
        load_backbone_weights(model, Path(weights))

    set_layernorm_eps(model, cfg.ln_eps)
    if frozen:
        freeze(model)
    return model


def _create_from_hub(timm: Any, name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """timm's pretrained mechanism, with a clear message when offline and uncached."""
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as err:  # hub / network / cache errors come in many classes
        if "Unknown model" in str(err):
            raise BackboneError(f"backbone.name {name!r}: {err}") from None
        raise BackboneError(
            f"backbone.weights is 'hub' but the pretrained weights of {name!r} could not be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Offline (HF_HUB_OFFLINE=1) "
            "the weights must already be in the Hugging Face cache. Otherwise supply a local file: set "
            "backbone.weights to a path ending in .safetensors, .pth/.pt or .npz (e.g. the timm/AugReg "
            "checkpoint downloaded elsewhere)"
        ) from None


def set_layernorm_eps(model: nn.Module, eps: float) -> int:
    """Set ``eps`` on every ``nn.LayerNorm`` (block norms, final norm, norm_pre); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = float(eps)
            n += 1
    return n


def freeze(model: nn.Module) -> nn.Module:
    """``requires_grad=False`` on every parameter and eval mode (no dropout is active anyway)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ------------------------------------------------------------------------------------------ weights
def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Load a weights file into ``model`` in place.

    Args:
        model: the timm ViT (built with ``num_classes=0`` or any head; head entries are skipped).
        path: ``.safetensors``, ``.pth``/``.pt``/``.bin`` or ``.npz``.

    Raises:
        BackboneError: file missing, unknown extension, missing/unexpected entries, or a shape mismatch
            (naming the tensor and both shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        _load_npz(model, path)
        return
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise BackboneError(f"{path}: not a readable safetensors file ({err}); it is damaged or truncated: "
                                "fetch or regenerate it") from None
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            raise BackboneError(f"{path}: not a weights-only torch checkpoint ({err})") from None
        for wrapper in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        if not isinstance(state, dict):
            raise BackboneError(f"{path}: expected a state dict, got {type(state).__name__}")
    else:
        raise BackboneError(f"{path}: unsupported weights format {suffix!r} (use .safetensors, .pth/.pt or .npz)")
    _load_state_dict(model, state, source=str(path))


def _load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load after timm's checkpoint filter (pos_embed resampling, format conversions)."""
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    try:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, model)
    except Exception:  # noqa: BLE001 - an unfilterable state dict still gets the named shape check below
        pass
    target = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(_HEAD_PREFIXES) and k not in target)}
    for key, value in state.items():
        if key in target and tuple(value.shape) != tuple(target[key].shape):
            raise BackboneError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(target[key].shape)} in the model (wrong backbone.name / timm_kwargs?)"
            )
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise BackboneError(
            f"{source}: checkpoint does not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def _load_npz(model: nn.Module, path: Path) -> None:
    """timm's JAX ``.npz`` loader, with every copy checked for an exact shape so errors name the tensor."""
    from torch.overrides import TorchFunctionMode

    from timm.models.vision_transformer import _load_weights

    names = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}

    class _ShapeGuard(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            if func is torch.Tensor.copy_ and len(args) >= 2 and id(args[0]) in names:
                dst, src = args[0], args[1]
                if tuple(dst.shape) != tuple(src.shape):
                    raise BackboneError(
                        f"{path}: tensor {names[id(dst)]!r} has shape {tuple(src.shape)} in the checkpoint but "
                        f"{tuple(dst.shape)} in the model (wrong backbone.name / timm_kwargs?)"
                    )
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), _ShapeGuard():
            _load_weights(model, str(path))
    except BackboneError:
        raise
    except KeyError as err:
        raise BackboneError(f"{path}: npz checkpoint lacks entry {err} (depth or layout differs from the model)") from None
    except Exception as err:
        raise BackboneError(f"{path}: could not load npz checkpoint: {type(err).__name__}: {err}") from None


def save_backbone(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the backbone's weights (head entries dropped) as safetensors, atomically.

    Args:
        model: a timm ViT, possibly with a classification head (the pretrain stage's model).
        path: destination ``.safetensors`` file.
        metadata: optional metadata, stored in the file header as one sorted JSON string under the key
            ``lpt`` (safetensors keeps header metadata in a hash map whose order changes from process to
            process: with several keys the same weights would give different bytes on every run).

    Returns:
        ``path``.
    """
    import json

    from safetensors.torch import save_file

    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(_HEAD_PREFIXES)
    }
    with atomic_path(path) as tmp:
        header = {"lpt": json.dumps({k: str(v) for k, v in metadata.items()}, sort_keys=True)} if metadata else None
        save_file(state, str(tmp), metadata=header)
    return Path(path)


def backbone_fingerprint(model: nn.Module, length: int = 16) -> str:
    """Short sha256 over the state dict (names, dtypes, shapes, bytes), in key order.

    Two backbones with the same fingerprint compute the same function (up to the LayerNorm eps, which
    is a config value, not a tensor).
    """
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]
