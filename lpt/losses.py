"""Losses: A-GCL (asymmetric Gaussian-cloud logit loss), plain and logit-adjusted scaled-cosine CE, dual-stream weight.

A-GCL (``agcl_loss``), for raw cosine logits c [B, C], labels y [B] and training counts n [C]:
    1. cloud size   eps_j = (log n_max - log n_j) / (log n_max - log n_min)   (0 when all counts are equal)
    2. noise        delta_ij = |clip(N(0, noise_std), -1, 1)|   per sample and class, every call (train)
    3. cloud        c~_ij = c_ij - noise_mul * delta_ij * eps_j   for every class
    4. margin m on the target entry, scale s:  p = softmax(s * (c~ - m * onehot(y)))
    5. targets      t_j = (1 - ls) * [j = y] + ls / C
       focusing     w_y = (1 - p_y)^gamma_pos, w_j = p_j^gamma_neg (j != y), not detached
       loss         -sum_j t_j * w_j * log p_j, batch mean
Logit-adjusted CE (``logit_adjusted_loss``, Menon et al., ICLR 2021, the loss form with tau):
    CE(s * c + tau * log(pi), y),  pi_j = n_j / sum(n)   (training only; prediction stays argmax of c)
The key-matching term and the CB/IB combination are assembled by the training loop:
    L = agcl(CB) - key_weight * sim_cb + w(e) * (agcl(IB) - key_weight * sim_ib),  w(e) = ib_stream_weight(e, E)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lpt.config import LossConfig

__all__ = ["cloud_sizes", "cloud_noise", "agcl_loss", "scaled_ce_loss", "log_class_prior", "logit_adjusted_loss",
           "ib_stream_weight", "FOCUS_EPS"]

# (1 - p_y)^gamma has derivative gamma * (1 - p_y)^(gamma - 1): infinite at p_y = 1 for gamma < 1, and
# 0 * inf = NaN for gamma = 0. The base is clamped to this floor (its gradient below it is cut).
FOCUS_EPS = 1e-6


def cloud_sizes(class_counts: Sequence[int] | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-class cloud size eps_j in [0, 1]: 0 for the largest class, 1 for the rarest.

    Args:
        class_counts: training images per class [C]; zeros are treated as 1 (log 0 is undefined).
        device: where to put the result.

    Returns:
        [C] float32. All counts equal -> all zeros (the 0/0 case of the formula).
    """
    n = torch.as_tensor(class_counts, dtype=torch.float64, device=device).clamp_min(1.0)
    log_n = n.log()
    span = log_n.max() - log_n.min()
    if float(span) == 0.0:
        return torch.zeros_like(n, dtype=torch.float32)
    return ((log_n.max() - log_n) / span).to(torch.float32)


