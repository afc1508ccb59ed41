"""LPT on every supported timm ViT family (tiny random-weight configs timm builds offline), the family
refusals, `lpt backbones`, weights from a hub-layout cache, and transforms taken from the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from conftest import REPO_ROOT
from lpt.cli import app
from lpt.config import BackboneConfig, LossConfig, ModelConfig, Params, TransformConfig
from lpt.data.reader import build_transform
from lpt.export import export_onnx, write_metadata
from lpt.ship import export_rewrites
from lpt.losses import agcl_loss
from lpt.model.backbone import (
    BackboneError,
    backbone_fingerprint,
    build_architecture,
    create_backbone,
    hub_weights,
    resolve_transforms,
)
from lpt.model.families import FAMILIES, FamilyInfo, extend_rope, family_of
from lpt.model.lpt import LPTModel, create_lpt_model
from lpt.runtime import Predictor

from test_export import params_on_shared_shards, train_stand_in

torch.set_num_threads(1)
C = 5
COUNTS = [20, 10, 6, 4, 2]
GEOMETRY = ModelConfig(prompt_length=3, pool_size=4, shared_blocks=2, top_k=2, head_dropout=0.1)
IDS = [f.name for f in FAMILIES]


def _cfg(fam: FamilyInfo) -> BackboneConfig:
    return BackboneConfig(name=fam.example, weights="none", timm_kwargs=dict(fam.tiny_kwargs))


@pytest.fixture(scope="module")
def backbones() -> dict[str, nn.Module]:
    """One frozen random-weight tiny backbone per family (built once; never modified by the tests)."""
    out = {}
    for fam in FAMILIES:
        torch.manual_seed(0)
        out[fam.name] = create_backbone(_cfg(fam))
    return out


def _model(fam: FamilyInfo, bb: nn.Module, method: str = "lpt", phase: int = 1) -> LPTModel:
    model = LPTModel(bb, C, GEOMETRY, method, backbone_cfg=_cfg(fam), seed=0, phase=phase)
    if phase == 2:
        with torch.no_grad():  # a non-trivial pool, so selection and the prompted pass matter
            model.group_pool.prompts.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            model.group_pool.keys.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
    return model


def _images(fam: FamilyInfo, n: int = 4, seed: int = 0) -> torch.Tensor:
    s = fam.tiny_kwargs["img_size"]
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _grads(model: nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------- each family
@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_without_prompts_the_lpt_forward_is_timms_own(fam: FamilyInfo, backbones: dict[str, nn.Module]) -> None:
    """Zero prompt tokens: the feature is bit-for-bit timm's forward_head(forward_features(x), pre_logits)."""
    bb = backbones[fam.name]
    model = _model(fam, bb, "linear_probe").eval()
    x = _images(fam)
    with torch.no_grad():
        assert torch.equal(model(x).features, bb.forward_head(bb.forward_features(x), pre_logits=True))
    assert model.family is family_of(bb) and bb.num_prefix_tokens == sum(
        1 for t in ("cls_token", "dist_token") if getattr(bb, t, None) is not None) + (
        0 if getattr(bb, "reg_token", None) is None else bb.reg_token.shape[1])


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_prompt_outputs_are_dropped_after_every_block(fam: FamilyInfo, backbones: dict[str, nn.Module]) -> None:
    """Each block sees [the model's N tokens, the layer's T prompts]; the next block gets only the N outputs
    of the previous one (never its prompt outputs), and the feature reads only the model's tokens."""
    bb = backbones[fam.name]
    model = _model(fam, bb, "lpt_phase1").eval()
    x = _images(fam, 2)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [blk.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0], out)), with_kwargs=True)
             for blk in bb.blocks]
    try:
        with torch.no_grad():
            feature = model(x).features
    finally:
        for h in hooks:
            h.remove()
    n = model._embed(x)[0].shape[1]
    t = GEOMETRY.prompt_length
    assert len(seen) == len(bb.blocks)
    for i, (inp, out) in enumerate(seen):
        assert inp.shape[1] == n + t and out.shape[1] == n + t
        assert torch.equal(inp[:, n:], model.shared_prompt.prompt[i].expand(2, -1, -1))  # this layer's prompt
        if i:
            assert torch.equal(inp[:, :n], seen[i - 1][1][:, :n])  # previous outputs, prompt rows dropped
    with torch.no_grad():
        assert torch.equal(feature, model._feature(seen[-1][1][:, :n]))


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_block_reuse_equals_the_two_pass_forward_exactly(fam: FamilyInfo, backbones: dict[str, nn.Module]) -> None:
    model = _model(fam, backbones[fam.name], phase=2).eval()
    x = _images(fam, 6)
    with torch.no_grad():
        fast, ref = model(x), model.forward_two_pass(x)
    assert torch.equal(fast.selected, ref.selected) and len(set(fast.selected.flatten().tolist())) > 1
    assert torch.equal(fast.logits, ref.logits) and torch.equal(fast.features, ref.features)
    assert torch.equal(fast.sim, ref.sim)


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_both_phases_train_and_frozen_parameters_get_no_gradient(fam: FamilyInfo,
                                                                 backbones: dict[str, nn.Module]) -> None:
    bb = backbones[fam.name]
    x, y = _images(fam, 6), torch.arange(6) % C
    model = _model(fam, bb).train()
    out = model(x)
    (agcl_loss(out.logits, y, COUNTS, 0.5, 8.0, LossConfig(scale=20.0)) - 0.5 * out.sim).backward()
    got = _grads(model)
    assert got["shared_prompt.prompt"] and got["head.weight"]
    assert all(p.grad is None for p in bb.parameters())

    model = _model(fam, bb, phase=2).train()
    out = model(x)
    (agcl_loss(out.logits, y, COUNTS, 0.0, 4.0, LossConfig(scale=20.0)) - 0.5 * out.sim).backward()
    got = _grads(model)
    assert got["group_pool.prompts"] and got["group_pool.keys"] and got["head.weight"]
    assert model.shared_prompt.prompt.grad is None and all(p.grad is None for p in bb.parameters())


