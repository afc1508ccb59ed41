"""Training layer: formulas, method plans, both phases on tiny data, resume equality, clear errors.

Fast by default: the tiny config from conftest (10 classes, 4-block 32 px ViT, 1 epoch per phase).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lpt.config import Params, PhaseConfig
from lpt.utils import sha256_file
from lpt.train import (
    TrainError,
    build_optimizer,
    build_scheduler,
    capture_rng_state,
    ib_stream_weight,
    phase_plan,
    restore_rng_state,
    run_phase,
    scaled_lr,
    steps_per_epoch,
    warmup_cosine_lr,
)
from lpt.optim import phase_schedule, stopped_early
from tests.conftest import make_tiny_params


# ------------------------------------------------------------------------------------------ formulas
def test_steps_per_epoch_is_floor_plus_one() -> None:
    assert steps_per_epoch(10847, 64) == 170  # CIFAR-100-LT train size, batch 64
    assert steps_per_epoch(128, 64) == 3
    assert steps_per_epoch(5, 64) == 1


def test_step_floor_adds_whole_epochs_and_leaves_large_sets_alone() -> None:
    # Fashion-MNIST-LT: 1,236 images at batch 64 -> 20 steps/epoch; a 300-step floor makes 2 epochs 15
    small = phase_schedule(1236, PhaseConfig(epochs=2, batch_size=64, warmup_epochs=1, min_steps=300))
    assert (small.steps_per_epoch, small.epochs, small.total_steps, small.warmup_steps) == (20, 15, 300, 20)
    # 301 steps need a 16th epoch (whole epochs only)
    assert phase_schedule(1236, PhaseConfig(epochs=2, batch_size=64, warmup_epochs=1, min_steps=301)).epochs == 16
    # CIFAR-100-LT size: 2 x 170 = 340 steps already past the floor: unchanged
    large = phase_schedule(10847, PhaseConfig(epochs=2, batch_size=64, warmup_epochs=1, min_steps=300))
    assert (large.epochs, large.total_steps, large.warmup_steps) == (2, 340, 170)
    # no floor: today's schedule
    assert phase_schedule(1236, PhaseConfig(epochs=2, batch_size=64, warmup_epochs=1)).total_steps == 40
    # the floor counts capped epochs (max_steps_per_epoch 5 -> 60 epochs of 5 steps)
    assert phase_schedule(1236, PhaseConfig(epochs=2, batch_size=64, warmup_epochs=1, min_steps=300, max_steps_per_epoch=5)).epochs == 60


def test_warmup_in_steps_and_never_past_half_the_phase() -> None:
    assert phase_schedule(1236, PhaseConfig(epochs=2, batch_size=64, min_steps=300, warmup_steps=50)).warmup_steps == 50
    assert phase_schedule(1236, PhaseConfig(epochs=2, batch_size=64, warmup_epochs=0.5)).warmup_steps == 10
    # 1 epoch of warm-up in a 1-epoch phase would never reach the peak lr: half the phase at most
    assert phase_schedule(1236, PhaseConfig(epochs=1, batch_size=64, warmup_epochs=1)).warmup_steps == 10


def test_patience_counts_epochs_since_the_best() -> None:
    assert not stopped_early(3, 1, None)
    assert not stopped_early(0, -1, 1)  # nothing validated yet
    assert not stopped_early(2, 1, 2)
    assert stopped_early(3, 1, 2)
    assert stopped_early(2, 1, 1)


def test_ib_weight_decays_linearly_to_zero() -> None:
    assert [ib_stream_weight(e, 4, 0.5) for e in range(5)] == [0.5, 0.375, 0.25, 0.125, 0.0]
    assert ib_stream_weight(7, 4, 0.5) == 0.0  # never negative


def test_lr_scales_with_batch() -> None:
    assert scaled_lr(0.02, 256) == pytest.approx(0.02)
    assert scaled_lr(0.02, 64) == pytest.approx(0.005)


def test_warmup_cosine_values_by_hand() -> None:
    # 10 steps, 2 warm-up steps from 1e-6 to 0.01, then half cosine to 0.
    lr = [warmup_cosine_lr(s, 10, 2, 0.01, 1e-6) for s in range(11)]
    assert lr[0] == pytest.approx(1e-6)
    assert lr[1] == pytest.approx(0.0050005)
    assert lr[2] == pytest.approx(0.01)
    assert lr[6] == pytest.approx(0.005)  # half-way through the cosine
    assert lr[4] == pytest.approx(0.005 * (1 + math.cos(math.pi / 4)))
    assert lr[10] == pytest.approx(0.0, abs=1e-12)


def test_optimizer_sees_only_trainable_params_and_follows_schedule() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    cfg = PhaseConfig(lr=0.02, batch_size=128, weight_decay=0.01, momentum=0.9)
    opt = build_optimizer(model, cfg)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2  # weight + bias of the second layer
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, warmup_lr=1e-6)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-6)
    assert seen[2] == pytest.approx(0.01)  # 0.02 * 128 / 256
    assert seen[6] == pytest.approx(0.005)


def test_phase_keys_left_null_must_be_filled_before_the_schedule_and_optimizer() -> None:
    with pytest.raises(ValueError, match="warmup_epochs is null"):
        phase_schedule(1236, PhaseConfig(epochs=2, batch_size=64))
    with pytest.raises(ValueError, match="weight_decay is null"):
        build_optimizer(nn.Linear(2, 2), PhaseConfig())
    assert phase_schedule(1236, PhaseConfig(epochs=2, batch_size=64, warmup_epochs=0)).warmup_steps == 0  # LIFT's


def test_optimizer_refuses_a_model_without_trainable_params() -> None:
    with pytest.raises(TrainError, match="no trainable"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), PhaseConfig(weight_decay=0.0))


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    state = json.loads(json.dumps(capture_rng_state()))  # must survive JSON
    a = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize(("method", "phase", "trains", "dual", "loss"), [
    ("lpt", 1, True, True, "agcl"), ("lpt", 2, True, True, "agcl"),
    ("lpt_phase1", 1, True, True, "agcl"), ("lpt_phase1", 2, False, True, "agcl"),
    ("vpt_deep", 1, True, False, "ce"), ("vpt_deep", 2, False, False, "ce"),
    ("linear_probe", 1, True, False, "ce"), ("linear_probe", 2, False, False, "ce"),
    ("linear_probe_la", 1, True, False, "la"), ("linear_probe_cb", 1, True, False, "ce"),
    ("vpt_deep_la", 1, True, False, "la"), ("lift", 1, True, False, "la"), ("lift", 2, False, False, "la"),
])
def test_phase_plans(method: str, phase: int, trains: bool, dual: bool, loss: str) -> None:
    plan = phase_plan(method, phase)
    assert (plan.trains, plan.dual_sampling, plan.loss) == (trains, dual, loss)


# ------------------------------------------------------------------------------------------ tiny runs
def _params(shards: Params, root: Path, **overrides: object) -> Params:
    """Tiny params reading the session's shards and writing everything else under ``root``."""
    return make_tiny_params(root, data__out_dir=str(shards.data.out_dir),
                            **overrides)


