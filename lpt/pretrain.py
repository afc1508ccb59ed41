"""``lpt pretrain``: supervised pretraining of the small embedded backbone (``backbone.weights: pretrain``).

Trains the whole small ViT plus a linear head on the synthetic *source* split (classes disjoint from the
target), keeps 10 % of each source class out to report accuracy, and writes the backbone without its head
to ``<pretrain.out_dir>/backbone.safetensors`` with a report ``pretrain.json``. Both are DVC outputs and
byte-identical when rerun on the same machine (no timings inside; the log has them).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lpt.config import Params
from lpt.errors import TrainError
from lpt.optim import build_scheduler
from lpt.optim import autocast
from lpt.utils import resolve_device, seed_everything, write_json_atomic

__all__ = ["pretrain_backbone", "REPORT_FILE"]

REPORT_FILE = "pretrain.json"

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


@torch.no_grad()
def _accuracy(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return correct / max(1, total)


def pretrain_backbone(params: Params) -> dict[str, Any]:
    """Supervised pretraining of the whole small ViT on the synthetic ``source`` split.

    Only when ``backbone.weights == 'pretrain'``: trains backbone + a linear head (AdamW, warm-up +
    cosine, ``transforms`` augmentation) on the balanced source classes (disjoint from the target),
    keeps 10 % of each source class out to report accuracy, and writes the backbone without its head
    to ``pretrain.out_dir/backbone.safetensors`` (atomic) plus ``pretrain.out_dir/pretrain.json``. Otherwise writes
    only ``pretrain.json`` saying no pretraining was needed (so the DVC stage output exists).

    Returns:
        ``{"path": backbone file or the marker json, "holdout_acc": float | None, ...}``.

    Raises:
        TrainError: no source split in the shards.
    """
    pcfg, bcfg = params.pretrain, params.backbone
    report_path = Path(pcfg.out_dir) / REPORT_FILE
    if bcfg.weights != "pretrain":
        write_json_atomic(report_path, {"pretrained": False,
                                        "reason": f"backbone.weights is {bcfg.weights!r}: no pretraining needed"})
        print(f"[pretrain] backbone.weights is {bcfg.weights!r}: nothing to pretrain; marker -> {report_path}")
        return {"path": str(report_path), "holdout_acc": None}

    from tqdm import tqdm

    from lpt.data.reader import ShardImages, TransformedDataset, build_transform, load_manifest
    from lpt.model.backbone import create_backbone, pretrained_backbone_path, save_backbone

    manifest = load_manifest(Path(params.data.out_dir))
    if not manifest.get("splits", {}).get("source", {}).get("count"):
        raise TrainError(f"backbone.weights is 'pretrain' but {params.data.out_dir}/manifest.json has no 'source' split "
                         "(only the synthetic source provides one): set backbone.weights to 'hub', 'none' or a file")
    device = resolve_device("auto")  # the stage reads only seed/backbone/pretrain/transforms (dvc.yaml)
    seed_everything(params.seed)
    images = ShardImages(Path(params.data.out_dir), "source", in_memory=True)
    labels = np.asarray(images.labels)
    num_classes = int(labels.max()) + 1
    train_idx, held_idx = _split_holdout(labels, 0.1, params.seed)
    train_ds = torch.utils.data.Subset(TransformedDataset(images, build_transform(params.transforms, train=True)),
                                       train_idx.tolist())
    held_ds = torch.utils.data.Subset(TransformedDataset(images, build_transform(params.transforms, train=False)),
                                      held_idx.tolist())
    gen = torch.Generator().manual_seed(params.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=pcfg.batch_size, shuffle=True, drop_last=True,
                                         generator=gen)
    held_loader = torch.utils.data.DataLoader(held_ds, batch_size=256)

    model = create_backbone(bcfg.model_copy(update={"weights": "none"}), num_classes=num_classes, frozen=False)
    model.to(device).train()
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(("pos_embed", "cls_token"))]
    decay = [p for n, p in model.named_parameters() if not (p.ndim <= 1 or n.endswith(("pos_embed", "cls_token")))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": pcfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=pcfg.lr)
    total = len(loader) * pcfg.epochs
    scheduler = build_scheduler(optimizer, total, warmup_steps=len(loader), warmup_lr=pcfg.lr * 0.01)
    print(f"[pretrain] {bcfg.name} {dict(bcfg.timm_kwargs)}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, {len(train_idx)} source images / {num_classes} classes, {pcfg.epochs} epochs x {len(loader)} steps",
          flush=True)
    t0 = time.time()
    for epoch in range(pcfg.epochs):
        model.train()
        loss_sum = 0.0
        for x, y in tqdm(loader, desc=f"pretrain epoch {epoch + 1}/{pcfg.epochs}", leave=False, mininterval=2.0,
                         disable=not sys.stderr.isatty()):
            with autocast(device, "auto"):
                loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
        print(f"[pretrain] epoch {epoch + 1}/{pcfg.epochs}: loss {loss_sum / max(1, len(loader)):.4f}", flush=True)
    model.cpu()
    acc = _accuracy(model, held_loader)
    path = save_backbone(model, pretrained_backbone_path(pcfg.out_dir), metadata={"source_classes": str(num_classes),
                                                              "holdout_acc": f"{acc:.4f}"})
    report = {"pretrained": True, "backbone": bcfg.name, "timm_kwargs": dict(bcfg.timm_kwargs), "path": str(path),
              "source_classes": num_classes, "train_images": int(len(train_idx)),
              "holdout_images": int(len(held_idx)), "holdout_acc": acc, "epochs": pcfg.epochs}
    write_json_atomic(report_path, report)
    print(f"[pretrain] held-out source accuracy {acc:.4f} ({time.time() - t0:.1f} s); backbone -> {path}; "
          f"report -> {report_path}", flush=True)
    return {"path": str(path), "holdout_acc": acc, "report": str(report_path)}