@pytest.mark.parametrize("fam", FAMILIES, ids=IDS)
def test_onnx_export_passes_parity_and_the_torch_free_predictor_reproduces_it(
        fam: FamilyInfo, backbones: dict[str, nn.Module], tmp_path: Path) -> None:
    bb = backbones[fam.name]
    model = _model(fam, bb, phase=2).eval()
    # the family's own preprocessing: every transforms field null = from the model's pretrained config
    tf = resolve_transforms(TransformConfig(input_size=None, resize=None, mean=None, std=None), bb)
    assert tf.input_size == fam.tiny_kwargs["img_size"] and tf.mean == tuple(bb.pretrained_cfg["mean"])
    path = export_onnx(model, tmp_path / "model.onnx", input_size=tf.input_size, optimize=True)
    leading_rows = model.family.feature_rows(bb) is not None and type(bb.blocks[-1]).__name__ == "Block"
    with export_rewrites(model, True) as applied:  # CLS-only last block only where the feature reads leading rows
        assert applied["cls_only_last_block"] == leading_rows
    assert leading_rows == (fam.name in ("vit", "deit3", "clip", "dinov2_reg", "deit_distilled"))
    write_metadata(path, {"lpt_format": "1", "class_names": json.dumps([f"c{i}" for i in range(C)]),
                          "interpolation": "bilinear", "crop": "center", "logit_scale": "20.0",
                          **{k: json.dumps(v) for k, v in tf.as_dict().items()}})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)) for _ in range(5)]
    predictor = Predictor(path, providers=["CPUExecutionProvider"])
    logits, selected = predictor.run(np.stack([predictor.preprocess(im) for im in images]))
    with torch.no_grad():
        ref = model(torch.stack([build_transform(tf, train=False)(im) for im in images]))
    assert np.abs(logits - ref.logits.numpy()).max() <= 1e-4  # export.parity.max_abs_diff
    np.testing.assert_array_equal(logits.argmax(1), ref.logits.numpy().argmax(1))
    np.testing.assert_array_equal(np.sort(selected, 1), np.sort(ref.selected.numpy(), 1))
    rows = predictor.predict_images(images)
    assert [r["labels"][0] for r in rows] == ref.logits.numpy().argmax(1).tolist()


