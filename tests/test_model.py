"""The LPT model layer: frozen backbone, prompts, phases, block reuse, parameter counts, weights I/O."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lpt.config import Params
from lpt.losses import agcl_loss
from lpt.model.backbone import (
    BackboneError,
    backbone_fingerprint,
    create_backbone,
    save_backbone,
)
from lpt.model.lpt import LPTModel, create_lpt_model, load_trained_model, save_trained_model

torch.set_num_threads(1)
C = 10  # classes of the tiny config
COUNTS = [40, 30, 20, 14, 10, 8, 6, 5, 4, 4]


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _model(params: Params, method: str = "lpt", phase: int = 1) -> LPTModel:
    torch.manual_seed(0)  # the same random backbone every call
    return create_lpt_model(params.model_copy(update={"train": params.train.model_copy(update={"method": method})}), C,
                            phase=phase)


def _grads(model: nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------------- backbone
def test_backbone_is_frozen_without_dropout_and_eps_knob(tiny_params: Params) -> None:
    cfg = tiny_params.backbone.model_copy(update={"ln_eps": 1e-5})
    bb = create_backbone(cfg)
    assert all(not p.requires_grad for p in bb.parameters())
    norms = [m for m in bb.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * len(bb.blocks) + 1 and all(m.eps == 1e-5 for m in norms)
    assert all(m.p == 0 for m in bb.modules() if isinstance(m, nn.Dropout))
    with pytest.raises(BackboneError, match="drop_path_rate"):
        create_backbone(cfg.model_copy(update={"timm_kwargs": {**cfg.timm_kwargs, "drop_path_rate": 0.1}}))


def test_weights_roundtrip_safetensors_pth_and_fingerprint(tiny_params: Params, tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = create_backbone(tiny_params.backbone)
    st = save_backbone(src, tmp_path / "bb.safetensors")
    pth = tmp_path / "bb.pth"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, pth)
    x = _images(2)
    for path in (st, pth):
        torch.manual_seed(2)  # a different random init that the file must overwrite
        bb = create_backbone(tiny_params.backbone.model_copy(update={"weights": str(path)}))
        assert backbone_fingerprint(bb) == backbone_fingerprint(src)
        torch.testing.assert_close(bb.forward_features(x), src.forward_features(x))
    torch.manual_seed(3)
    assert backbone_fingerprint(create_backbone(tiny_params.backbone)) != backbone_fingerprint(src)


def _write_jax_npz(model: nn.Module, path: Path) -> None:
    """Write a timm ViT in the Google JAX .npz layout (the inverse of timm's _load_weights)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d, heads = model.embed_dim, model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for name, wt, bs in zip(("query", "key", "value"), qkv_w, qkv_b):
            w[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = wt.T.reshape(d, heads, d // heads)
            w[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = bs.reshape(heads, d // heads)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = (
            sd[b + "attn.proj.weight"].reshape(d, heads, d // heads).transpose(1, 2, 0))
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_weights_npz_roundtrip(tiny_params: Params, tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = create_backbone(tiny_params.backbone)
    _write_jax_npz(src, tmp_path / "bb.npz")
    torch.manual_seed(2)
    bb = create_backbone(tiny_params.backbone.model_copy(update={"weights": str(tmp_path / "bb.npz")}))
    x = _images(2)
    torch.testing.assert_close(bb.forward_features(x), src.forward_features(x), rtol=1e-5, atol=1e-5)


def test_shape_mismatch_names_the_tensor(tiny_params: Params, tmp_path: Path) -> None:
    kw = dict(tiny_params.backbone.timm_kwargs)
    wide = create_backbone(tiny_params.backbone.model_copy(update={"timm_kwargs": {**kw, "embed_dim": 96}}))
    save_backbone(wide, tmp_path / "wide.safetensors")
    _write_jax_npz(wide, tmp_path / "wide.npz")
    for name in ("wide.safetensors", "wide.npz"):
        cfg = tiny_params.backbone.model_copy(update={"weights": str(tmp_path / name)})
        with pytest.raises(BackboneError, match=r"tensor '[\w.]+' has shape \(.*96.*\) in the checkpoint but \(.*48.*\)"):
            create_backbone(cfg)


def test_missing_files_and_offline_hub_give_clear_errors(tiny_params: Params, tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="nope.safetensors"):
        create_backbone(tiny_params.backbone.model_copy(update={"weights": str(tmp_path / "nope.safetensors")}))
    with pytest.raises(BackboneError, match="pretrain"):
        create_backbone(tiny_params.backbone.model_copy(update={"weights": "pretrain"}))
    with pytest.raises(BackboneError, match="local file"):
        create_backbone(tiny_params.backbone.model_copy(update={"name": "vit_tiny_patch16_224", "weights": "hub"}))


def test_pos_embed_resampled_for_another_image_size(tiny_params: Params, tmp_path: Path) -> None:
    src = create_backbone(tiny_params.backbone)  # 32 px, patch 8 -> 4x4 grid
    save_backbone(src, tmp_path / "bb.safetensors")
    kw = {**tiny_params.backbone.timm_kwargs, "img_size": 64}
    bb = create_backbone(tiny_params.backbone.model_copy(update={"weights": str(tmp_path / "bb.safetensors"),
                                                                  "timm_kwargs": kw}))
    assert bb.pos_embed.shape[1] == 1 + 64 and torch.isfinite(bb.forward_features(torch.randn(1, 3, 64, 64))).all()


# -------------------------------------------------------------------------------------------- model
def test_phase1_matches_handwritten_vpt_deep_and_cls_pooling(tiny_params: Params) -> None:
    model = _model(tiny_params).eval()
    x = _images(3)
    bb, prompt = model.backbone, model.shared_prompt.prompt
    h = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(x))))
    n = h.shape[1]
    for i, blk in enumerate(bb.blocks):  # [CLS, patches, prompt_i] -> drop prompt outputs
        h = blk(torch.cat([h, prompt[i].expand(3, -1, -1)], 1))[:, :n]
    expected = bb.norm(h)[:, 0]
    out = model(x)
    assert out.features.shape == (3, model.embed_dim) and out.logits.shape == (3, C)
    torch.testing.assert_close(out.features, expected)
    assert out.logits.abs().max() <= 1 + 1e-6 and out.selected is None and float(out.sim) == 0.0


def test_linear_probe_feature_is_timm_cls_feature(tiny_params: Params) -> None:
    model = _model(tiny_params, "linear_probe").eval()
    x = _images(2)
    torch.testing.assert_close(model(x).features, model.backbone.forward_head(model.backbone.forward_features(x),
                                                                             pre_logits=True))
    assert model.shared_prompt is None and model.parameter_report()["trainable"] == C * model.embed_dim


def test_phase1_gradients_reach_prompt_and_head_only(tiny_params: Params) -> None:
    model = _model(tiny_params).train()
    out = model(_images())
    (agcl_loss(out.logits, torch.arange(6) % C, COUNTS, 0.5, 8.0, tiny_params.loss, scale=20.0) - 0.5 * out.sim).backward()
    got = _grads(model)
    assert not any(v for k, v in got.items() if k.startswith("backbone."))
    assert got["shared_prompt.prompt"] and got["head.weight"]
    assert model.group_pool is None and not any(k.startswith("group_pool.") for k in got)  # built in phase 2


def test_phase1_model_does_not_depend_on_phase2_knobs(tiny_params: Params) -> None:
    """Every component has its own seeded generator and the pool is built in phase 2 only, so neither the
    pool's size nor its existence changes a phase-1 tensor; the pool itself depends on the seed only."""
    def first(params: Params) -> dict[str, torch.Tensor]:
        return _model(params).trainable_state_dict()

    other_pool = tiny_params.model.model_copy(update={"pool_size": 7, "top_k": 3, "shared_blocks": 1})
    a = first(tiny_params)
    b = first(tiny_params.model_copy(update={"model": other_pool}))
    assert a.keys() == b.keys() == {"shared_prompt.prompt", "head.weight"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    pools = []
    for global_seed in (1, 2):  # the global RNG (which draws the random backbone) plays no part in the pool
        torch.manual_seed(global_seed)
        pools.append(create_lpt_model(tiny_params, C, phase=2).group_pool.prompts.detach().clone())
    assert torch.equal(pools[0], pools[1])
    reseeded = tiny_params.model_copy(update={"seed": 1})
    assert not torch.equal(first(reseeded)["head.weight"], a["head.weight"])


def test_phase2_freezes_shared_prompt_and_keeps_head(tiny_params: Params) -> None:
    phase1 = _model(tiny_params)
    model = _model(tiny_params, phase=2).train()
    # the phase-1 components start alike in both phases (each draws from its own generator)
    assert torch.equal(model.head.weight, phase1.head.weight)
    assert torch.equal(model.shared_prompt.prompt, phase1.shared_prompt.prompt)
    assert phase1.group_pool is None and model.group_pool is not None
    out = model(_images())
    assert out.selected.shape == (6, tiny_params.model.top_k) and out.selected.dtype == torch.int64
    (agcl_loss(out.logits, torch.arange(6) % C, COUNTS, 0.0, 4.0, tiny_params.loss, scale=20.0) - 0.5 * out.sim).backward()
    got = _grads(model)
    assert not any(v for k, v in got.items() if k.startswith("backbone."))
    assert not got["shared_prompt.prompt"]
    assert got["group_pool.prompts"] and got["group_pool.keys"] and got["head.weight"]
    with pytest.raises(ValueError, match="phase 2"):
        _model(tiny_params, "vpt_deep", phase=2)


def test_keys_learn_only_from_the_matching_term(tiny_params: Params) -> None:
    model = _model(tiny_params, phase=2).train()
    out = model(_images())
    agcl_loss(out.logits, torch.arange(6) % C, COUNTS, 0.5, 8.0, tiny_params.loss, scale=20.0).backward(retain_graph=True)
    assert model.group_pool.keys.grad is None and model.group_pool.prompts.grad is not None
    model.zero_grad(set_to_none=True)
    out.sim.backward()
    assert model.group_pool.keys.grad.abs().sum() > 0 and model.group_pool.prompts.grad is None
    assert model.head.weight.grad is None


@pytest.mark.parametrize("shared_blocks", [0, 2, 3])
def test_block_reuse_equals_two_passes(tiny_params: Params, shared_blocks: int) -> None:
    params = tiny_params.model_copy(update={"model": tiny_params.model.model_copy(update={"shared_blocks": shared_blocks})})
    model = _model(params, phase=2).eval()
    with torch.no_grad():  # make the pool non-trivial so selection matters
        model.group_pool.prompts.normal_(0, 0.5)
        model.group_pool.keys.normal_(0, 1.0)
    x = _images(8)
    fast, ref = model(x), model.forward_two_pass(x)
    assert torch.equal(fast.selected, ref.selected)
    torch.testing.assert_close(fast.logits, ref.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.features, ref.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.sim, ref.sim)
    # the query really is the phase-1 feature: selection follows the phase-1 CLS
    q = _model(params).eval()(x).features  # the phase-1 model: the same backbone and shared prompt
    keys = torch.nn.functional.normalize(model.group_pool.keys, dim=-1)
    expected_sel = (torch.nn.functional.normalize(q, dim=-1) @ keys.t()).topk(params.model.top_k, 1).indices
    assert torch.equal(fast.selected, expected_sel)


def test_parameter_count_matches_formula(tiny_params: Params) -> None:
    m = tiny_params.model
    model = _model(tiny_params)
    L, T, D, P, S = len(model.backbone.blocks), m.prompt_length, model.embed_dim, m.pool_size, m.shared_blocks
    rep = model.parameter_report()
    assert rep["tuned_total"] == L * T * D + C * D  # phase 1: no pool yet
    assert rep["trainable"] == L * T * D + C * D
    assert rep["backbone"] == sum(p.numel() for p in model.backbone.parameters())
    assert rep["trainable"] + rep["frozen"] == rep["total"]
    model = _model(tiny_params, phase=2)
    rep2 = model.parameter_report()
    assert rep2["tuned_total"] == L * T * D + P * (L - S) * T * D + P * D + C * D
    assert rep2["trainable"] == P * (L - S) * T * D + P * D + C * D
    assert rep2["trainable_share_of_backbone"] == pytest.approx(rep2["trainable"] / rep2["backbone"])
    assert "trainable" in model.summary() and "group_prompts" in model.summary()


def test_save_and_load_trained_model_roundtrip(tiny_params: Params, tmp_path: Path) -> None:
    torch.manual_seed(5)
    save_backbone(create_backbone(tiny_params.backbone), tmp_path / "bb.safetensors")
    params = tiny_params.model_copy(update={"backbone": tiny_params.backbone.model_copy(
        update={"weights": str(tmp_path / "bb.safetensors")})})
    model = create_lpt_model(params, C, phase=2)
    with torch.no_grad():
        model.group_pool.prompts.normal_(0, 0.3)
    folder = Path(params.train.out_dir) / "phase2"
    (folder / "last").mkdir(parents=True)
    save_trained_model(model, folder, {"class_counts": COUNTS, "best_val_acc": 0.5})
    assert (folder / "last").is_dir()  # sibling state untouched
    loaded, meta = load_trained_model(params)
    assert meta["method"] == "lpt" and meta["phase"] == 2 and meta["class_counts"] == COUNTS
    assert meta["backbone"]["fingerprint"] == model.backbone_fingerprint() and not loaded.training
    x = _images(4)
    torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits)
    # another backbone is refused
    other = params.model_copy(update={"backbone": params.backbone.model_copy(update={"weights": "none"})})
    with pytest.raises(RuntimeError, match="backbone"):
        load_trained_model(other, folder)
    with pytest.raises(RuntimeError, match="not found"):
        load_trained_model(params, tmp_path / "missing")


def test_eval_forward_exports_to_onnx(tiny_params: Params, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _model(tiny_params, phase=2).eval()

    class Logits(nn.Module):
        def __init__(self, m: LPTModel) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x).logits

    path = tmp_path / "m.onnx"
    torch.onnx.export(Logits(model).eval(), (_images(2),), str(path), dynamo=False, opset_version=18,
                      input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}})
    x = _images(5, seed=3)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert not model.training  # the exporter restores the wrapper's mode
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], model(x).logits.detach().numpy(), atol=1e-4)


def test_saved_backbone_bytes_do_not_depend_on_the_process(tmp_path: Path) -> None:
    """safetensors keeps header metadata in a per-process-seeded hash map: several keys would reorder from
    run to run and change the DVC output's md5. save_backbone packs them into one key."""
    import subprocess
    import sys

    code = ("import sys, torch; from lpt.model.backbone import save_backbone; torch.manual_seed(0); "
            "save_backbone(torch.nn.Linear(4, 3), sys.argv[1], metadata={'a': 1, 'b': 2, 'c': 3, 'd': 4})")
    outs = []
    for i in range(3):
        path = tmp_path / f"b{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        outs.append(path.read_bytes())
    assert outs[0] == outs[1] == outs[2]
