"""A-GCL and the plain CE path: hand-computed values, numerics at the edges, device-agnostic maths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lpt.config import LossConfig
from lpt.losses import agcl_loss, cloud_noise, cloud_sizes, ib_stream_weight, scaled_ce_loss


def _agcl_by_hand(cos, y, counts, noise, gp, gn, s=20.0, m=0.1, mul=0.5, ls=0.1):
    """The spec's formula for one sample, in plain python floats."""
    logs = [math.log(n) for n in counts]
    eps = [(max(logs) - lg) / (max(logs) - min(logs)) for lg in logs]
    c = [cos[j] - mul * noise[j] * eps[j] for j in range(len(cos))]
    c[y] -= m
    z = [s * v for v in c]
    denom = sum(math.exp(v) for v in z)
    p = [math.exp(v) / denom for v in z]
    num = len(cos)
    total = 0.0
    for j in range(num):
        t = (1 - ls) * (j == y) + ls / num
        w = (1 - p[y]) ** gp if j == y else p[j] ** gn
        total += t * w * math.log(p[j])
    return -total


def test_agcl_matches_hand_computed_three_class_example() -> None:
    counts = [100, 10, 1]  # eps = 0, 0.5, 1
    cos = [[0.5, 0.2, -0.1], [0.1, 0.3, 0.25]]
    labels = [1, 0]
    noise = [[0.3, 0.6, 0.9], [0.05, 0.4, 0.7]]
    cfg = LossConfig(scale=20.0)
    for gp, gn in [(0.0, 4.0), (0.5, 8.0), (1.0, 1.0)]:
        expected = sum(_agcl_by_hand(cos[i], labels[i], counts, noise[i], gp, gn) for i in range(2)) / 2
        got = agcl_loss(torch.tensor(cos), torch.tensor(labels), counts, gp, gn, cfg, noise=torch.tensor(noise))
        assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (gp, gn)


def test_first_sample_numbers_spelled_out() -> None:
    """c~ = [0.5, 0.05 - 0.1, -0.55] -> z = [10, -1, -11] for the first example sample (gammas 0/0 -> smoothed CE)."""
    z = [10.0, -1.0, -11.0]
    lse = math.log(sum(math.exp(v) for v in z))
    t = [0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3]
    expected = -sum(tj * (zj - lse) for tj, zj in zip(t, z))
    got = agcl_loss(torch.tensor([[0.5, 0.2, -0.1]]), torch.tensor([1]), [100, 10, 1], 0.0, 0.0, LossConfig(scale=20.0),
                    noise=torch.tensor([[0.3, 0.6, 0.9]]))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_equal_counts_give_zero_cloud_and_no_noise_effect() -> None:
    assert torch.equal(cloud_sizes([7, 7, 7]), torch.zeros(3))
    cos = torch.tensor([[0.2, -0.3, 0.9, 0.0]])
    y = torch.tensor([2])
    cfg = LossConfig(scale=20.0)
    with_noise = agcl_loss(cos, y, [5] * 4, 0.5, 8.0, cfg)  # random noise drawn
    without = agcl_loss(cos, y, [5] * 4, 0.5, 8.0, cfg, noise=torch.zeros(1, 4))
    assert torch.isfinite(with_noise) and with_noise.item() == pytest.approx(without.item())


def test_cloud_sizes_range_and_noise_is_half_normal_clipped() -> None:
    eps = cloud_sizes([500, 50, 5])
    assert eps.tolist() == pytest.approx([0.0, 0.5, 1.0])
    torch.manual_seed(0)
    d = cloud_noise((2000, 10), std=1.0)
    assert d.min() >= 0 and d.max() <= 1.0 and (d == 1.0).any()  # clipped at 1 with std 1
    d = cloud_noise((20000,), std=1 / 3)
    assert d.mean().item() == pytest.approx((1 / 3) * math.sqrt(2 / math.pi), rel=0.05)  # half-normal mean


def test_noise_fresh_each_call_in_train_and_off_in_eval() -> None:
    cos = torch.rand(8, 5) * 2 - 1
    y = torch.randint(0, 5, (8,))
    counts = [100, 50, 20, 10, 2]
    cfg = LossConfig(scale=20.0)
    a, b = agcl_loss(cos, y, counts, 0.0, 4.0, cfg), agcl_loss(cos, y, counts, 0.0, 4.0, cfg)
    assert a.item() != b.item()
    e1 = agcl_loss(cos, y, counts, 0.0, 4.0, cfg, train=False)
    e2 = agcl_loss(cos, y, counts, 0.0, 4.0, cfg, noise=torch.zeros(8, 5))
    assert e1.item() == e2.item()


def test_no_nan_gradients_when_target_probability_saturates() -> None:
    # target cosine 1, others -1: p_y rounds to exactly 1.0 in float32 with a large scale.
    cfg = LossConfig(scale=100.0)
    cos = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    assert torch.softmax(100 * (cos.detach() - 0.1 * F.one_hot(y, 3)), -1).max() == 1.0
    loss = agcl_loss(cos, y, [10, 10, 1], 0.5, 8.0, cfg, noise=torch.zeros(2, 3))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(cos.grad).all()


def test_focusing_weights_carry_gradient() -> None:
    """Not detached: the loss with gamma_pos > 0 has a different gradient than its weights-held-fixed version."""
    cfg = LossConfig(scale=20.0)
    cos = torch.tensor([[0.3, 0.1, -0.2]], requires_grad=True)
    y = torch.tensor([0])
    agcl_loss(cos, y, [10, 5, 1], 2.0, 0.0, cfg, noise=torch.zeros(1, 3)).backward()
    g_full = cos.grad.clone()
    # same loss with the target weight as a constant
    c = cos.detach().clone().requires_grad_(True)
    logits = cfg.scale * (c - cfg.margin * F.one_hot(y, 3))
    log_p = F.log_softmax(logits, -1)
    w = torch.ones(1, 3)
    w[0, 0] = (1 - log_p.exp()[0, 0]).detach() ** 2
    t = 0.9 * F.one_hot(y, 3) + 0.1 / 3
    (-(t * w * log_p).sum()).backward()
    assert not torch.allclose(g_full, c.grad)


def test_bf16_logits_accepted_and_float32_result() -> None:
    cos = (torch.rand(4, 6) * 2 - 1).to(torch.bfloat16)
    loss = agcl_loss(cos, torch.tensor([0, 1, 2, 3]), [60, 30, 10, 5, 2, 1], 0.5, 8.0, LossConfig(scale=20.0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_scaled_ce_and_ib_weight() -> None:
    cos = torch.tensor([[0.2, -0.1, 0.4]])
    y = torch.tensor([2])
    z = [4.0, -2.0, 8.0]
    expected = -(z[2] - math.log(sum(math.exp(v) for v in z)))
    assert scaled_ce_loss(cos, y, 20.0).item() == pytest.approx(expected, rel=1e-5)
    assert [ib_stream_weight(e, 4) for e in range(5)] == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0])