# --------------------------------------------------------------------------------------------- RoPE
def _rotate_by_hand(t: torch.Tensor, rope: torch.Tensor, first: int) -> torch.Tensor:
    """Rows first..first+Np-1 of ``t`` [B, H, N, d] rotated pairwise by rope's angles; every other row kept."""
    sin, cos = rope.chunk(2, -1)  # [Np, d] each: timm's concatenated sin|cos layout
    rows = t[:, :, first:first + rope.shape[0]]
    pairs = torch.stack([-rows[..., 1::2], rows[..., ::2]], -1).reshape(rows.shape)  # (x0, x1) -> (-x1, x0)
    out = t.clone()
    out[:, :, first:first + rope.shape[0]] = rows * cos + pairs * sin
    return out


def test_eva_rope_rotates_patch_tokens_only_and_prompts_do_not_shift_it(backbones: dict[str, nn.Module]) -> None:
    """An EVA-02 block on [CLS, patches, prompts]: every output row equals a hand-written attention in which
    patch j is rotated by rope row j exactly as without prompts, and CLS and prompt tokens are not rotated."""
    fam = next(f for f in FAMILIES if f.name == "eva02")
    bb = backbones[fam.name]
    adapter = family_of(bb)
    x = _images(fam, 2, seed=3)
    with torch.no_grad():
        h, rope = adapter.embed(bb, x)  # [B, 1 + Np, D], [Np, 2d]
        t, npt, np_ = 3, bb.num_prefix_tokens, rope.shape[0]
        assert h.shape[1] == npt + np_ and npt == 1
        tokens = torch.cat([h, torch.randn(2, t, bb.embed_dim, generator=torch.Generator().manual_seed(4))], 1)
        got = adapter.block(bb, 0, tokens, rope, t)  # [B, 1 + Np + T, D]

        blk, attn = bb.blocks[0], bb.blocks[0].attn
        b, n, d = tokens.shape
        heads = attn.num_heads
        y = blk.norm1(tokens)
        bias = None if attn.q_bias is None else torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        q, k, v = F.linear(y, attn.qkv.weight, bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q, k = _rotate_by_hand(q, rope, npt), _rotate_by_hand(k, rope, npt)
        a = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v  # [B, H, N, d]
        out = tokens + blk.gamma_1 * attn.proj(attn.norm(a.transpose(1, 2).reshape(b, n, d))) \
            if blk.gamma_1 is not None else tokens + attn.proj(attn.norm(a.transpose(1, 2).reshape(b, n, d)))
        mlp = blk.mlp(blk.norm2(out))
        expected = out + (blk.gamma_2 * mlp if blk.gamma_2 is not None else mlp)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the identity rows really are the identity: a prompt row goes through timm's rotation unchanged
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    z = torch.randn(1, heads, np_ + t, d // heads)
    rotated = apply_rot_embed_cat(z, extend_rope(rope, t))
    assert torch.equal(rotated[:, :, np_:], z[:, :, np_:])
    assert torch.equal(rotated[:, :, :np_], apply_rot_embed_cat(z[:, :, :np_], rope))


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(("name", "kwargs", "needle"), [
    ("vit_relpos_base_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3},
     "timm class VisionTransformerRelPos is not a ViT family LPT supports"),
    ("vit_base_patch16_rope_mixed_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3},
     "rotary embedding RotaryEmbeddingMixed"),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3,
                              "global_pool": ""}, "global_pool '' gives no pooled feature"),
])
def test_a_family_lpt_cannot_handle_is_refused_up_front_in_one_line(tmp_path: Path, name: str, kwargs: dict,
                                                                    needle: str) -> None:
    from conftest import make_tiny_params

    params = make_tiny_params(tmp_path, backbone__name=name, backbone__timm_kwargs=kwargs)
    with pytest.raises(BackboneError, match=needle) as err:
        create_lpt_model(params, C)
    assert name in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(app, ["backbones", name, "--timm-kwargs", json.dumps(kwargs)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [result.output.strip()]


def test_swin_is_refused_naming_its_class() -> None:
    result = CliRunner().invoke(app, ["backbones", "swin_tiny_patch4_window7_224"])
    assert result.exit_code == 1 and "SwinTransformer is not a ViT family LPT supports" in result.output
    # the pretrain stage builds with create_backbone alone: refused there too, not a TypeError traceback
    with pytest.raises(BackboneError, match="'swin_tiny_patch4_window7_224'.*not a ViT family LPT supports"):
        create_backbone(BackboneConfig(name="swin_tiny_patch4_window7_224", weights="none"))


# ----------------------------------------------------------------------------------------- lpt backbones
def test_lpt_backbones_lists_the_families_and_describes_a_name(tmp_path: Path) -> None:
    listing = CliRunner().invoke(app, ["backbones"])
    assert listing.exit_code == 0
    assert all(f.name in listing.output and f.example in listing.output for f in FAMILIES)
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 6, "num_heads": 3}
    result = CliRunner().invoke(app, ["backbones", "deit_tiny_distilled_patch16_224", "--timm-kwargs",
                                      json.dumps(kwargs), "--params", str(REPO_ROOT / "params.yaml")])
    assert result.exit_code == 0, result.output
    out = result.output
    l, t, p, d, s = 6, 10, 20, 48, 3  # params.yaml: T = 10, P = 20; S default L/2
    bb = build_architecture(BackboneConfig(name="deit_tiny_distilled_patch16_224", timm_kwargs=kwargs))
    assert "prefix tokens 2 (cls 1, dist 1)" in out and "prompts x10" in out and "patches x16" in out
    assert "CLS and distillation tokens" in out and f"S default {s}" in out
    assert f"backbone {sum(q.numel() for q in bb.parameters()):,}" in out
    assert f"shared {l * t * d:,} + pool {p * (l - s) * t * d:,} + keys {p * d:,}" in out
    assert "mean (0.485, 0.456, 0.406)" in out and "input_size 32, resize 35" in out


# ------------------------------------------------------------------------------------------ hub cache
def _hub_cache(root: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """timm's HF hub cache layout: models--<org>--<name>/snapshots/<rev>/model.safetensors + refs/main."""
    from safetensors.torch import save_file

    rev = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / rev).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "snapshots" / rev / "model.safetensors"))
    return folder