def _initial_trainables(params: Params) -> dict[str, torch.Tensor]:
    """The tensors a fresh phase-1 run starts from (same seed, same construction order)."""
    from lpt.data.reader import load_manifest
    from lpt.model.lpt import create_lpt_model
    from lpt.utils import seed_everything

    seed_everything(params.seed)
    return create_lpt_model(params, load_manifest(params.data.out_dir)["num_classes"]).trainable_state_dict()


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def _resume_state(root: Path, phase: int = 1) -> Path:
    """The one scratch resume state of ``phase`` under ``root/models`` (fails if there is not exactly one)."""
    found = sorted((root / "models/.scratch").glob(f"phase{phase}-*/last/state.json"))
    assert len(found) == 1, found
    return found[0]


def test_lpt_trains_both_phases_on_tiny_data(tiny_shards: Params, tmp_path: Path) -> None:
    from lpt.model.lpt import load_trained_model
    from lpt.pretrain import pretrain_backbone
    from lpt.utils import seed_everything

    params = _params(tiny_shards, tmp_path)
    marker = pretrain_backbone(params)  # backbone.weights 'none': just the stage marker
    assert json.loads(Path(marker["path"]).read_text())["pretrained"] is False

    init = _initial_trainables(params)
    r1 = run_phase(params, 1)
    phase1 = tmp_path / "models/phase1"
    for f in ("model.safetensors", "model.json", "live/plots/metrics/train/loss.tsv", "live/plots/metrics/val/acc.tsv"):
        assert (phase1 / f).is_file(), f
    assert sorted(p.name for p in phase1.iterdir()) == ["live", "model.json", "model.safetensors"]
    assert not any((tmp_path / "models/.scratch").iterdir())  # the resume state goes once the outputs are in place
    meta1 = json.loads((phase1 / "model.json").read_text())
    assert all(math.isfinite(row["loss"]) for row in meta1["history"])
    assert r1["best_val_acc"] == meta1["best_val_acc"] and 0.0 <= r1["best_val_acc"] <= 1.0
    w1 = load_file(r1["checkpoint"])
    assert init.keys() == w1.keys() == {"shared_prompt.prompt", "head.weight"}  # no pool in phase 1
    assert _changed(init, w1) == {"shared_prompt.prompt", "head.weight"}
    assert "loss.key_weight" not in json.dumps(meta1["recipe"]) and "pool_size" not in meta1["recipe"]["model"]

    r2 = run_phase(params, 2)
    w2 = load_file(r2["checkpoint"])
    assert set(w2) - set(w1) == {"group_pool.prompts", "group_pool.keys"}
    assert _changed(w1, w2) == {"head.weight"}  # shared prompt frozen, head inherited and trained
    seed_everything(params.seed)  # backbone.weights 'none': the same random backbone as in training
    model, meta2 = load_trained_model(params, tmp_path / "models/phase2")
    assert meta2["phase"] == 2 and meta2["backbone"]["fingerprint"] == meta1["backbone"]["fingerprint"]
    assert model.parameter_report()["trainable"] > 0


