"""Hostile inputs against the quality gate: no export past a verdict judged under other thresholds, and a
checkpoint with non-finite trained tensors never passes (docs/security.md "Gate")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lpt.config import Params, write_params_atomic

from test_export import params_on_shared_shards, train_stand_in

torch = pytest.importorskip("torch")


def _cli(*args: str) -> tuple[int, str]:
    from lpt.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("command", ["export", "pack"])
@pytest.mark.parametrize("judged, now, changed", [
    (0.0, 0.99, "min_overall 0.0 -> 0.99"),   # stricter than the verdict was judged under
    (0.5, 0.1, "min_overall 0.5 -> 0.1"),     # looser: the verdict is re-judged too, never assumed
])
def test_ship_refuses_a_verdict_judged_under_other_thresholds(tmp_path: Path, tiny_shards: Params, command: str,
                                                              judged: float, now: float, changed: str) -> None:
    params = params_on_shared_shards(tmp_path, tiny_shards, evaluate__gate__min_overall=judged)
    train_stand_in(params)  # a passed verdict for this very checkpoint, judged under min_overall = `judged`
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())

    code, out = _cli(command, "--params", str(path), "-S", f"evaluate.gate.min_overall={now}")
    assert code == 6, out  # lpt.exitcodes.GATE_NOT_PASSED
    assert out.startswith("error: ") and len(out.strip().splitlines()) == 1 and "Traceback" not in out
    assert changed in out and "gate.json" in out and "re-run `lpt evaluate`" in out
    assert not Path(params.export.out_dir).exists() and not Path(params.pack.out_dir).exists()


def test_ship_refuses_a_verdict_without_recorded_thresholds(tmp_path: Path, tiny_shards: Params) -> None:
    from lpt.export import GateNotPassed, run_export

    params = params_on_shared_shards(tmp_path, tiny_shards)
    train_stand_in(params)
    gate = Path(params.evaluate.out_dir) / "gate.json"
    verdict = json.loads(gate.read_text())
    del verdict["thresholds"]
    gate.write_text(json.dumps(verdict))
    with pytest.raises(GateNotPassed, match="min_overall unrecorded -> 0.0; min_few unrecorded -> 0.0"):
        run_export(params)


def test_threshold_changes_names_each_changed_threshold(tiny_params: Params) -> None:
    from lpt.config import apply_overrides, parse_params
    from lpt.gate import gate_thresholds, threshold_changes

    verdict = {"thresholds": gate_thresholds(tiny_params)}  # min_overall 0, min_few 0, max_drop None
    assert threshold_changes(verdict, tiny_params) == []
    assert threshold_changes({"thresholds": {"min_overall": 0, "min_few": 0, "max_drop_vs_probe": None,
                                             "pixel_baselines": [], "min_margin_vs_pixels": 0}},
                             tiny_params) == []  # JSON's 0 is the same threshold as 0.0
    pixels = parse_params(apply_overrides(tiny_params.to_dict(), {"evaluate.gate.pixel_baselines": ["pixel_ncm"]}))
    assert threshold_changes(verdict, pixels) == ["pixel_baselines [] -> ['pixel_ncm']"]
    stricter = parse_params(apply_overrides(tiny_params.to_dict(), {"evaluate.gate.min_few": 0.3,
                                                                    "evaluate.gate.max_drop_vs_probe": 0.05}))
    assert threshold_changes(verdict, stricter) == ["min_few 0.0 -> 0.3", "max_drop_vs_probe None -> 0.05"]


# ------------------------------------------------------------------------------- non-finite tensors
@pytest.mark.parametrize("tensor, value", [("head.weight", float("nan")), ("shared_prompt.prompt", float("inf")),
                                           ("group_pool.keys", float("-inf"))])
def test_non_finite_trained_tensor_fails_the_gate_by_name(tmp_path: Path, tiny_shards: Params, tensor: str,
                                                          value: float) -> None:
    """A diverged checkpoint (nan/inf in one trained tensor) fails the gate naming that tensor, whatever the
    thresholds (here 0: any finite model passes), and `lpt evaluate` exits with the gate's code."""
    from lpt.data.reader import load_manifest
    from lpt.model.lpt import create_lpt_model, save_trained_model
    from lpt.utils import seed_everything

    params = params_on_shared_shards(tmp_path, tiny_shards)
    seed_everything(params.seed)  # the backbone evaluate rebuilds (backbone.weights: none)
    manifest = load_manifest(params.data.out_dir)
    model = create_lpt_model(params, manifest["num_classes"], phase=2)
    state = model.trainable_state_dict()
    assert tensor in state, sorted(state)
    with torch.no_grad():
        dict(model.named_parameters())[tensor].view(-1)[3] = value
    save_trained_model(model, Path(params.train.out_dir) / "phase2",
                       {"class_counts": manifest["train_counts"], "best_val_acc": None})
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())

    code, out = _cli("evaluate", "--params", str(path))
    assert code == 4, out  # lpt.exitcodes.GATE_FAILED
    assert "Traceback" not in out and f"trained tensor {tensor} holds non-finite values" in out
    verdict = json.loads((Path(params.evaluate.out_dir) / "gate.json").read_text())
    assert verdict["passed"] is False
    assert [f for f in verdict["failures"] if "non-finite" in f] == [
        f"trained tensor {tensor} holds non-finite values (nan/inf): training diverged; retrain it (a lower lr, "
        "or check the data)"]


def test_nonfinite_tensors_lists_exactly_the_bad_ones() -> None:
    from lpt.evaluate import nonfinite_tensors

    tensors = {"b": torch.tensor([1.0, float("nan")]), "a": torch.tensor([[float("inf")]]), "ok": torch.zeros(3),
               "half": torch.tensor([1.0, -float("inf")], dtype=torch.float16)}
    assert nonfinite_tensors(tensors) == ["a", "b", "half"]
