"""Optimisation pieces shared by pretraining and the LPT phases: steps per epoch, the phase schedule (epochs,
step floor, warm-up, patience), lr scaling, warm-up + cosine schedule, SGD over the trainable parameters,
autocast."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lpt.config import PhaseConfig
from lpt.losses import ib_stream_weight  # w(e) = max(0, ib_weight * (E - e) / E), re-exported
from lpt.errors import TrainError

__all__ = ["steps_per_epoch", "PhaseSchedule", "phase_schedule", "stopped_early", "scaled_lr", "warmup_cosine_lr",
           "build_optimizer", "build_scheduler", "ib_stream_weight", "autocast"]


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps per epoch, ``floor(N / B) + 1`` as in the authors' recipe."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"need num_samples >= 1 and batch_size >= 1, got {num_samples}, {batch_size}")
    return num_samples // batch_size + 1


@dataclass(frozen=True)
class PhaseSchedule:
    """How long one phase trains, in optimizer steps (:func:`phase_schedule`)."""

    full_steps_per_epoch: int  # floor(N / B) + 1, the recipe's epoch
    steps_per_epoch: int  # after train.phaseN.max_steps_per_epoch
    epochs: int  # epochs planned: train.phaseN.epochs, or more where train.phaseN.min_steps asks for them
    warmup_steps: int  # linear warm-up, then the cosine decay over total_steps

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole planned phase (the cosine schedule's length)."""
        return self.steps_per_epoch * self.epochs


def _set(value: float | None, key: str) -> float:
    """A phase key the caller must have filled (null means "the method's own": :func:`lpt.methods.own`)."""
    if value is None:
        raise ValueError(f"train.phaseN.{key} is null here: fill it with the method's own value first")
    return value


def phase_schedule(num_samples: int, cfg: PhaseConfig) -> PhaseSchedule:
    """The phase's schedule: whole epochs, at least ``cfg.epochs`` and at least ``cfg.min_steps`` steps.

    A small set gets few steps per epoch (1,236 images at batch 64: 20), so an epoch count alone leaves it
    under-trained; the step floor adds whole epochs until ``epochs x steps_per_epoch >= min_steps``. A large
    set, whose ``epochs`` already exceed the floor, is unchanged. Warm-up is ``warmup_steps`` when set, else
    ``warmup_epochs`` epochs, and never more than half of the phase.

    Args:
        num_samples: training images.
        cfg: the phase's ``train.phaseN`` section, its null keys filled with the method's own values
            (:func:`lpt.train.run` does it with :func:`lpt.methods.own`).

    Example:
        >>> s = phase_schedule(1236, PhaseConfig(epochs=2, batch_size=64, min_steps=300, warmup_epochs=1))
        >>> (s.steps_per_epoch, s.epochs, s.total_steps, s.warmup_steps)
        (20, 15, 300, 20)
    """
    full = steps_per_epoch(num_samples, cfg.batch_size)
    per_epoch = full if cfg.max_steps_per_epoch is None else min(cfg.max_steps_per_epoch, full)
    epochs = max(cfg.epochs, -(-cfg.min_steps // per_epoch))  # ceil
    if cfg.warmup_steps is not None:
        warmup = cfg.warmup_steps
    else:
        warmup = round(_set(cfg.warmup_epochs, "warmup_epochs") * per_epoch)
    return PhaseSchedule(full, per_epoch, epochs, min(warmup, per_epoch * epochs // 2))


def stopped_early(epochs_done: int, best_epoch: int, patience: int | None) -> bool:
    """Whether a phase stops: ``patience`` epochs have passed since the best validation accuracy.

    Args:
        epochs_done: epochs finished (1-based count).
        best_epoch: the epoch (1-based) of the best validation accuracy so far (< 1: none validated yet).
        patience: epochs without a new best before stopping; ``None`` never stops early.
    """
    return patience is not None and best_epoch >= 1 and epochs_done - best_epoch >= patience


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule: ``base_lr`` is quoted for batch 256."""
    return base_lr * batch_size / 256.0


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, warmup_lr: float,
                     min_lr: float = 0.0) -> float:
    """Learning rate used for optimizer step ``step`` (0-based).

    Linear warm-up from ``warmup_lr`` to ``peak_lr`` over ``warmup_steps`` steps, then a half cosine
    from ``peak_lr`` down to ``min_lr`` at ``total_steps``.
    """
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: PhaseConfig) -> torch.optim.SGD:
    """SGD with momentum over the parameters that require grad only (``cfg`` with its null keys filled).

    Raises:
        TrainError: the model has nothing to train.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainError("the model has no trainable parameters (check train.method and the phase)")
    return torch.optim.SGD(trainable, lr=scaled_lr(cfg.lr, cfg.batch_size), momentum=cfg.momentum,
                           weight_decay=_set(cfg.weight_decay, "weight_decay"))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    warmup_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule (:func:`warmup_cosine_lr`) relative to the optimizer's lr."""
    peak = optimizer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        return warmup_cosine_lr(step, total_steps, warmup_steps, peak, warmup_lr) / peak

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: str, amp: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on GPU for ``amp=auto``; nothing on CPU unless asked for."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    if amp == "off" or (amp == "auto" and device_type == "cpu"):
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device_type, dtype=dtype)