def test_step_floor_and_patience_in_a_real_phase(tiny_shards: Params, tmp_path: Path) -> None:
    from lpt.data.reader import load_manifest

    n_train = load_manifest(tiny_shards.data.out_dir)["splits"]["train"]["count"]
    per_epoch = steps_per_epoch(n_train, 16)
    floor = 3 * per_epoch + 1  # needs a 4th epoch
    r = run_phase(_params(tiny_shards, tmp_path / "floor", train__phase1__min_steps=floor), 1)
    meta = json.loads((Path(r["phase_dir"]) / "model.json").read_text())
    assert (meta["epochs"], meta["epochs_run"], meta["steps"]) == (4, 4, 4 * per_epoch)
    # an lr of ~0 leaves val accuracy where it is: best at epoch 1, so patience 2 stops after epoch 3 of 4
    flat = _params(tiny_shards, tmp_path / "flat", train__phase1__min_steps=floor, train__phase1__patience=2,
                   train__phase1__lr=1e-12, train__phase1__warmup_lr=1e-12)
    meta = json.loads((Path(run_phase(flat, 1)["phase_dir"]) / "model.json").read_text())
    assert (meta["epochs"], meta["epochs_run"], meta["best_epoch"], meta["steps"]) == (4, 3, 1, 3 * per_epoch)


@pytest.mark.parametrize(("method", "tensors"), [
    ("linear_probe", {"head.weight"}),
    ("vpt_deep", {"shared_prompt.prompt", "head.weight"}),
    ("lpt_phase1", {"shared_prompt.prompt", "head.weight"}),
    ("linear_probe_la", {"head.weight"}),
    ("linear_probe_cb", {"head.weight"}),
    ("vpt_deep_la", {"shared_prompt.prompt", "head.weight"}),
    ("lift", {f"adapters.{i}.{t}" for i in range(4) for t in ("ln.weight", "ln.bias", "down.weight", "down.bias",
                                                             "up.weight", "up.bias", "scale")} | {"head.weight"}),
])
def test_one_phase_methods_train_their_set_and_phase2_copies(tiny_shards: Params, tmp_path: Path,
                                                             method: str, tensors: set[str]) -> None:
    # lift: 4 bottleneck units (LIFT's rule gives 1 for 10 classes, whose ReLU can stay off on the last
    # block's CLS token, the only row the loss sees there, so that block's adapter would not move)
    extra = {"model__adapter_dim": 4} if method == "lift" else {}
    params = _params(tiny_shards, tmp_path, train__method=method, **extra)
    init = _initial_trainables(params)
    w1 = load_file(run_phase(params, 1)["checkpoint"])
    assert _changed(init, w1) == tensors
    r2 = run_phase(params, 2)
    models = tmp_path / "models"
    assert (models / "phase2/model.safetensors").read_bytes() == (models / "phase1/model.safetensors").read_bytes()
    assert json.loads((models / "phase2/model.json").read_text())["method"] == method
    assert r2["best_val_acc"] == json.loads((models / "phase1/model.json").read_text())["best_val_acc"]