def cloud_noise(shape: torch.Size | tuple[int, ...], std: float, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Half-normal noise |clip(N(0, std), -1, 1)| of ``shape`` (float32)."""
    z = torch.randn(shape, device=device, generator=generator) * std
    return z.clamp(-1.0, 1.0).abs()


def agcl_loss(
    cos_logits: torch.Tensor,
    target: torch.Tensor,
    class_counts: Sequence[int] | torch.Tensor,
    gamma_pos: float,
    gamma_neg: float,
    cfg: LossConfig,
    noise: torch.Tensor | None = None,
    *,
    train: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """A-GCL loss (see the module docstring), batch mean.

    Args:
        cos_logits: [B, C] raw cosine logits (any float dtype; computed in float32).
        target: [B] int64 labels.
        class_counts: [C] training images per class.
        gamma_pos: focusing exponent on the target (0 on the CB stream, 0.5 on IB).
        gamma_neg: focusing exponent on non-targets (4 on CB, 8 on IB).
        cfg: the ``loss`` params section (scale, margin, noise_mul, noise_std, label_smoothing).
        noise: [B, C] fixed delta (tests); None draws fresh half-normal noise when ``train``.
        train: False disables the cloud noise (validation loss); the margin stays.
        scale: s; None = ``cfg.scale`` (null there means the method's own: pass it here).

    Returns:
        Scalar loss.
    """
    c = cos_logits.float()  # [B, C]
    batch, num_classes = c.shape
    eps = cloud_sizes(class_counts, device=c.device)  # [C]
    if eps.numel() != num_classes:
        raise ValueError(f"class_counts has {eps.numel()} entries but the logits have {num_classes} classes")
    if noise is None:
        noise = cloud_noise(c.shape, cfg.noise_std, device=c.device) if train else torch.zeros_like(c)
    c = c - cfg.noise_mul * noise.to(c) * eps.unsqueeze(0)  # [B, C] cloud on every class
    onehot = F.one_hot(target.long(), num_classes).to(c.dtype)  # [B, C] (float: runs on any device)
    s = scale if scale is not None else cfg.scale
    if s is None:
        raise ValueError("loss.scale is null: pass the method's own scale (lpt.methods.own)")
    logits = s * (c - cfg.margin * onehot)  # [B, C]
    log_p = F.log_softmax(logits, dim=-1)
    p = log_p.exp()
    # 1 - p_y as the sum of the other probabilities: exact where p_y rounds to 1 in float32.
    one_minus_py = (p * (1.0 - onehot)).sum(dim=-1, keepdim=True)  # [B, 1]
    w_pos = one_minus_py.clamp_min(FOCUS_EPS).pow(gamma_pos)  # [B, 1]
    w_neg = p.clamp_min(FOCUS_EPS).pow(gamma_neg)  # [B, C]
    w = onehot * w_pos + (1.0 - onehot) * w_neg  # [B, C]
    ls = cfg.label_smoothing
    t = (1.0 - ls) * onehot + ls / num_classes  # [B, C]
    return -(t * w * log_p).sum(dim=-1).mean()


def scaled_ce_loss(cos_logits: torch.Tensor, target: torch.Tensor, scale: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Plain cross-entropy on ``scale * cosine`` (``vpt_deep`` and ``linear_probe``), batch mean."""
    return F.cross_entropy(scale * cos_logits.float(), target.long(), label_smoothing=label_smoothing)


def log_class_prior(class_counts: Sequence[int] | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """log(n_j / sum n) per class [C] (float32); empty classes count as 1 image (log 0 is undefined)."""
    n = torch.as_tensor(class_counts, dtype=torch.float64, device=device).clamp_min(1.0)
    return (n / n.sum()).log().to(torch.float32)


def logit_adjusted_loss(cos_logits: torch.Tensor, target: torch.Tensor, class_counts: Sequence[int] | torch.Tensor,
                        scale: float, tau: float) -> torch.Tensor:
    """Logit-adjusted cross-entropy: ``CE(scale * cosine + tau * log prior, y)``, batch mean.

    Adding the log prior during training makes the rare classes' raw scores carry a margin of
    ``tau * log(n_max / n_j)`` over the frequent ones; at test time the raw cosine is used unchanged, which
    is the balanced-error (Bayes) classifier for tau = 1 (Menon et al., ICLR 2021).

    Args:
        cos_logits: [B, C] raw cosine logits (computed in float32).
        target: [B] int64 labels.
        class_counts: [C] training images per class (the prior).
        scale: the cosine scale ``loss.scale``.
        tau: ``loss.la_tau``; 0 is plain :func:`scaled_ce_loss`.

    Returns:
        Scalar loss.
    """
    c = cos_logits.float()  # [B, C]
    prior = log_class_prior(class_counts, device=c.device)  # [C]
    if prior.numel() != c.shape[1]:
        raise ValueError(f"class_counts has {prior.numel()} entries but the logits have {c.shape[1]} classes")
    return F.cross_entropy(scale * c + tau * prior.unsqueeze(0), target.long())


def ib_stream_weight(epoch: int, epochs: int, ib_weight: float = 0.5) -> float:
    """Weight of the instance-balanced stream at 0-based ``epoch`` of ``epochs``: max(0, w0 (E - e) / E)."""
    if epochs <= 0:
        return 0.0
    return max(0.0, ib_weight * (epochs - epoch) / epochs)

