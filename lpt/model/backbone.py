"""The frozen ViT backbone: a timm ViT by name, weights through timm's own loading, frozen.

Nothing in the backbone ever trains (LPT tunes prompts and a head only). :func:`create_backbone` builds
the model with every dropout / stochastic-depth knob at 0, loads the weights named by
``backbone.weights``, sets the LayerNorm eps knob on every LayerNorm, and freezes it. Which timm ViT
families LPT can prompt, and how, is :mod:`lpt.model.families`.

Weights (``backbone.weights``), each through timm's own mechanism:
    - ``hub``: ``create_model(pretrained=True)``: timm reads its Hugging Face hub cache (``HF_HUB_CACHE`` /
      ``HF_HOME``; offline with ``HF_HUB_OFFLINE=1``). Not cached -> one :class:`BackboneError` line naming
      the repo and file timm looked for and how to fetch them on a connected machine.
    - ``none``: random init (tests, benchmarks).
    - ``pretrain``: ``<pretrain.out_dir>/backbone.safetensors`` (:func:`pretrained_backbone_path`), written by
      this project's pretrain stage (:func:`save_backbone`).
    - a path: ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` via ``pretrained_cfg_overlay=dict(file=...)``
      (timm reads torch files with ``weights_only=True``, unwraps ``state_dict`` / ``model``, strips
      ``module.``, and runs the family's checkpoint filter: ``pos_embed`` resampling for another
      ``img_size``, OpenAI-CLIP / DINOv2 / EVA key conversions); ``.npz`` (Google JAX / big_vision layout)
      via timm's ``load_pretrained``. A classifier in the file is dropped; a missing or unexpected tensor or
      a shape mismatch is an error naming the tensor.

:func:`resolve_transforms` fills ``transforms`` fields left ``null`` from the model's pretrained config
(mean / std / crop_pct) and its input size.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lpt.config import BackboneConfig
from lpt.utils import atomic_path, save_safetensors

__all__ = ["BackboneError", "BACKBONE_FILE", "create_backbone", "build_architecture", "backbone_fingerprint",
           "save_backbone", "pretrained_backbone_path", "ResolvedTransforms", "resolve_transforms", "hub_weights"]

BACKBONE_FILE = "backbone.safetensors"
"""The pretrain stage's backbone inside ``pretrain.out_dir``."""

# Keys forced to 0: the spec has no stochastic depth and no attention / pos / proj dropout anywhere in the
# backbone. That is also what makes block reuse exact (blocks 0..S-1 are deterministic).
_NO_DROPOUT = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
# Checkpoint entries that belong to a classifier we don't use (num_classes=0). fc_norm is not one of them:
# in an avg / map pooled model it is part of the feature.
_HEAD_PREFIXES = ("head.", "head_dist.")
# timm's default when a pretrained config names no mean / std
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BackboneError(RuntimeError):
    """Backbone weights could not be found or do not fit the model; the message says which and how to fix."""


@dataclass(frozen=True)
class ResolvedTransforms:
    """The ``transforms`` section with every ``null`` (= from the model) filled in, for
    :func:`lpt.data.reader.build_transform`.

    The train-only fields are read from the section when a train transform is built, not before (a stage
    that only evaluates never reads them, which the DVC params contract checks).

    Attributes:
        input_size: side of the square network input.
        resize: test transform: shorter side resized to this, then center crop ``input_size``.
        mean: RGB mean.
        std: RGB std.
        section: the ``transforms`` params section (``train_scale_min``, ``hflip``).
    """

    input_size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    section: Any = field(repr=False, compare=False)

    @property
    def train_scale_min(self) -> float:
        return self.section.train_scale_min

    @property
    def hflip(self) -> bool:
        return self.section.hflip

    def as_dict(self) -> dict[str, Any]:
        """The resolved test-time values (what checkpoints and the export metadata record)."""
        return {"input_size": self.input_size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}