@pytest.mark.parametrize(("method", "overrides", "want"), [
    # null keys: each method's own recipe (lpt.methods.Recipe); LIFT's is the authors'
    ("lift", {}, {"scale": 25.0, "head_dropout": 0.0, "weight_decay": 5e-4, "warmup_epochs": 0.0}),
    ("lpt_phase1", {}, {"scale": 20.0, "head_dropout": 0.1, "weight_decay": 0.01, "warmup_epochs": 1.0}),
    # a value set in params wins over the method's own
    ("lift", {"loss__scale": 30.0, "model__head_dropout": 0.2, "train__phase1__weight_decay": 0.1,
              "train__phase1__warmup_epochs": 0.5},
     {"scale": 30.0, "head_dropout": 0.2, "weight_decay": 0.1, "warmup_epochs": 0.5}),
])
def test_a_method_trains_with_its_own_recipe_where_params_are_null(
        tiny_shards: Params, tmp_path: Path, method: str, overrides: dict[str, float], want: dict[str, float]) -> None:
    params = _params(tiny_shards, tmp_path, train__method=method, train__phase1__epochs=2, **overrides)
    assert params.loss.scale is None or "loss__scale" in overrides
    phase1 = Path(run_phase(params, 1)["phase_dir"])
    meta = json.loads((phase1 / "model.json").read_text())
    recipe = meta["recipe"]
    got = {"scale": recipe["loss"]["scale"], "head_dropout": recipe["model"]["head_dropout"],
           "weight_decay": recipe["optim"]["weight_decay"], "warmup_epochs": recipe["optim"]["warmup_epochs"]}
    assert got == want
    assert meta["model_config"]["head_dropout"] == want["head_dropout"]  # what the model was built with


class _Crash(RuntimeError):
    pass


def _crash_at(step: int):
    def hook(global_step: int) -> None:
        if global_step == step:
            raise _Crash(f"simulated crash after step {step}")
    return hook


