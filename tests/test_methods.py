"""The method registry and what each method needs: logit-adjusted CE, class-balanced sampling, LIFT's adapters
(identity at start, gradients, checkpoint, class-mean head, ONNX parity)."""

from __future__ import annotations

import copy

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lpt.config import Params, TrainConfig
from lpt.losses import log_class_prior, logit_adjusted_loss, scaled_ce_loss
from lpt.methods import METHODS, get_method, phase_plan
from lpt.model.adapters import AdapterBeside, BottleneckAdapter, attach_adapters, default_adapter_dim
from lpt.model.lpt import create_lpt_model, load_trained_model, save_trained_model

from conftest import make_tiny_params

torch.set_num_threads(1)
C = 10


def _model(params: Params, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_lpt_model(params.model_copy(update={"train": params.train.model_copy(update={"method": method})}), C)


# --------------------------------------------------------------------------------------- registry
def test_registry_lists_every_method_once_with_its_recipe() -> None:
    assert list(METHODS) == ["linear_probe", "linear_probe_la", "linear_probe_cb", "vpt_deep", "vpt_deep_la", "lift",
                             "lpt_phase1", "lpt"]
    recipe = {n: (s.shared_prompt, s.group_pool, s.adapter, s.sampling, s.loss, s.head_init) for n, s in METHODS.items()}
    assert recipe["linear_probe_la"] == (False, False, False, "ib", "la", "random")
    assert recipe["linear_probe_cb"] == (False, False, False, "cb", "ce", "random")
    assert recipe["vpt_deep_la"] == (True, False, False, "ib", "la", "random")
    assert recipe["lift"] == (False, False, True, "ib", "la", "class_mean")
    assert recipe["lpt"] == (True, True, False, "dual", "agcl", "random")
    assert len({s.label for s in METHODS.values()}) == len(METHODS)
    # the params schema accepts exactly the registry's names
    assert all(TrainConfig(method=name).method == name for name in METHODS)
    assert [phase_plan(m, 1).streams for m in ("linear_probe", "linear_probe_cb", "lpt")] == [("ib",), ("cb",), ("cb", "ib")]
    assert not phase_plan("lift", 2).trains and phase_plan("lpt", 2).trains


# ------------------------------------------------------------------------------------ the LA loss
def test_logit_adjusted_loss_matches_hand_computation() -> None:
    # two classes with 3 and 1 training images: log prior = log(3/4), log(1/4)
    cos = torch.tensor([[0.5, 0.2], [0.1, 0.4]])
    y = torch.tensor([1, 0])
    scale, tau = 2.0, 1.0
    z = [[1.0 + math.log(0.75), 0.4 + math.log(0.25)], [0.2 + math.log(0.75), 0.8 + math.log(0.25)]]
    expected = -0.5 * (z[0][1] - math.log(math.exp(z[0][0]) + math.exp(z[0][1]))
                       + z[1][0] - math.log(math.exp(z[1][0]) + math.exp(z[1][1])))
    got = logit_adjusted_loss(cos, y, [3, 1], scale, tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(log_class_prior([3, 1]), torch.tensor([math.log(0.75), math.log(0.25)]))
    # tau = 0 is plain scaled CE; equal counts add a constant (no effect)
    assert logit_adjusted_loss(cos, y, [3, 1], scale, 0.0).item() == pytest.approx(scaled_ce_loss(cos, y, scale).item())
    assert logit_adjusted_loss(cos, y, [5, 5], scale, 1.0).item() == pytest.approx(scaled_ce_loss(cos, y, scale).item())
    with pytest.raises(ValueError, match="3 entries"):
        logit_adjusted_loss(cos, y, [1, 2, 3], scale, tau)


def test_logit_adjustment_pushes_the_rare_class_at_test_time() -> None:
    """Trained on the adjusted logits, the raw scores favour the rare class more than plain CE's do."""
    cos = torch.zeros(8, 2, requires_grad=True)
    y = torch.tensor([0] * 6 + [1] * 2)
    g_la = torch.autograd.grad(logit_adjusted_loss(cos, y, [6, 2], 2.0, 1.0), cos)[0]
    g_ce = torch.autograd.grad(scaled_ce_loss(cos, y, 2.0), cos)[0]
    # gradient descent raises the rare class's raw cosine more under LA than under CE (sum over the batch)
    assert -g_la[:, 1].sum() > -g_ce[:, 1].sum()


# ---------------------------------------------------------------------------------------- sampling
def test_class_balanced_method_draws_only_the_class_aware_stream(tiny_shards: Params, tmp_path: Path) -> None:
    from lpt.train.batches import build_samplers
    from lpt.train.step import StepContext, micro_batches
    from lpt.train.distributed import DistInfo

    labels = np.array([0] * 30 + [1] * 3)
    samplers = build_samplers(labels, per_rank_epoch=32, seed=0, rank=0, world_size=1, streams=("cb",),
                              samples_per_class=4)
    assert set(samplers) == {"cb"}
    drawn = labels[list(iter(samplers["cb"]))]
    assert abs(int((drawn == 1).sum()) - 16) <= 4  # balanced: about half the draws from the 3-image class
    ctx = StepContext(model=None, forward_model=None, optimizer=None, scheduler=None, scaler=None,
                      plan=phase_plan("linear_probe_cb", 1), loss_cfg=tiny_shards.loss, scale=20.0, class_counts=torch.ones(2),
                      device="cpu", amp="off", grad_accum=2, micro_batch=2, dist=DistInfo())
    x, y = torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    parts = micro_batches(ctx, {"cb": (x, y)}, ib_w=0.5)
    assert [(name, w, len(xb)) for name, w, xb, _ in parts] == [("cb", 1.0, 2), ("cb", 1.0, 2)]


# ---------------------------------------------------------------------------------------- adapters
def test_default_adapter_dim_is_lifts_rule() -> None:
    assert [default_adapter_dim(c, l) for c, l in ((100, 12), (100, 6), (10, 6), (1000, 12), (8142, 12))] == [4, 8, 1, 32, 256]


def test_adapters_start_as_identity_and_only_they_and_the_head_learn(tiny_params: Params) -> None:
    lift, probe = _model(tiny_params, "lift"), _model(tiny_params, "linear_probe")
    assert lift.backbone_fingerprint() == probe.backbone_fingerprint()  # same frozen weights, wrap or not
    assert all(isinstance(b.ls2, AdapterBeside) for b in lift.backbone.blocks)  # timm Block: after ls2
    assert lift.adapter_dim == default_adapter_dim(C, len(lift.backbone.blocks))
    probe.head.weight.data.copy_(lift.head.weight.data)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lift.eval(), probe.eval()
    assert torch.equal(lift(x).features, probe(x).features)  # up-projection starts at zero

    lift.train()
    out = lift(x)
    F.cross_entropy(20 * out.logits, torch.arange(4)).backward()
    grads = {n for n, p in lift.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n.split(".")[0] for n in grads} == {"adapters", "head"}
    assert all(not p.requires_grad for p in lift.backbone.parameters())
    d, r = lift.embed_dim, lift.adapter_dim
    report = lift.parameter_report()
    assert report["components"]["adapters"]["params"] == len(lift.backbone.blocks) * (2 * d * r + d + r + 1 + 2 * d)
    assert report["tuned_total"] == report["trainable"]


def test_adapter_is_registered_once_and_refuses_a_second_wrap(tiny_params: Params) -> None:
    lift = _model(tiny_params, "lift")
    names = [n for n, _ in lift.named_parameters() if "down.weight" in n]
    assert names == [f"adapters.{i}.down.weight" for i in range(len(lift.backbone.blocks))]
    with pytest.raises(ValueError, match="already has an adapter"):
        attach_adapters(lift.backbone.blocks, lift.embed_dim, 2)
    x = torch.randn(2, 5, 8)
    a = BottleneckAdapter(8, 2)
    with torch.no_grad():
        a.up.weight.fill_(0.5)
        a.scale.fill_(2.0)
        a.ln.weight.fill_(3.0)
    n = 3.0 * (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = 2.0 * (F.relu(n @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
    assert torch.allclose(a(x), expected, atol=1e-5)


@pytest.mark.parametrize("layer_scale", [None, 1e-3])
def test_adapter_reads_the_residual_and_adds_outside_the_layer_scale(layer_scale: float | None) -> None:
    """LIFT's AdaptFormer: x + ls2(mlp(norm2(x))) + adapter(x), x the residual after attention; a small
    layer scale (DeiT-III / DINOv2) scales the MLP branch only."""
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(16, 2, init_values=layer_scale).eval()
    frozen = copy.deepcopy(block)
    (a,) = attach_adapters([block], 16, 4)
    with torch.no_grad():
        a.up.weight.normal_(0, 0.5)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        mid = x + frozen.ls1(frozen.attn(frozen.norm1(x)))  # the residual the adapter reads
        want = mid + frozen.ls2(frozen.mlp(frozen.norm2(mid))) + a(mid)
        got = block(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert a(mid).abs().mean() > 10 * (want - mid - a(mid)).abs().mean() if layer_scale else True


def test_a_block_without_a_layer_scale_module_gets_the_adapter_inside_its_mlp() -> None:
    from torch import nn

    class NoLs(nn.Module):  # Eva-like: norm2 + mlp, a bare gamma_2 (None) instead of an ls2 module
        def __init__(self) -> None:
            super().__init__()
            self.norm2, self.mlp, self.gamma_2 = nn.LayerNorm(8), nn.Linear(8, 8), None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.mlp(self.norm2(x))

    torch.manual_seed(0)
    block = NoLs()
    frozen = copy.deepcopy(block)
    (a,) = attach_adapters([block], 8, 2)
    assert isinstance(block.mlp, AdapterBeside)
    with torch.no_grad():
        a.up.weight.normal_(0, 0.5)
        x = torch.randn(3, 4, 8)
        torch.testing.assert_close(block(x), x + frozen.mlp(frozen.norm2(x)) + a(x), rtol=0, atol=1e-6)


def test_lift_checkpoint_round_trip(tiny_params: Params, tmp_path: Path) -> None:
    params = make_tiny_params(tmp_path, train__method="lift", model__adapter_dim=3)
    torch.manual_seed(0)
    model = create_lpt_model(params, C)
    with torch.no_grad():
        for a in model.adapters:
            a.up.weight.normal_(0, 0.1)
    save_trained_model(model, tmp_path / "models" / "phase2", {"class_counts": [1] * C})
    torch.manual_seed(0)  # backbone.weights none: the same random backbone
    loaded, meta = load_trained_model(params)
    assert meta["model_config"]["adapter_dim"] == 3 and loaded.adapter_dim == 3
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-6)
    torch.manual_seed(0)
    plain = create_lpt_model(make_tiny_params(tmp_path, train__method="linear_probe"), C).eval()
    assert not torch.allclose(model(x).features, plain(x).features)  # the trained adapters change the features


def test_class_mean_head_init(tiny_shards: Params, tmp_path: Path) -> None:
    """LIFT's head starts at each class's mean frozen feature, L2-normalised (as LIFT: a raw mean's length would
    slow its SGD turns by |w|^2), checked against an independent computation."""
    from lpt.data.reader import ShardImages, build_transform
    from lpt.train.batches import load_phase_data
    from lpt.train.run import init_head_from_class_means

    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir), train__method="lift")
    torch.manual_seed(0)
    model = create_lpt_model(params, C)
    data = load_phase_data(params)
    counts = init_head_from_class_means(model, data, batch_size=7)
    assert counts.tolist() == data.class_counts
    images = ShardImages(params.data.out_dir, "train")
    tf = build_transform(params.transforms, train=False)
    model.eval()
    with torch.no_grad():
        feats = model(torch.stack([tf(images[i][0]) for i in range(len(images))])).features
    labels = torch.tensor(images.labels)
    for c in range(C):
        mean = feats[labels == c].mean(0)
        assert torch.allclose(model.head.weight[c], mean / mean.norm(), atol=1e-5)
        assert model.head.weight[c].norm().item() == pytest.approx(1.0, abs=1e-5)


def test_a_unit_norm_head_turns_measurably_where_a_raw_class_mean_head_barely_moves() -> None:
    """Why the class means are normalised: an SGD step turns a cosine head's row by about lr / |w|^2, so rows
    of LIFT's length 1 move by a measurable angle in a few steps, rows of a raw mean's length (~11.5 on the
    embedded backbone) ~130 times less."""
    from lpt.model.lpt import CosineHead

    gen = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(64, 16, generator=gen), torch.arange(64) % 4
    means = torch.stack([feats[labels == c].mean(0) for c in range(4)])
    turned = {}
    for length in (1.0, 11.5):
        head = CosineHead(16, 4)
        with torch.no_grad():
            head.weight.copy_(F.normalize(means, dim=1) * length)
        start = head.weight.detach().clone()
        opt = torch.optim.SGD(head.parameters(), lr=0.0025, momentum=0.9)  # LIFT's 0.01 at batch 64 of 256
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(25.0 * head(feats), labels).backward()  # LIFT's scale
            opt.step()
        turned[length] = torch.rad2deg(torch.arccos(F.cosine_similarity(start, head.weight.detach()).clamp(-1, 1))).mean()
    assert turned[1.0] > 1.0  # degrees, in 5 steps (2.2 here)
    assert turned[1.0] > 50 * turned[11.5]


def _trained_lift(shards: Params, root: Path) -> Params:
    from lpt.train import run_phase

    params = make_tiny_params(root, data__out_dir=str(shards.data.out_dir), train__method="lift")
    run_phase(params, 1)
    run_phase(params, 2)  # copies phase 1 as final
    return params


def test_lift_trains_evaluates_and_exports_with_parity(tiny_shards: Params, tmp_path: Path) -> None:
    """The adapters are part of the ONNX graph: ORT matches torch on the test split, through the gate."""
    from lpt.evaluate import run_evaluate
    from lpt.export import run_export
    from lpt.utils import seed_everything

    params = _trained_lift(tiny_shards, tmp_path)
    result = run_evaluate(params)
    assert result.gate_passed and result.metrics["trainable_params"] > C * 48
    seed_everything(params.seed)
    model, _ = load_trained_model(params)
    assert any(a.up.weight.abs().sum() > 0 for a in model.adapters)  # trained: the graph must carry them
    exported = run_export(params)
    assert exported.top1_agreement == 1.0 and exported.max_abs_diff < 1e-4
    assert exported.torch_correct == exported.ort_correct


@pytest.mark.slow
def test_lift_dynamo_export_parity(tiny_shards: Params, tmp_path: Path) -> None:
    import onnxruntime as ort

    from lpt.export import export_onnx
    from lpt.utils import seed_everything

    params = _trained_lift(tiny_shards, tmp_path)
    seed_everything(params.seed)
    model, _ = load_trained_model(params)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    path = export_onnx(model, tmp_path / "dynamo.onnx", dynamo=True, optimize=True)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.inference_mode():
        assert np.abs(got - model(x).logits.numpy()).max() < 1e-4
