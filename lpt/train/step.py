"""One optimizer step: the CB (and IB) batch in ``grad_accum`` micro-batches, one backward each.

``loss = AGCL_cb - kw*sim_cb + w(e) * (AGCL_ib - kw*sim_ib)``; the key-matching term exists in phase 2
only (``sim`` is 0 without a pool, and phase 1 does not read ``loss.key_weight``). The CE and
logit-adjusted CE methods train on their one stream (instance-balanced or class-aware, :class:`PhasePlan`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lpt.config import LossConfig
from lpt.losses import agcl_loss, logit_adjusted_loss, scaled_ce_loss
from lpt.methods import PhasePlan
from lpt.train.distributed import DistInfo
from lpt.errors import TrainError
from lpt.optim import autocast

__all__ = ["StepContext", "micro_batches", "stream_loss", "train_step"]

Batches = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepContext:
    """What a step needs: the model (and its DDP/compiled wrapper), optimizer, schedule and loss setup."""

    model: nn.Module
    forward_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    plan: PhasePlan
    loss_cfg: LossConfig
    scale: float  # loss.scale, or the method's own when null (lpt.methods.own)
    class_counts: torch.Tensor
    device: str
    amp: str
    grad_accum: int
    micro_batch: int
    dist: DistInfo


def micro_batches(ctx: StepContext, batches: Batches, ib_w: float) -> list[tuple[str, float, torch.Tensor, torch.Tensor]]:
    """``(stream, weight, x, y)`` per micro-batch; the IB stream is skipped when its weight is 0."""
    weights = {"cb": 1.0, "ib": ib_w} if ctx.plan.dual_sampling else {ctx.plan.streams[0]: 1.0}
    parts = []
    for name, weight in weights.items():
        if weight <= 0 or name not in batches:
            continue
        x, y = batches[name]
        for j in range(ctx.grad_accum):
            sl = slice(j * ctx.micro_batch, (j + 1) * ctx.micro_batch)
            parts.append((name, weight, x[sl], y[sl]))
    return parts


def stream_loss(ctx: StepContext, out: Any, target: torch.Tensor, stream: str) -> torch.Tensor:
    """A-GCL with the stream's focusing exponents (minus the key term in phase 2), scaled CE or logit-adjusted CE."""
    lcfg = ctx.loss_cfg
    logits = out.logits.float()
    if ctx.plan.loss == "ce":
        return scaled_ce_loss(logits, target, ctx.scale)
    if ctx.plan.loss == "la":
        return logit_adjusted_loss(logits, target, ctx.class_counts, ctx.scale, lcfg.la_tau)
    gp, gn = (lcfg.gamma_pos_cb, lcfg.gamma_neg_cb) if stream == "cb" else (lcfg.gamma_pos_ib, lcfg.gamma_neg_ib)
    loss = agcl_loss(logits, target, ctx.class_counts, gp, gn, lcfg, scale=ctx.scale)
    if ctx.plan.phase == 2:
        loss = loss - lcfg.key_weight * out.sim
    return loss


def train_step(ctx: StepContext, batches: Batches, ib_w: float, global_step: int) -> float:
    """One optimizer step; gradients of the streams accumulate; under DDP only the last backward syncs.

    Returns:
        The step's loss (sum over micro-batches of their weighted share).

    Raises:
        TrainError: the loss is not finite.
    """
    parts = micro_batches(ctx, batches, ib_w)
    ctx.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, (name, weight, x, y) in enumerate(parts):
        last = i == len(parts) - 1
        sync = contextlib.nullcontext() if last or not ctx.dist.enabled else ctx.forward_model.no_sync()
        with sync:
            with autocast(ctx.device, ctx.amp):
                out = ctx.forward_model(x.to(ctx.device, non_blocking=True))
            loss = stream_loss(ctx, out, y.to(ctx.device, non_blocking=True), name) * (weight / ctx.grad_accum)
            (ctx.scaler.scale(loss) if ctx.scaler is not None else loss).backward()
        total += float(loss.detach())
    if not math.isfinite(total):
        raise TrainError(f"loss is {total} at step {global_step} (phase {ctx.plan.phase}); "
                         f"lower train.phase{ctx.plan.phase}.lr or check the data")
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    ctx.scheduler.step()
    return total
