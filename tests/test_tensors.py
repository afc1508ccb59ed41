"""lpt.tensors: the one spec of the trained tensors, and everything that derives from it."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lpt.tensors
from lpt.config import Params
from lpt.methods import METHODS, MethodSpec, get_method
from lpt.model.lpt import LPTModel, LPTOutput, create_lpt_model, read_trained_tensors, save_trained_model
from lpt.pack import (PACK_TENSORS, build_pack_metadata, export_backbone_graph, pack_geometry, pack_tensors,
                      write_pack)
from lpt.runtime import TASK_INPUTS, read_pack
from lpt.tensors import TRAINED_TENSORS, TrainedTensor, dynamic_axes, recipe_keys, task_inputs
from lpt.train.resume import phase_recipe

C = 5


def test_doctests() -> None:
    assert doctest.testmod(lpt.tensors).failed == 0


def test_the_spec_gives_todays_tables() -> None:
    """The tables that were written out by hand in four modules, now derived: the same values, the same order."""
    assert PACK_TENSORS == {"shared_prompt.prompt": "shared_prompt", "group_pool.prompts": "group_prompts",
                            "group_pool.keys": "keys", "head.weight": "head"}
    assert TASK_INPUTS == {"shared_prompt": ("L", "T", "D"), "group_prompts": ("P", "L-S", "T", "D"),
                           "keys": ("P", "D"), "head": ("C", "D")}
    assert [dynamic_axes(d) for d in TASK_INPUTS.values()] == [
        {1: "prompt_length"}, {0: "pool_size", 2: "prompt_length"}, {0: "pool_size"}, {0: "num_classes"}]
    assert recipe_keys(get_method("lpt").tensors, 2) == (
        "prompt_length", "head_dropout", "head_init", "pool_size", "shared_blocks", "top_k", "block_reuse")
    assert recipe_keys(get_method("lpt").tensors, 1) == ("prompt_length", "head_dropout", "head_init")
    assert {name: spec.phases for name, spec in METHODS.items()} == {
        name: (1, 2) if name == "lpt" else (1,) for name in METHODS}


@pytest.mark.parametrize("method", list(METHODS))
def test_a_model_trains_exactly_the_spec_tensors_of_its_phase(tiny_params: Params, method: str) -> None:
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"method": method})})
    for phase in get_method(method).phases:
        model = create_lpt_model(params, C, phase=phase)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {n for t in model.tensors if phase in t.phases for n in model.tensor_parameters(t)}
        assert trainable == expected and trainable
        assert set(model.trainable_state_dict()) == set(model.trainable_names())
        assert list(model.parameter_report()["components"]) == [t.name for t in model.tensors]
    with pytest.raises(ValueError, match="has no phase 3"):
        create_lpt_model(params, C, phase=3)


def test_a_tensor_added_to_the_spec_reaches_training_packs_and_the_runtime(
        tiny_params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One TrainedTensor + one method that trains it (+ the forward that uses it), no other edit: the model builds and trains it in phase 2,
    the resume recipe records its key, checkpoints and packs carry it, the backbone graph takes it as an input
    with its dynamic axis, and the runtime reads it back. (Added by monkeypatching; gone after the test.)"""
    added = TrainedTensor("class_bias", "extra_tensors.class_bias", ("C", "D"), (2,), ("top_k",))
    spec = (*TRAINED_TENSORS[:-2], added, *TRAINED_TENSORS[-2:])  # before head: graph inputs keep spec order
    monkeypatch.setattr(lpt.tensors, "TRAINED_TENSORS", spec)
    method = MethodSpec("lpt_bias", (*get_method("lpt").tensors, "class_bias"), "dual", "agcl")
    monkeypatch.setitem(METHODS, "lpt_bias", method)
    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"method": "lpt_bias"})})
    output = LPTModel._output

    def uses_it(self: LPTModel, features: torch.Tensor, sim: torch.Tensor, selected: torch.Tensor | None) -> LPTOutput:
        out = output(self, features, sim, selected)  # the forward that uses the tensor: a small per-class bias
        if self.extra_tensors is None:
            return out
        return out._replace(logits=out.logits + 1e-3 * (features @ self.extra_tensors["class_bias"].t()))

    monkeypatch.setattr(LPTModel, "_output", uses_it)

    phase1 = create_lpt_model(params, C, phase=1)
    assert "class_bias" not in {t.name for t in phase1.tensors} and phase1.extra_tensors is None
    model = create_lpt_model(params, C, phase=2)
    value = model.get_parameter("extra_tensors.class_bias")
    assert value.shape == (C, model.embed_dim) and value.requires_grad  # training: an optimizer built from
    assert "extra_tensors.class_bias" in model.trainable_names()  # requires_grad parameters gets it
    assert model.parameter_report()["components"]["class_bias"]["trainable"]
    assert "top_k" in phase_recipe(params, 2, method)["model"]

    folder = save_trained_model(model, tmp_path / "phase2", {}).parent  # checkpoint
    state, _ = read_trained_tensors(folder)
    assert torch.equal(state["extra_tensors.class_bias"], value.detach())

    tensors = pack_tensors(model)  # pack, in graph-input order
    assert list(tensors) == ["shared_prompt", "group_prompts", "keys", "class_bias", "head"]
    import onnx

    graph = onnx.load(str(export_backbone_graph(model, tmp_path / "backbone.onnx", optimize=False)))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert list(inputs) == ["image", *tensors]
    assert inputs["class_bias"] == ["num_classes", model.embed_dim]

    assert "class_bias" in task_inputs()  # runtime: a pack carrying it is read back, shapes checked
    ckpt = json.loads((folder / "model.json").read_text())
    meta = build_pack_metadata(params, model, [str(i) for i in range(C)], ckpt, {}, {"passed": True},
                               pack_geometry(model))
    pack = read_pack(write_pack(tmp_path / "t.pack", tensors, meta))
    np.testing.assert_array_equal(pack.tensors["class_bias"], value.detach().numpy())
