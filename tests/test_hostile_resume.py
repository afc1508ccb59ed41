"""Crafted but well-formed resume states (right keys and files, wrong types, shapes or counters) are discarded
with one warning and the phase trains from the start to the same model as an uninterrupted run; they never
make a rerun fail (docs/security.md "Resume state and models")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from lpt.config import Params
from lpt.train import run_phase

from conftest import make_tiny_params

WARNING = "ignoring damaged resume state"


class _Stop(Exception):
    """Stops a run after a checkpoint (not a RuntimeError: nothing in the trainer may swallow it)."""


def _params(shards: Params, root: Path) -> Params:
    return make_tiny_params(root, data__out_dir=str(shards.data.out_dir), train__checkpoint_every=3)


@pytest.fixture(scope="module")
def interrupted(tiny_shards: Params, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A phase-1 run stopped after its step-3 checkpoint (its scratch folder), and the model an
    uninterrupted run of the same params publishes."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("interrupted")

    def stop(step: int) -> None:
        if step == 4:
            raise _Stop

    with pytest.raises(_Stop):
        run_phase(_params(tiny_shards, root), 1, on_step=stop)
    reference = run_phase(_params(tiny_shards, tmp_path_factory.mktemp("reference")), 1)
    return root / "models" / ".scratch", Path(reference["checkpoint"]).read_bytes()


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def _edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "2"})


def _set(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(meta: dict[str, Any]) -> None:
        node = meta
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return change


JSON_CASES = {  # a string where a number belongs, nan, counters outside the phase, lists of another length
    "global_step_string": _set("progress", "global_step", value="3"),
    "scheduler_step_string": _set("scheduler", "last_epoch", value="3"),
    "scheduler_base_lrs_length": _set("scheduler", "base_lrs", value=[0.1, 0.1, 0.1]),
    "optimizer_lr_string": _set("optimizer", "param_groups", 0, "lr", value="0.1"),
    "optimizer_momentum_nan": _set("optimizer", "param_groups", 0, "momentum", value=float("nan")),
    "optimizer_params_foreign": _set("optimizer", "param_groups", 0, "params", value=[0, 1, 2]),
    "progress_epoch_beyond": _set("progress", "epoch", value=10**9),
    "progress_counters_inconsistent": _set("progress", "global_step", value=2),
    "sampler_offset_negative": lambda m: [s.update(offset=-5) for s in m["ranks"][0]["samplers"].values()],
    "history_without_epochs": _set("progress", "history", value=[{"epoch": "one"}]),
    "curve_row_not_numbers": _set("progress", "curve", value=[{"step": "one"}]),
    "curve_point_in_the_future": _set("progress", "curve", value=[
        {"step": 10**6, "epoch": 1.0, "loss": 1.0, "lr": 0.1, "val_acc": 0.5}]),
    "window_steps_negative": _set("progress", "window_steps", value=-1),
}
TENSOR_CASES = {  # tensors of another shape or dtype, or not this model's
    "model_tensor_shape": lambda t: t.update({"model.head.weight": torch.zeros(10, 47)}),
    "model_tensor_dtype": lambda t: t.update({"model.head.weight": t["model.head.weight"].double()}),
    "momentum_buffer_shape": lambda t: t.update({"optim.0.momentum_buffer": torch.zeros(3, 3)}),
    "best_tensor_shape": lambda t: t.update({"best.head.weight": torch.zeros(2, 2)}),
    "stray_tensor": lambda t: t.update({"optim.7.momentum_buffer": torch.zeros(1)}),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES) + sorted(TENSOR_CASES))
def test_crafted_resume_state_is_discarded_with_one_warning(interrupted, tiny_shards: Params, tmp_path: Path,
                                                             case: str, capsys: pytest.CaptureFixture[str]) -> None:
    scratch, reference = interrupted
    params = _params(tiny_shards, tmp_path)
    shutil.copytree(scratch, Path(params.train.out_dir) / ".scratch")  # this run's own state (same fingerprint)
    (last,) = (Path(params.train.out_dir) / ".scratch").glob("phase1-*/last")
    if case in JSON_CASES:
        _edit_json(last / "state.json", JSON_CASES[case])
    else:
        _edit_tensors(last / "state.safetensors", TENSOR_CASES[case])
    capsys.readouterr()

    result = run_phase(params, 1)  # completes: never the same failure on every rerun

    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if WARNING in line]
    assert len(warnings) == 1 and "training from the start" in warnings[0], out
    assert "resumed phase" not in out
    assert Path(result["checkpoint"]).read_bytes() == reference  # a fresh start: the uninterrupted model
    assert not any((Path(params.train.out_dir) / ".scratch").iterdir())  # the crafted state is gone


def test_the_untouched_state_still_resumes(interrupted, tiny_shards: Params, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The checks accept what the trainer itself writes: the same copied state, unedited, is resumed."""
    scratch, reference = interrupted
    params = _params(tiny_shards, tmp_path)
    shutil.copytree(scratch, Path(params.train.out_dir) / ".scratch")
    capsys.readouterr()
    result = run_phase(params, 1)
    out = capsys.readouterr().out
    assert "resumed phase 1" in out and "at step 3" in out and WARNING not in out, out
    assert Path(result["checkpoint"]).read_bytes() == reference


def test_check_structure_names_the_field() -> None:
    from lpt.train.resume import ResumeStateError, check_structure

    reference = {"groups": [{"lr": 0.1, "nesterov": False, "foreach": None, "params": [0, 1]}], "step": 3}
    check_structure(reference, json.loads(json.dumps(reference)), "optimizer")
    check_structure(reference, {"groups": [{"lr": 1, "nesterov": True, "foreach": True, "params": [4, 5]}],
                                "step": 0}, "optimizer")  # an int is a number; flags may flip
    for bad, field in [({"groups": [{"lr": "0.1", "nesterov": False, "foreach": None, "params": [0, 1]}], "step": 3},
                        "optimizer.groups[0].lr"),
                       ({"groups": [], "step": 3}, "optimizer.groups"),
                       ({"groups": reference["groups"], "step": True}, "optimizer.step"),
                       ({"groups": reference["groups"], "step": 3, "extra": 1}, "optimizer:"),
                       ({"groups": [{"lr": float("inf"), "nesterov": False, "foreach": None, "params": [0, 1]}],
                         "step": 3}, "optimizer.groups[0].lr")]:
        with pytest.raises(ResumeStateError, match=field.replace("[", r"\[").replace("]", r"\]")):
            check_structure(reference, bad, "optimizer")