def test_hub_weights_are_read_offline_from_a_hub_layout_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1 before anything imports the hub client
    fam = FAMILIES[0]
    cfg = _cfg(fam).model_copy(update={"weights": "hub"})
    torch.manual_seed(5)
    src = create_backbone(_cfg(fam))
    repo = hub_weights(build_architecture(cfg))["repo"]
    assert repo == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    with pytest.raises(BackboneError) as err:
        create_backbone(cfg)
    message = str(err.value)
    assert "\n" not in message and repo in message and "model.safetensors" in message and str(empty) in message
    assert f"hf download {repo} model.safetensors" in message

    cache = tmp_path / "hub"
    _hub_cache(cache, repo, src.state_dict())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    torch.manual_seed(6)  # a different random init that the cached weights must replace
    bb = create_backbone(cfg)
    assert backbone_fingerprint(bb) == backbone_fingerprint(src)
    assert hub_weights(bb)["cached"].startswith(str(cache))

    # a file of another model in the cache is refused naming the tensor, not half-loaded
    state = dict(src.state_dict())
    state.pop("blocks.1.mlp.fc2.bias")
    other = tmp_path / "other"
    _hub_cache(other, repo, state)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(other))
    with pytest.raises(BackboneError, match=r"missing \['blocks\.1\.mlp\.fc2\.bias'\]"):
        create_backbone(cfg)