@pytest.mark.parametrize("crash_step", [7, 13])  # mid-epoch 1 (after the checkpoint at 6); mid-epoch 2
def test_resume_reaches_the_uninterrupted_result(tiny_shards: Params, tmp_path: Path, crash_step: int) -> None:
    overrides = dict(train__phase1__epochs=2, train__phase1__grad_accum=2, train__checkpoint_every=3)
    straight = run_phase(_params(tiny_shards, tmp_path / "a", **overrides), 1)

    params = _params(tiny_shards, tmp_path / "b", **overrides)
    with pytest.raises(_Crash):
        run_phase(params, 1, on_step=_crash_at(crash_step))
    state = json.loads(_resume_state(tmp_path / "b").read_text())
    assert 0 < state["progress"]["global_step"] < crash_step + 1
    resumed = run_phase(params, 1)

    a, b = load_file(straight["checkpoint"]), load_file(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    meta_a = json.loads((tmp_path / "a/models/phase1/model.json").read_text())
    meta_b = json.loads((tmp_path / "b/models/phase1/model.json").read_text())
    assert meta_a["history"] == meta_b["history"]
    curves = [(tmp_path / f"{run}/models/phase1/live/plots/metrics/train/loss.tsv").read_text() for run in "ab"]
    assert curves[1] == curves[0]  # the resumed run's curve is the uninterrupted one's: no duplicates, none lost
    steps = [int(row.split("\t")[0]) for row in curves[0].strip().splitlines()[1:]]
    assert steps == sorted(set(steps)) and len(steps) > 2  # points between the epoch ends too


def test_curve_points_add_points_and_change_nothing_else(tiny_shards: Params, tmp_path: Path) -> None:
    """train.curve_points: val passes between the epoch ends draw the curve; the trained tensors, the epoch
    history and the model selection are those of a run with points at the epoch ends only."""
    from lpt.train.run import curve_spacing

    runs = {points: run_phase(_params(tiny_shards, tmp_path / str(points), train__phase1__epochs=2,
                                      train__curve_points=points), 1) for points in (0, 4)}
    a, b = load_file(runs[0]["checkpoint"]), load_file(runs[4]["checkpoint"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = {p: json.loads((tmp_path / f"{p}/models/phase1/model.json").read_text()) for p in runs}
    assert meta[0]["history"] == meta[4]["history"] and meta[0]["best_epoch"] == meta[4]["best_epoch"]
    rows = {p: (tmp_path / f"{p}/models/phase1/live/plots/metrics/val/acc.tsv").read_text().strip().splitlines()[1:]
            for p in runs}
    epoch_steps = [row["step"] for row in meta[0]["history"]]
    assert [int(r.split("\t")[0]) for r in rows[0]] == epoch_steps
    every = curve_spacing(meta[4]["steps"], 4)
    expected = sorted({s for s in range(every, meta[4]["steps"] + 1, every)} | set(epoch_steps))
    assert [int(r.split("\t")[0]) for r in rows[4]] == expected and len(expected) > len(epoch_steps)
    at_epoch_ends = {int(r.split("\t")[0]): float(r.split("\t")[1]) for r in rows[4]}
    assert [at_epoch_ends[s] for s in epoch_steps] == [row["val_acc"] for row in meta[0]["history"]]


def test_stale_resume_state_from_another_config_is_not_used(tiny_shards: Params, tmp_path: Path) -> None:
    params = _params(tiny_shards, tmp_path, train__checkpoint_every=3)
    with pytest.raises(_Crash):
        run_phase(params, 1, on_step=_crash_at(4))
    changed = _params(tiny_shards, tmp_path, train__checkpoint_every=3, train__phase1__lr=0.05)
    fresh = run_phase(changed, 1)
    assert _resume_state(tmp_path)  # the interrupted run of the first setting keeps its own state
    reference = run_phase(_params(tiny_shards, tmp_path / "ref", train__phase1__lr=0.05), 1)
    assert load_file(fresh["checkpoint"]).keys() == load_file(reference["checkpoint"]).keys()
    for k, v in load_file(reference["checkpoint"]).items():
        torch.testing.assert_close(load_file(fresh["checkpoint"])[k], v, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ errors
def test_phase2_without_phase1_is_one_clear_error(tiny_shards: Params, tmp_path: Path) -> None:
    params = _params(tiny_shards, tmp_path)
    with pytest.raises(TrainError, match=r"phase-1 checkpoint .* run `lpt train --phase 1`"):
        run_phase(params, 2)
    with pytest.raises(TrainError, match="phase 2 copies the phase-1 model"):
        run_phase(_params(tiny_shards, tmp_path, train__method="vpt_deep"), 2)


def test_cli_reports_training_errors_without_traceback(tiny_shards: Params, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from lpt.cli import app

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(tiny_shards, tmp_path).to_dict()))
    result = CliRunner().invoke(app, ["train", "--phase", "2", "--params", str(params_file)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "phase-1 checkpoint" in result.output


def test_batch_must_split_into_micro_batches(tiny_shards: Params, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="divisible by world_size x grad_accum"):
        run_phase(_params(tiny_shards, tmp_path, train__phase1__grad_accum=3), 1)


def test_missing_shards_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="run `lpt ingest`"):
        run_phase(make_tiny_params(tmp_path), 1)


# ------------------------------------------------------------------------------------------ pretrain
def test_pretrain_writes_a_loadable_backbone_without_any_shards(tmp_path: Path) -> None:
    from lpt.model.backbone import create_backbone, pretrained_backbone_path
    from lpt.pretrain import REGENERATE_COMMAND, pretrain_backbone

    # a folder-data user: no shards exist, the stage renders its own data at transforms.input_size
    params = make_tiny_params(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(tmp_path / "none")},
                              backbone__weights="pretrain")
    result = pretrain_backbone(params)
    report = json.loads((tmp_path / "models/pretrain/pretrain.json").read_text())
    assert report["pretrained"] is True and 0.0 <= report["holdout"]["source_accuracy"] <= 1.0
    assert report["command"] == REGENERATE_COMMAND and report["params"]["pretrain"]["per_class"] == 20
    assert report["data"]["classes"] == 5 and report["data"]["train_images"] + report["data"]["holdout_images"] == 100
    assert report["teacher"] is None and report["wall_time_s"] > 0
    assert report["backbone_sha256"] == sha256_file(pretrained_backbone_path(params.pretrain.out_dir))
    assert not (tmp_path / "data/shards").exists()
    assert Path(result["path"]) == pretrained_backbone_path(params.pretrain.out_dir)
    backbone = create_backbone(params.backbone, pretrain_dir=params.pretrain.out_dir)  # loads the file strictly (no head entries)
    saved = load_file(str(pretrained_backbone_path(params.pretrain.out_dir)))
    assert not any(k.startswith("head.") for k in saved)
    torch.testing.assert_close(backbone.state_dict()["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])


def test_kill_9_mid_run_then_resume_matches(tiny_shards: Params, tmp_path: Path) -> None:
    """A training process killed with SIGKILL resumes from last/ and ends where an uninterrupted run does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    overrides = dict(train__phase1__epochs=4, train__checkpoint_every=5)
    params = _params(tiny_shards, tmp_path / "killed", **overrides)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    scratch = tmp_path / "killed/models/.scratch"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lpt", "train", "--phase", "1", "--params", str(params_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not list(scratch.glob("phase1-*/last/state.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed/models/phase1/model.safetensors").exists()

    resumed = run_phase(params, 1)
    straight = run_phase(_params(tiny_shards, tmp_path / "straight", **overrides), 1)
    a, b = load_file(straight["checkpoint"]), load_file(resumed["checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_metrics_logging_works_in_a_git_repo_without_commits(tiny_shards: Params, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """dvclive's DVC/Git probing raises in a fresh `git init`; training must not depend on it."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    run_phase(_params(tiny_shards, tmp_path, train__method="linear_probe"), 1)
    rows = (tmp_path / "models/phase1/live/plots/metrics/val/acc.tsv").read_text().splitlines()
    assert rows[0] == "step\tacc" and len(rows) >= 2
    assert not (tmp_path / "dvc.yaml").exists()  # dvclive must not write a dvc.yaml of its own


# ------------------------------------------------------------------------------------------ contract
def test_phase1_result_is_independent_of_phase2_knobs(tiny_shards: Params, tmp_path: Path) -> None:
    """Resizing the pool (or any phase-2 key) leaves phase 1's published model byte-identical."""
    a = run_phase(_params(tiny_shards, tmp_path / "a"), 1)
    b = run_phase(_params(tiny_shards, tmp_path / "b", model__pool_size=9, model__top_k=3, model__shared_blocks=1,
                          train__phase2__lr=0.5, loss__key_weight=2.0), 1)
    assert Path(a["checkpoint"]).read_bytes() == Path(b["checkpoint"]).read_bytes()
    assert (tmp_path / "a/models/phase1/model.json").read_bytes() == (tmp_path / "b/models/phase1/model.json").read_bytes()


def test_a_failed_run_leaves_the_previous_outputs(tiny_shards: Params, tmp_path: Path) -> None:
    """A run with a new setting that crashes never touches the outputs of the last finished run."""
    run_phase(_params(tiny_shards, tmp_path), 1)
    phase1 = tmp_path / "models/phase1"
    before = {p.relative_to(phase1): p.read_bytes() for p in phase1.rglob("*") if p.is_file()}
    with pytest.raises(_Crash):
        run_phase(_params(tiny_shards, tmp_path, train__phase1__lr=0.05), 1, on_step=_crash_at(2))
    after = {p.relative_to(phase1): p.read_bytes() for p in phase1.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("damage", ["truncate_tensors", "garbage_json", "pickle_in_json"])
def test_damaged_or_crafted_resume_state_is_ignored(tiny_shards: Params, tmp_path: Path, damage: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A damaged state is reported and training starts from the beginning; nothing in it is ever executed."""
    import base64
    import os
    import pickle

    params = _params(tiny_shards, tmp_path, train__checkpoint_every=3)
    with pytest.raises(_Crash):
        run_phase(params, 1, on_step=_crash_at(4))
    state_json = _resume_state(tmp_path)
    marker = tmp_path / "pwned"
    if damage == "truncate_tensors":
        tensors = state_json.with_name("state.safetensors")
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "garbage_json":
        state_json.write_text("{not json")
    else:  # the old format's base64 pickle of a sampler state, now with a payload
        class Payload:
            def __reduce__(self):  # noqa: D105
                return (os.system, (f"touch {marker}",))

        meta = json.loads(state_json.read_text())
        meta["ranks"][0]["samplers"]["ib"] = {"pickle": base64.b64encode(pickle.dumps(Payload())).decode()}
        state_json.write_text(json.dumps(meta))
    result = run_phase(params, 1)
    assert "ignoring damaged resume state" in capsys.readouterr().out
    reference = run_phase(_params(tiny_shards, tmp_path / "ref", train__checkpoint_every=3), 1)
    assert Path(result["checkpoint"]).read_bytes() == Path(reference["checkpoint"]).read_bytes()
    assert not marker.exists()


def test_nproc_without_a_launcher_is_one_clear_error(tiny_shards: Params, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match=r"train.nproc is 2 .* `python -m pipelines.launch --nproc 2"):
        run_phase(_params(tiny_shards, tmp_path, train__nproc=2), 1)
