"""The embedded backbone: hybrid ViT registration, ImageNet stem, the pretrain stage's own data and cache,
distillation from the EfficientNet-Lite0 wheel, and `dvc repro` end to end on a folder data set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lpt.config import ParamsError, apply_overrides, parse_params, read_raw
from tests.conftest import REPO_ROOT, make_tiny_params, tiny_raw_params

# a hybrid ViT small enough for seconds-long tests: the real Lite0 stem, 3 blocks of width 48 (> shared_blocks 2)
TINY_HYBRID = {"backbone.name": "vit_hybrid_lite0s8",
               "backbone.timm_kwargs": {"img_size": 32, "embed_dim": 48, "depth": 3, "num_heads": 3}}


def _lite0_reference() -> Path:
    from lpt.pretrain import teacher_weights_path

    return teacher_weights_path("efficientnet_lite0")


# ------------------------------------------------------------------------------------------ hybrid
@pytest.mark.parametrize("name, size, stages, channels, tensors", [
    ("vit_hybrid_lite0s8", 32, 3, 40, 75),  # stride 8 at 32 px
    ("vit_hybrid_lite0s16", 64, 4, 80, 120),  # stride 16 at 64 px: the same 4 x 4 grid, one stage deeper
])
def test_hybrid_is_a_promptable_vit_with_the_imagenet_stem_frozen_in_both_modes(
        name: str, size: int, stages: int, channels: int, tensors: int) -> None:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from lpt.model.hybrid import load_lite0_stem
    from lpt.pretrain import load_teacher

    model = timm.create_model(name, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    assert isinstance(model, VisionTransformer) and model.num_prefix_tokens == 1 and model.cls_token is not None
    assert model.patch_embed.img_size == (size, size)  # the registered default input size
    assert model.patch_embed.grid_size == (4, 4) and model.patch_embed.num_patches == 16
    assert load_lite0_stem(model, _lite0_reference()) == tensors
    # reference result: the stem computes exactly the ImageNet CNN's first stages (timm tf_efficientnet_lite0)
    teacher = load_teacher("efficientnet_lite0")
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ref = teacher.bn1(teacher.conv_stem(x))
        for block in teacher.blocks[:stages]:
            ref = block(ref)
        model.train()  # frozen batch norms: train mode computes the same function
        got_train = model.patch_embed.backbone(x)
        model.eval()
        got_eval = model.patch_embed.backbone(x)
    assert ref.shape == (3, channels, 4, 4)
    # FrozenBatchNorm2d folds the statistics into one scale and shift: float32 rounding only
    torch.testing.assert_close(got_train, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_train, got_eval)
    with pytest.raises(RuntimeError, match=f"{name} has no hub weights"):
        timm.create_model(name, pretrained=True)


def test_reference_weights_map_onto_timm_by_position_with_shapes_checked() -> None:
    from lpt.model.hybrid import lite0_state_from_reference

    state = torch.load(str(_lite0_reference()), map_location="cpu", weights_only=True)
    mapped = lite0_state_from_reference(state)
    assert list(mapped)[:2] == ["conv_stem.weight", "bn1.weight"] and "classifier.weight" in mapped
    assert torch.equal(mapped["conv_stem.weight"], state["_conv_stem.weight"])
    broken = dict(state)
    broken["_bn0.weight"] = torch.zeros(31)
    with pytest.raises(ValueError, match=r"_bn0.weight \(31,\) does not fit bn1.weight \(32,\)"):
        lite0_state_from_reference(broken)


def test_source_classes_plus_synthetic_targets_must_fit_the_vocabulary() -> None:
    raw = apply_overrides(read_raw(REPO_ROOT / "params.yaml"), {"data.synthetic.num_classes": 300,
                                                                 "pretrain.source_classes": 200})
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert "data.synthetic.num_classes + pretrain.source_classes = 500: at most 480" in str(err.value)


# --------------------------------------------------------------------------------------- pretrain data
def test_pretraining_data_is_rendered_at_the_input_size_and_cached(tmp_path: Path) -> None:
    from lpt.pretrain import pretraining_data

    params = make_tiny_params(tmp_path, transforms__input_size=24, transforms__resize=24)
    first = pretraining_data(params)
    assert first.images.shape == (100, 24, 24, 3) and np.bincount(first.labels).tolist() == [20] * 5
    assert first.path.parent == tmp_path / "data/pretrain" and first.path.is_file()
    stamp = first.path.stat().st_mtime_ns
    second = pretraining_data(params)  # from the cache: same arrays, file untouched
    assert np.array_equal(first.images, second.images) and first.path.stat().st_mtime_ns == stamp
    first.path.write_bytes(first.path.read_bytes()[:100])  # a damaged cache is regenerated, never trusted
    third = pretraining_data(params)
    assert np.array_equal(first.images, third.images)
    other = pretraining_data(make_tiny_params(tmp_path, transforms__input_size=16, transforms__resize=16))
    assert other.key != first.key and other.images.shape[1:3] == (16, 16)


def test_random_resized_crop_keeps_size_and_full_crop_is_identity() -> None:
    from lpt.pretrain import random_resized_crop

    x = torch.randn(4, 3, 16, 16)
    out = random_resized_crop(x, 0.3, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.allclose(out, x)
    torch.testing.assert_close(random_resized_crop(x, 1.0, torch.Generator().manual_seed(0)), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("standardise, bias", [(False, True), (True, False)])  # the default; the centred hint
def test_hybrid_pretraining_with_the_distillation_teacher(tmp_path: Path, standardise: bool, bias: bool) -> None:
    from safetensors.torch import load_file

    from lpt.model.backbone import create_backbone, pretrained_backbone_path
    from lpt.pretrain import load_teacher, pretrain_backbone

    params = make_tiny_params(tmp_path, backbone__weights="pretrain", pretrain__teacher="efficientnet_lite0",
                              pretrain__teacher_size=32, pretrain__teacher_standardise=standardise,
                              pretrain__kd_bias=bias, **{k.replace(".", "__"): v for k, v in TINY_HYBRID.items()})
    pretrain_backbone(params)
    report = json.loads((tmp_path / "models/pretrain/pretrain.json").read_text())
    assert (report["params"]["pretrain"]["teacher_standardise"], report["params"]["pretrain"]["kd_bias"]) == (
        standardise, bias)
    assert report["teacher"]["name"] == "efficientnet_lite0" and report["teacher"]["input_size"] == 32
    assert -1.0 <= report["holdout"]["teacher_cosine"] <= 1.0 and report["stem"]["tensors"] == 75
    assert sorted(p.name for p in (tmp_path / "data/pretrain").iterdir())[0].startswith("source-")
    assert any(p.name.startswith("teacher-") for p in (tmp_path / "data/pretrain").iterdir())
    # the ImageNet stem left pretraining unchanged (frozen); the transformer learnt
    saved = load_file(str(pretrained_backbone_path(params.pretrain.out_dir)))
    teacher = load_teacher("efficientnet_lite0")
    torch.testing.assert_close(saved["patch_embed.backbone.0.weight"], teacher.conv_stem.weight)
    backbone = create_backbone(params.backbone, pretrain_dir=params.pretrain.out_dir)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 48)


# ------------------------------------------------------------------------------- dvc repro, folder data
def _image_folder(root: Path, classes: int = 4, per_class: tuple[int, int] = (12, 4)) -> Path:
    """root/{train,test}/<class>/*.png: each class a colour, with noise (learnable, not constant)."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                base = np.zeros((20, 20, 3)) + 60 * c
                pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(cwd),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_dvc_repro_end_to_end_on_a_folder_data_set_with_the_pretrain_stage(tmp_path: Path) -> None:
    """A user with only a folder of images and `backbone.weights: pretrain`: `make pretrain`'s commands
    make a backbone for their input size (no shards needed), then `dvc repro` runs every stage to ONNX."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "lpt", "pipelines"):
        src = REPO_ROOT / item
        (shutil.copytree(src, repo / item, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, repo / item))
    raw = apply_overrides(tiny_raw_params(), {
        "data.source": "imagefolder", "data.imagefolder": {"root": str(_image_folder(tmp_path / "images"))},
        "data.val_per_class": 2, "data.imbalance_ratio": 1, "validate.check_test_overlap": False,
        "transforms.input_size": 32, "transforms.resize": 32,
        "backbone.weights": "pretrain", **TINY_HYBRID,
        "pretrain.teacher": "efficientnet_lite0", "pretrain.teacher_size": 32, "pretrain.per_class": 10,
    })
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        assert _run(*cmd, cwd=repo).returncode == 0

    # what `make pretrain` runs: the params check (a dep of the stage), the stage's command, the lock entry
    checked = _run(sys.executable, "-m", "dvc", "repro", "params", cwd=repo)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    made = _run(sys.executable, "-m", "lpt", "pretrain", cwd=repo)
    assert made.returncode == 0, made.stdout + made.stderr
    assert not (repo / "data/shards").exists(), "pretraining needs no target data"
    commit = _run(sys.executable, "-m", "dvc", "commit", "-f", "pretrain", cwd=repo)
    assert commit.returncode == 0, commit.stdout + commit.stderr

    repro = _run(sys.executable, "-m", "dvc", "repro", cwd=repo)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    assert "is frozen" in repro.stdout + repro.stderr  # the committed backbone was used, not rebuilt
    manifest = json.loads((repo / "data/shards/manifest.json").read_text())
    assert manifest["source"] == "imagefolder" and manifest["class_names"] == [f"class{c}" for c in range(4)]
    report = json.loads((repo / "models/pretrain/pretrain.json").read_text())
    assert report["pretrained"] is True and report["params"]["backbone"]["name"] == "vit_hybrid_lite0s8"
    meta = json.loads((repo / "models/phase2/model.json").read_text())
    assert meta["backbone"]["name"] == "vit_hybrid_lite0s8"
    export = json.loads((repo / "models/export/export.json").read_text())
    parity = export["parity"]  # export.json is written only when the parity gate passed
    assert (repo / "models/export/model.onnx").is_file()
    assert parity["max_abs_diff"] <= parity["thresholds"]["max_abs_diff"]
    assert parity["top1_agreement"] >= parity["thresholds"]["min_agreement"]
    status = _run(sys.executable, "-m", "dvc", "status", "--json", cwd=repo)
    assert json.loads(status.stdout or "{}") == {}, status.stdout


def test_pretraining_takes_null_transforms_from_the_model(tmp_path: Path) -> None:
    """transforms.input_size / mean / std = null mean the backbone's own values in the pretrain stage too."""
    from lpt.pretrain import _with_model_transforms

    explicit = make_tiny_params(tmp_path, **{k.replace(".", "__"): v for k, v in TINY_HYBRID.items()})
    assert _with_model_transforms(explicit) is explicit  # nothing null: used as it is
    nulls = make_tiny_params(tmp_path, transforms__input_size=None, transforms__mean=None, transforms__std=None,
                             transforms__resize=None,
                             **{k.replace(".", "__"): v for k, v in TINY_HYBRID.items()})
    filled = _with_model_transforms(nulls).transforms
    assert filled.input_size == 32  # timm_kwargs.img_size
    assert tuple(filled.mean) == (0.5, 0.5, 0.5) and tuple(filled.std) == (0.5, 0.5, 0.5)  # the hybrid's cfg
    wide = make_tiny_params(tmp_path, transforms__input_size=None, transforms__mean=None, transforms__std=None,
                            transforms__resize=None, backbone__name="vit_hybrid_lite0s8",
                            backbone__timm_kwargs={"img_size": 64, "embed_dim": 48, "depth": 3, "num_heads": 3})
    assert _with_model_transforms(wide).transforms.input_size == 64