def resolve_transforms(section: Any, backbone: nn.Module) -> ResolvedTransforms:
    """Fill the ``transforms`` fields that are ``null`` from the model (explicit values always win).

    - ``input_size``: the model's own input size (``patch_embed.img_size``, i.e. ``timm_kwargs.img_size``
      or the pretrained config's). An explicit value must equal it unless the model takes any size
      (``dynamic_img_size``).
    - ``mean`` / ``std``: the model's ``pretrained_cfg`` (e.g. OpenAI CLIP's, ImageNet's, 0.5 for AugReg).
    - ``resize``: ``floor(input_size / crop_pct)`` with the pretrained config's ``crop_pct`` (timm's
      eval transform), 0.875 if it has none.

    Args:
        section: the ``transforms`` params section.
        backbone: the timm model (a :func:`build_architecture` meta build is enough).

    Raises:
        BackboneError: an explicit ``input_size`` the model cannot take, or a non-square model input.
    """
    import math

    cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
    embed = getattr(backbone, "patch_embed", None)
    model_size = tuple(int(v) for v in getattr(embed, "img_size", None) or cfg.get("input_size", (3, 0, 0))[1:])
    dynamic = bool(getattr(backbone, "dynamic_img_size", False)) or not getattr(embed, "strict_img_size", True)
    input_size = section.input_size
    if input_size is None:
        if len(model_size) != 2 or model_size[0] != model_size[1] or model_size[0] <= 0:
            raise BackboneError(f"transforms.input_size is null (from the model) but the model's input is {model_size}: "
                                "set transforms.input_size")
        input_size = model_size[0]
    elif not dynamic and len(model_size) == 2 and model_size != (input_size, input_size):
        raise BackboneError(f"transforms.input_size is {input_size} but the backbone is built for {model_size[0]} px "
                            f"inputs (backbone.timm_kwargs.img_size / its pretrained config): make them equal, or set "
                            "transforms.input_size to null to take the model's")
    mean = section.mean if section.mean is not None else tuple(float(v) for v in cfg.get("mean", _IMAGENET_MEAN))
    std = section.std if section.std is not None else tuple(float(v) for v in cfg.get("std", _IMAGENET_STD))
    resize = section.resize
    if resize is None:
        resize = int(math.floor(input_size / float(cfg.get("crop_pct") or 0.875)))
    return ResolvedTransforms(input_size=int(input_size), resize=int(resize), mean=tuple(float(v) for v in mean),
                              std=tuple(float(v) for v in std), section=section)


def pretrained_backbone_path(pretrain_dir: str | Path) -> Path:
    """Where the pretrain stage writes (and ``backbone.weights: pretrain`` reads) the backbone."""
    return Path(pretrain_dir) / BACKBONE_FILE


def create_backbone(cfg: BackboneConfig, *, num_classes: int = 0, frozen: bool = True,
                    pretrain_dir: str | Path | None = None) -> nn.Module:
    """Build the timm ViT named by ``cfg.name`` with the weights of ``cfg.weights``.

    Weights go through timm's own loading wherever timm covers it: ``hub`` is ``pretrained=True`` (timm reads
    the Hugging Face cache, offline with ``HF_HUB_OFFLINE=1``); a ``.safetensors`` / ``.pth`` / ``.pt`` /
    ``.bin`` file (and ``pretrain``'s file) is ``pretrained=True, pretrained_cfg_overlay=dict(file=...)``, so
    timm's weights-only reader, its wrapper/prefix cleaning and the family's own checkpoint filter
    (``pos_embed`` resampling, OpenAI-CLIP / DINOv2 / EVA key conversions) apply. What timm lacks is kept
    here: timm loads non-strictly whenever it drops the classifier and only *logs* missing or unexpected
    keys, so :func:`_timm_load_report` turns those log records into an error; a size mismatch becomes one
    line naming the tensor; ``.npz`` goes through timm's ``load_pretrained`` with every copy shape-checked
    (timm's npz copies would broadcast silently).

    Args:
        cfg: the ``backbone`` params section.
        pretrain_dir: ``pretrain.out_dir``, where ``backbone.weights: pretrain`` finds its file.
        num_classes: classifier outputs; 0 (default) = no head. The pretrain stage passes its class count.
        frozen: freeze every parameter and put the model in eval mode (default). The pretrain stage
            passes False to train it.

    Returns:
        The timm model (which ViT families LPT can prompt is :func:`lpt.model.families.family_of`'s call).

    Raises:
        BackboneError: unknown model name, dropout requested, weights missing or of the wrong shape.
    """
    import timm

    kwargs = _timm_kwargs(cfg)
    weights = str(cfg.weights)
    if weights == "hub":
        model = _create_from_hub(timm, cfg.name, num_classes, kwargs)
    elif weights == "none":
        model = _create(timm, cfg.name, num_classes=num_classes, **kwargs)
    else:
        if weights == "pretrain":
            if pretrain_dir is None:
                raise BackboneError("backbone.weights is 'pretrain' but no pretrain.out_dir was given to find it in")
            path = pretrained_backbone_path(pretrain_dir)
            if not path.is_file():
                raise BackboneError(
                    f"backbone.weights is 'pretrain' but {path} does not exist: run the pretrain stage first "
                    "(`lpt pretrain` / `dvc repro pretrain`), or set backbone.weights to a weights file or 'hub'"
                )
        else:
            path = Path(weights)
        model = _create_from_file(timm, cfg.name, num_classes, kwargs, path)

    set_layernorm_eps(model, cfg.ln_eps)
    if frozen:
        freeze(model)
    return model