def test_hub_cache_from_the_environment_in_a_fresh_process(tmp_path: Path) -> None:
    """HF_HUB_CACHE as users set it, read by timm in a new process (`lpt backbones` says whether it is cached)."""
    fam = FAMILIES[0]
    repo = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    _hub_cache(tmp_path / "hub", repo, create_backbone(_cfg(fam)).state_dict())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(REPO_ROOT)}
    args = [sys.executable, "-m", "lpt", "backbones", fam.example, "--timm-kwargs", json.dumps(fam.tiny_kwargs)]
    found = subprocess.run(args, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert found.returncode == 0, found.stderr
    assert f"weights hub   {repo}" in found.stdout and f"cached: {tmp_path / 'hub'}" in found.stdout


# ------------------------------------------------------------------------------------------ transforms
def test_null_transforms_come_from_the_model_and_explicit_values_win(backbones: dict[str, nn.Module]) -> None:
    clip = backbones["clip"]  # OpenAI CLIP mean/std, crop_pct 1.0
    null = TransformConfig(input_size=None, resize=None, mean=None, std=None)
    got = resolve_transforms(null, clip)
    assert got.as_dict() == {"input_size": 32, "resize": 32, "mean": list(clip.pretrained_cfg["mean"]),
                             "std": list(clip.pretrained_cfg["std"])}
    assert got.mean == (0.48145466, 0.4578275, 0.40821073)
    eva = resolve_transforms(null, backbones["eva02"])  # crop_pct 0.9: resize = floor(28 / 0.9)
    assert (eva.input_size, eva.resize) == (28, 31)
    explicit = resolve_transforms(TransformConfig(input_size=32, resize=40, mean=(0.1, 0.2, 0.3), std=(1, 1, 1)), clip)
    assert explicit.as_dict() == {"input_size": 32, "resize": 40, "mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]}
    assert explicit.hflip is True and explicit.train_scale_min == 0.6  # train fields read from the section
    with pytest.raises(BackboneError, match=r"transforms\.input_size is 64 but the backbone is built for 32 px"):
        resolve_transforms(TransformConfig(input_size=64), clip)
    with pytest.raises(ValueError, match=r"transforms\.mean is null"):
        build_transform(TransformConfig(mean=None), train=False)


def test_export_metadata_carries_the_values_from_the_model(tmp_path: Path, tiny_shards: Params) -> None:
    """A CLIP-family model with every transforms field null: evaluate-free export on the shared shards; the
    ONNX metadata holds CLIP's mean/std and the model's input size, and parity passes with them."""
    from lpt.export import run_export

    clip = next(f for f in FAMILIES if f.name == "clip")
    params = params_on_shared_shards(tmp_path, tiny_shards, backbone__name=clip.example,
                                     backbone__timm_kwargs=clip.tiny_kwargs, transforms__input_size=None,
                                     transforms__resize=None, transforms__mean=None, transforms__std=None)
    train_stand_in(params)
    result = run_export(params)
    pre = Predictor(result.model_path).preprocessing
    assert (pre.input_size, pre.resize) == (32, 32)
    assert pre.mean == (0.48145466, 0.4578275, 0.40821073) and pre.std == (0.26862954, 0.26130258, 0.27577711)
    assert result.max_abs_diff <= params.export.parity.max_abs_diff and result.top1_agreement == 1.0