def _timm_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """``backbone.timm_kwargs`` with every dropout / stochastic-depth rate forced to 0 (refused if set)."""
    kwargs: dict[str, Any] = dict(cfg.timm_kwargs)
    for key in _NO_DROPOUT:
        if float(kwargs.get(key, 0.0) or 0.0) != 0.0:
            raise BackboneError(
                f"backbone.timm_kwargs.{key} = {kwargs[key]!r}: the LPT backbone has no dropout or stochastic "
                "depth (block reuse relies on it); remove the key"
            )
        kwargs[key] = 0.0
    return kwargs


def _create(timm: Any, name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` with an unknown name or a bad kwarg as a :class:`BackboneError`."""
    import lpt.model.hybrid  # noqa: F401 - registers the project's hybrid ViT names with timm

    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as err:
        if "unknown model" in str(err).lower():
            raise BackboneError(f"backbone.name {name!r}: {err}") from None
        raise
    except TypeError as err:  # a timm_kwargs key the model's constructor does not take
        if any(key in str(err) for key in _NO_DROPOUT):
            raise BackboneError(f"backbone {name!r}: timm's model takes no {str(err).rsplit(' ', 1)[-1]} (LPT sets every "
                                "ViT dropout knob to 0), so it is not a ViT family LPT supports; see `lpt backbones`"
                                ) from None
        raise BackboneError(f"backbone {name!r}: timm cannot build it with backbone.timm_kwargs ({err})") from None


def build_architecture(cfg: BackboneConfig) -> nn.Module:
    """The backbone's architecture without weights or memory: ``create_model`` on the meta device.

    Shapes, classes, ``num_prefix_tokens`` and ``pretrained_cfg`` are exactly those of
    :func:`create_backbone`'s model, in ~0.1 s for a ViT-B and without touching any weights, so the family
    check, ``lpt backbones`` and the transforms resolution run before (or instead of) loading anything.

    Raises:
        BackboneError: unknown name, bad kwargs, dropout requested.
    """
    import timm

    _timm_kwargs(cfg)  # refuse dropout up front; the zeros it adds are left out: not every timm class takes them
    with torch.device("meta"):
        return _create(timm, cfg.name, pretrained=False, num_classes=0, **dict(cfg.timm_kwargs))


@contextmanager
def _timm_load_report() -> Iterator[dict[str, list[str]]]:
    """Capture the missing / unexpected keys timm reports while loading pretrained weights.

    timm's ``load_pretrained`` loads with ``strict=False`` whenever the classifier is dropped (our
    ``num_classes=0``) and reports the keys it could not match only as log records; a file of the wrong
    model would load half its tensors silently. The records of ``timm.models._builder`` are caught here
    (not shown) and returned as ``{"missing": [...], "unexpected": [...]}``.
    """
    import logging

    found: dict[str, list[str]] = {"missing": [], "unexpected": []}
    pattern = re.compile(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading", re.S)

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = pattern.match(record.getMessage())
            if match:
                keys = [k.strip() for k in match.group(2).split(",") if k.strip()]
                found[match.group(1).lower()].extend(keys)

    logger = logging.getLogger("timm.models._builder")
    handler, level, propagate = _Collect(logging.DEBUG), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def _load_error(source: str, err: BaseException) -> BackboneError:
    """One-line :class:`BackboneError` for a failed timm load (a size mismatch names the tensor)."""
    text = str(err)
    match = _SIZE_MISMATCH.search(text)
    if match:
        key, got, want = match.group(1), match.group(2), match.group(3)
        return BackboneError(f"{source}: tensor {key!r} has shape ({got}) in the checkpoint but ({want}) in the model "
                             "(wrong backbone.name / timm_kwargs?)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return BackboneError(f"{source}: could not load the weights ({type(err).__name__}: {first})")


def _check_report(source: str, report: dict[str, list[str]]) -> None:
    """Refuse missing backbone tensors and unexpected non-classifier entries (timm only logs them)."""
    missing = sorted(report["missing"])
    unexpected = sorted(k for k in report["unexpected"] if not k.startswith(_HEAD_PREFIXES))
    if missing or unexpected:
        raise BackboneError(
            f"{source}: checkpoint does not match the model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})"
        )


def _file_error(path: Path, err: BaseException) -> BackboneError:
    """One line for a local file timm could not load: unreadable, not weights-only, or not this model's."""
    import pickle

    text = str(err)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    if "size mismatch" in text or "Error(s) in loading state_dict" in text:
        return _load_error(str(path), err)
    if path.suffix.lower() == ".safetensors":
        if type(err).__name__ == "SafetensorError" or isinstance(err, (OSError, ValueError)):
            return BackboneError(f"{path}: not a readable safetensors file ({first}); it is damaged or truncated: "
                                 "fetch or regenerate it")
    elif isinstance(err, (pickle.UnpicklingError, EOFError)) or "weights only" in text.lower() \
            or "PytorchStreamReader" in text or "zip archive" in text:
        return BackboneError(f"{path}: not a weights-only torch checkpoint ({first})")
    return _load_error(str(path), err)


def _create_from_file(timm: Any, name: str, num_classes: int, kwargs: dict[str, Any], path: Path) -> nn.Module:
    """A local weights file through timm's ``pretrained_cfg_overlay=dict(file=...)`` (``.npz``: see below)."""
    if not path.is_file():
        raise BackboneError(f"backbone weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        # timm's overlay takes the npz route only where the tag's pretrained cfg says custom_load; its
        # model.load_pretrained (the JAX/big_vision reader) is called directly, every copy shape-checked.
        model = _create(timm, name, pretrained=False, num_classes=num_classes, **kwargs)
        _load_npz(model, path)
        return model
    if suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise BackboneError(f"{path}: unsupported weights format {suffix!r} (use .safetensors, .pth/.pt or .npz)")
    # custom_load=False: some tags (AugReg) name an npz url and set custom_load, which would send a
    # .safetensors / .pth file to the npz reader.
    overlay = {"file": str(path), "custom_load": False}
    try:
        with _timm_load_report() as report:
            model = _create(timm, name, pretrained=True, pretrained_cfg_overlay=overlay, pretrained_strict=False,
                            num_classes=num_classes, **kwargs)
    except BackboneError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors / unpickling / size errors come in many classes
        raise _file_error(path, err) from None
    _check_report(str(path), report)
    return model


def _safe_alternatives(filename: str) -> list[str]:
    """The ``.safetensors`` names timm tries before a ``.bin`` (its private ``_get_safe_alternatives``)."""
    try:
        from timm.models._hub import _get_safe_alternatives

        return list(_get_safe_alternatives(filename))
    except ImportError:  # pragma: no cover - moved in a future timm: the documented default
        return ["model.safetensors"] if filename == "pytorch_model.bin" else []


def hub_weights(model: nn.Module) -> dict[str, Any]:
    """Where ``backbone.weights: hub`` makes timm look for ``model``'s pretrained weights, and whether they are
    in this machine's cache.

    Args:
        model: the timm model (a :func:`build_architecture` meta build is enough: only ``pretrained_cfg`` is read).

    Returns:
        ``{"repo", "files", "cache_dir", "cached"}`` for a Hugging Face hub source (``files`` in the order timm
        tries them, ``cached`` = the cached file's path or None), ``{"url"}`` for a plain url source, or
        ``{}`` when timm lists no weights for the name.
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        # timm tries the safetensors alternative first, then the file its config names (timm.models._hub)
        named = cfg.get("hf_hub_filename") or "pytorch_model.bin"
        files = [named] if named.endswith(".safetensors") else [*_safe_alternatives(named), named]
        cached = None
        for name in files:
            hit = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(hit, str):
                cached = hit
                break
        return {"repo": repo, "files": files, "cache_dir": str(constants.HF_HUB_CACHE), "cached": cached}
    if cfg.get("url"):
        return {"url": cfg["url"]}
    return {}


def _hub_source(timm: Any, name: str, kwargs: dict[str, Any]) -> tuple[str, str]:
    """(what timm looked for, how to fetch it on a connected machine) for ``name``'s pretrained weights."""
    try:
        with torch.device("meta"):
            info = hub_weights(timm.create_model(name, pretrained=False, num_classes=0, **kwargs))
    except Exception:  # noqa: BLE001 - only for the message
        info = {}
    if "repo" in info:
        repo, files = info["repo"], info["files"]
        where = (f"{' (then '.join(files)}{')' * (len(files) - 1)} of the Hugging Face repo {repo} in the hub cache "
                 f"{info['cache_dir']} (folder models--{repo.replace('/', '--')})")
        fetch = (f"on a connected machine run `hf download {repo} {files[0]}` and copy that folder into this "
                 "machine's hub cache (HF_HUB_CACHE, or HF_HOME/hub)")
        return where, fetch
    if "url" in info:
        return (f"{info['url']} in the torch hub cache (torch.hub.get_dir()/checkpoints)",
                f"on a connected machine run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` "
                "and copy the downloaded file")
    return "pretrained weights, but timm lists no source for this name", "pick a name with a pretrained tag"


def _create_from_hub(timm: Any, name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """timm's pretrained mechanism (HF hub cache; offline with ``HF_HUB_OFFLINE=1``), with a one-line error
    naming the repo and file timm looked for when they are not cached."""
    try:
        with _timm_load_report() as report:
            model = _create(timm, name, pretrained=True, pretrained_strict=False, num_classes=num_classes, **kwargs)
    except BackboneError:
        raise
    except Exception as err:  # hub / network / cache errors come in many classes
        if "size mismatch" in str(err):
            raise _load_error(f"backbone.weights 'hub' ({name})", err) from None
        where, fetch = _hub_source(timm, name, kwargs)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise BackboneError(
            f"backbone.weights is 'hub' but timm could not read the pretrained weights of {name!r}"
            f"{' offline (HF_HUB_OFFLINE=1)' if offline else ''}: it looked for {where} "
            f"({type(err).__name__}); {fetch}, or point backbone.weights at a local file "
            "(.safetensors, .pth/.pt or .npz)"
        ) from None
    _check_report(f"backbone.weights 'hub' ({name})", report)
    return model


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
def _load_npz(model: nn.Module, path: Path) -> None:
    """timm's JAX ``.npz`` reader (``model.load_pretrained``), every copy checked for an exact shape so errors
    name the tensor."""
    from torch.overrides import TorchFunctionMode

    if not callable(getattr(model, "load_pretrained", None)):
        raise BackboneError(f"{path}: .npz is the JAX/big_vision VisionTransformer format; timm's "
                            f"{type(model).__name__} cannot read it (use .safetensors or .pth)")
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
            model.load_pretrained(str(path))
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

    state = {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(_HEAD_PREFIXES)
    }
    with atomic_path(path) as tmp:
        header = {"lpt": json.dumps({k: str(v) for k, v in metadata.items()}, sort_keys=True)} if metadata else None
        save_safetensors(state, tmp, metadata=header)
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
