"""ONNX export of a tiny trained LPT model: graph, metadata, parity gate, variants, torch-free consumer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lpt.config import Params
from lpt.data.reader import ShardImages, build_transform, load_manifest
from lpt.export import ExportError, GateNotPassed, ParityFailed, export_onnx, run_export
from lpt.ship import ClsOnlyBlock, export_rewrites
from lpt.model.lpt import create_lpt_model, load_trained_model, save_trained_model
from lpt.runtime import Predictor
from lpt.utils import OutputDirError, seed_everything

from conftest import make_tiny_params
from test_runtime import run_torch_free_cli


def train_stand_in(params: Params, gate_passed: bool | None = True) -> Path:
    """A tiny 'trained' model in the checkpoint folder ``load_trained_model`` reads by default, plus the
    gate verdict ``lpt evaluate`` would write for it (``gate_passed=None``: no verdict at all).

    Random prompts/keys/head (seeded like the export stage seeds, so ``backbone.weights: none`` rebuilds
    the same backbone); saved with the model engineer's checkpoint writer.
    """
    from lpt.gate import gate_thresholds
    from lpt.utils import write_json_atomic

    torch.set_num_threads(1)
    manifest = load_manifest(params.data.out_dir)
    seed_everything(params.seed)
    model = create_lpt_model(params, manifest["num_classes"], phase=2 if params.train.method == "lpt" else 1)
    folder = Path(params.train.out_dir) / "phase2"
    save_trained_model(model, folder, {"class_counts": manifest["train_counts"], "recipe_sha256": "ab" * 32})
    if gate_passed is not None:
        sha = json.loads((folder / "model.json").read_text())["weights_sha256"]
        write_json_atomic(Path(params.evaluate.out_dir) / "gate.json",
                          {"passed": gate_passed, "failures": [] if gate_passed else ["overall = 0.1 < min_overall = 0.5"],
                           "checkpoint_sha256": sha, "thresholds": gate_thresholds(params)})
    return folder


def params_on_shared_shards(root: Path, shards: Params, **overrides: object) -> Params:
    """Tiny params with outputs under ``root`` reading the session's (read-only) shards."""
    return make_tiny_params(root, data__out_dir=str(shards.data.out_dir),
                            **overrides)


def torch_predictions(params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 of the trained torch model on the test split (the reference) and the labels."""
    seed_everything(params.seed)
    model, _ = load_trained_model(params)
    data = ShardImages(params.data.out_dir, "test")
    tf = build_transform(params.transforms, train=False)
    with torch.inference_mode():
        x = torch.stack([tf(data[i][0]) for i in range(len(data))])
        return model(x).logits.argmax(1).numpy(), np.asarray(data.labels)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Params) -> tuple[Params, object]:
    """One export with INT8 and fp16 enabled (shared by the read-only tests below)."""
    params = params_on_shared_shards(tmp_path_factory.mktemp("export"), tiny_shards,
                                     export__int8=True, export__fp16=True, export__max_accuracy_drop=0.2)
    train_stand_in(params)
    return params, run_export(params)


# ------------------------------------------------------------------------------------------ the graph
def test_export_writes_one_checked_graph_with_dynamic_batch(exported) -> None:
    params, result = exported
    path = Path(result.model_path)
    assert path == Path(params.export.out_dir) / "model.onnx" and path.is_file()
    assert not list(path.parent.glob("*.data")), "single file, no external data"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == params.export.opset
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits", "selected"]
    assert "TopK" in {n.op_type for n in model.graph.node}  # key matching is inside the graph

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seed_everything(params.seed)
    torch_model, _ = load_trained_model(params)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        logits, selected = sess.run(None, {"image": x.numpy()})
        with torch.inference_mode():
            ref = torch_model(x)
        assert logits.shape == (batch, 10) and selected.shape == (batch, params.model.top_k)
        np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-5)
        np.testing.assert_array_equal(np.sort(selected, 1), np.sort(ref.selected.numpy(), 1))


def test_metadata_round_trip(exported) -> None:
    params, result = exported
    predictor = Predictor(result.model_path)
    meta = predictor.metadata
    assert predictor.class_names == load_manifest(params.data.out_dir)["class_names"]
    pre = predictor.preprocessing
    assert (pre.input_size, pre.resize) == (params.transforms.input_size, params.transforms.resize)
    assert pre.mean == tuple(params.transforms.mean) and pre.std == tuple(params.transforms.std)
    assert pre.interpolation == "bilinear" and meta["crop"] == "center"
    assert params.loss.scale is None and predictor.logit_scale == 20.0  # null: LPT's own scale (lpt.methods)
    assert meta["lpt_format"] == "1" and meta["method"] == "lpt" and meta["precision"] == "fp32"
    assert meta["backbone"] == params.backbone.name
    assert meta["params_sha256"] == "ab" * 32  # the checkpoint's recipe hash
    assert json.loads(meta["model_config"])["top_k"] == params.model.top_k
    assert meta["lpt_version"]


def test_parity_report(exported) -> None:
    params, result = exported
    report = json.loads(Path(result.report_path).read_text())
    n = len(ShardImages(params.data.out_dir, "test"))
    assert report["test"]["num_images"] == result.num_images == n
    assert report["parity"]["max_abs_diff"] == result.max_abs_diff <= params.export.parity.max_abs_diff
    assert report["parity"]["top1_agreement"] == result.top1_agreement == 1.0
    torch_top1, labels = torch_predictions(params)
    assert result.torch_correct == result.ort_correct == int((torch_top1 == labels).sum())
    assert report["variants"]["fp32"]["bytes"] == Path(result.model_path).stat().st_size


def test_int8_and_fp16_variants_are_gated_and_loadable(exported) -> None:
    params, result = exported
    report = json.loads(Path(result.report_path).read_text())
    for precision in ("int8", "fp16"):
        path = result.variants[precision]
        assert path.is_file()
        entry = report["variants"][precision]
        assert entry["accuracy_drop"] <= params.export.max_accuracy_drop
        assert entry["top1_agreement"] > 0.5
        predictor = Predictor(path)
        assert predictor.metadata["precision"] == precision
        assert predictor.class_names == Predictor(result.model_path).class_names
    assert report["variants"]["int8"]["bytes"] < report["variants"]["fp32"]["bytes"]


def test_int8_quantises_matmuls_and_keeps_convolutions_float(tmp_path: Path) -> None:
    """A conv (a hybrid ViT's CNN stem) stays float32; the MatMuls become integer ops."""
    from onnx import TensorProto, helper, numpy_helper

    from lpt.export import quantize_int8

    rng = np.random.default_rng(0)
    conv_w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w")
    mm_w = numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "mm_w")
    shape = numpy_helper.from_array(np.array([1, 64], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),  # [1, 4, 4, 4]
         helper.make_node("Reshape", ["c", "shape"], ["r"]),  # [1, 64]
         helper.make_node("MatMul", ["r", "mm_w"], ["y"])],  # [1, 8]
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [conv_w, mm_w, shape])
    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)
    quantize_int8(src, dst)
    ops = {node.op_type for node in onnx.load(dst).graph.node}
    assert "Conv" in ops and "ConvInteger" not in ops
    assert "MatMul" not in ops and ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    ref = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(dst)).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------ consumer
def test_consumer_matches_torch_top1_on_test_shards(exported) -> None:
    params, result = exported
    data = ShardImages(params.data.out_dir, "test")
    rows = Predictor(result.model_path).predict_images([data[i][0] for i in range(len(data))], top_k=3,
                                                       batch_size=16)
    torch_top1, labels = torch_predictions(params)
    consumer_top1 = np.array([r["labels"][0] for r in rows])
    np.testing.assert_array_equal(consumer_top1, torch_top1)
    assert int((consumer_top1 == labels).sum()) == int((torch_top1 == labels).sum()) == result.torch_correct


def test_lpt_predict_without_torch_on_exported_model(exported, tmp_path: Path) -> None:
    params, result = exported
    data = ShardImages(params.data.out_dir, "test")
    for i in range(6):
        data[i][0].save(tmp_path / f"img{i}.png")
    proc = run_torch_free_cli("predict", str(result.model_path), str(tmp_path), "--top-k", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED []" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = Predictor(result.model_path).predict_paths([tmp_path], top_k=2)
    assert [r["labels"] for r in rows] == [r["labels"] for r in expected]
    assert all(len(r["prompts"]) == params.model.top_k for r in rows)


# ------------------------------------------------------------------------------------------ failures
def test_parity_failure_raises_and_leaves_no_model(tmp_path: Path, tiny_shards: Params) -> None:
    params = params_on_shared_shards(tmp_path, tiny_shards, export__parity__max_abs_diff=1e-12)
    train_stand_in(params)
    with pytest.raises(ExportError) as info:
        run_export(params)
    message = str(info.value)
    assert "max abs logit diff" in message and "1e-12" in message
    out = Path(params.export.out_dir)
    assert not out.exists()
    assert not list(out.parent.rglob("*.onnx")), "no model file (not even a temp one) may be left"


def test_failed_export_keeps_the_previous_export_and_guards_foreign_folders(tmp_path: Path,
                                                                          tiny_shards: Params) -> None:
    params = params_on_shared_shards(tmp_path, tiny_shards)
    train_stand_in(params)
    out = Path(run_export(params).model_path).parent

    def tree() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = tree()
    assert sorted(before) == ["export.json", "model.onnx", "model.raw.onnx", "triton/lpt/1/model.onnx",
                              "triton/lpt/config.pbtxt", "triton/lpt/labels.txt"]
    strict = params.model_copy(deep=True)
    strict.export.parity.max_abs_diff = 1e-12
    with pytest.raises(ParityFailed, match="nothing written"):
        run_export(strict)
    assert tree() == before  # nothing destroyed, nothing half-written
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.onnx")) == [
        "models/export/model.onnx", "models/export/model.raw.onnx", "models/export/triton/lpt/1/model.onnx"]

    (out / "keep.txt").write_text("someone else's file")
    with pytest.raises(OutputDirError, match="export.out_dir .* holds files this project did not write .keep.txt"):
        run_export(params)
    assert (out / "keep.txt").read_text() == "someone else's file"


def test_cli_export_reports_parity_and_fails_cleanly(tmp_path: Path, tiny_shards: Params) -> None:
    from typer.testing import CliRunner

    from lpt.cli import app
    from lpt.config import write_params_atomic

    params = params_on_shared_shards(tmp_path, tiny_shards)
    train_stand_in(params)
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())
    ok = CliRunner().invoke(app, ["export", "--params", str(path)])
    assert ok.exit_code == 0, ok.output
    assert "onnx: " in ok.output and "top-1 agreement 1.0000" in ok.output
    bad = CliRunner().invoke(app, ["export", "--params", str(path), "-S", "export.parity.min_agreement=1.0",
                                   "-S", "export.parity.max_abs_diff=1e-15", "-S", f"export.out_dir={tmp_path / 'x'}"])
    assert bad.exit_code == 5  # lpt.exitcodes.PARITY_FAILED
    assert "max abs logit diff" in bad.output and "1e-15" in bad.output
    assert not (tmp_path / "x").exists()


def test_single_pass_method_exports_logits_only(tmp_path: Path, tiny_shards: Params) -> None:
    params = params_on_shared_shards(tmp_path, tiny_shards, train__method="vpt_deep")
    train_stand_in(params)
    result = run_export(params)
    assert result.top1_agreement == 1.0
    predictor = Predictor(result.model_path)
    assert [o.name for o in predictor.session.get_outputs()] == ["logits"]
    assert predictor.metadata["method"] == "vpt_deep"
    row = predictor.predict_images([ShardImages(params.data.out_dir, "test")[0][0]], top_k=2)[0]
    assert "prompts" not in row and len(row["labels"]) == 2


def test_block_reuse_graph_equals_two_pass_graph(tmp_path: Path, tiny_shards: Params) -> None:
    params = params_on_shared_shards(tmp_path, tiny_shards)
    train_stand_in(params)
    seed_everything(params.seed)
    model, _ = load_trained_model(params)
    reuse = export_onnx(model, tmp_path / "reuse.onnx")
    two_pass = export_onnx(model, tmp_path / "two_pass.onnx", two_pass=True)
    assert onnx.load(str(reuse)).graph.node.__len__() < onnx.load(str(two_pass)).graph.node.__len__()
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a = ort.InferenceSession(str(reuse), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    b = ort.InferenceSession(str(two_pass), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.slow
def test_dynamo_exporter(tmp_path: Path, tiny_shards: Params) -> None:
    params = params_on_shared_shards(tmp_path, tiny_shards, export__dynamo=True)
    train_stand_in(params)
    result = run_export(params)
    assert result.max_abs_diff <= params.export.parity.max_abs_diff and result.top1_agreement == 1.0
    assert Predictor(result.model_path).metadata["exporter"] == "dynamo"
    sess = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        assert sess.run(None, {"image": np.zeros((batch, 3, 32, 32), np.float32)})[0].shape == (batch, 10)


def test_missing_checkpoint_is_an_export_error(tmp_path: Path, tiny_shards: Params) -> None:
    params = params_on_shared_shards(tmp_path, tiny_shards)
    with pytest.raises(ExportError, match="cannot load the trained model: .*phase2"):
        run_export(params)
    assert not Path(params.export.out_dir).exists()


def test_optimized_export_is_faster_graph_with_same_outputs(tmp_path: Path, tiny_shards: Params) -> None:
    """export.optimize: explicit attention + CLS-only last block + folding; standard ops, same outputs."""
    params = params_on_shared_shards(tmp_path, tiny_shards)
    assert params.export.optimize  # the default
    train_stand_in(params)
    seed_everything(params.seed)
    model, _ = load_trained_model(params)
    last, fused = type(model.backbone.blocks[-1]), [b.attn.fused_attn for b in model.backbone.blocks]
    opt = export_onnx(model, tmp_path / "opt.onnx", optimize=True)
    plain = export_onnx(model, tmp_path / "plain.onnx", optimize=False)
    # the rewrites are export-time only: the torch model is left as it was
    assert type(model.backbone.blocks[-1]) is last and [b.attn.fused_attn for b in model.backbone.blocks] == fused
    onnx.checker.check_model(onnx.load(str(opt)), full_check=True)  # standard ONNX ops only
    g_opt, g_plain = onnx.load(str(opt)).graph, onnx.load(str(plain)).graph
    assert {n.domain for n in g_opt.node} <= {"", "ai.onnx"}
    assert len(g_opt.node) < len(g_plain.node)
    assert not {"Sqrt", "Identity"} & {n.op_type for n in g_opt.node}  # SDPA's runtime scale is gone, folded
    with export_rewrites(model, True) as applied:  # what export_onnx(optimize=True) ran
        assert applied == {"explicit_attention": True, "cls_only_last_block": True}
        cls_only = model.backbone.blocks[-1]
        assert isinstance(cls_only, ClsOnlyBlock)
        tokens = torch.randn(3, 17 + params.model.prompt_length, model.backbone.embed_dim)
        with torch.inference_mode():  # the CLS row of the full block, from one row of Q / MLP
            np.testing.assert_allclose(cls_only(tokens).numpy(), cls_only.block(tokens)[:, :1].numpy(), atol=1e-6)
    assert type(model.backbone.blocks[-1]) is last
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    a = ort.InferenceSession(str(opt), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    b = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, {"image": x})
    with torch.inference_mode():
        ref = model(torch.from_numpy(x))
    np.testing.assert_allclose(a[0], ref.logits.numpy(), atol=1e-5)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    np.testing.assert_array_equal(np.sort(a[1], 1), np.sort(b[1], 1))


@pytest.mark.parametrize("optimize", [True, False])
def test_lift_adapters_export_with_parity(tmp_path: Path, optimize: bool) -> None:
    """LIFT's adapters on the residual (norm2 tap + ls2 wrap) go into the graph, optimised (CLS-only last
    block) or not, and ORT matches torch."""
    params = make_tiny_params(tmp_path, train__method="lift", model__adapter_dim=3)
    torch.manual_seed(0)
    model = create_lpt_model(params, 10).eval()
    with torch.no_grad():
        for a in model.adapters:
            a.up.weight.normal_(0, 0.3)
            a.ln.weight.normal_(1, 0.2)
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).logits.numpy()
    path = export_onnx(model, tmp_path / "lift.onnx", optimize=optimize)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    with torch.no_grad():  # the same model with silent adapters: the graph's outputs were the adapters' doing
        for a in model.adapters:
            a.up.weight.zero_()
        assert np.abs(model(torch.from_numpy(x)).logits.numpy() - got).max() > 1e-3


def test_unoptimized_export_still_passes_the_gates(tmp_path: Path, tiny_shards: Params) -> None:
    params = params_on_shared_shards(tmp_path, tiny_shards, export__optimize=False)
    train_stand_in(params)
    result = run_export(params)
    assert result.max_abs_diff <= params.export.parity.max_abs_diff and result.top1_agreement == 1.0
    assert Predictor(result.model_path).metadata["optimized"] == "false"
    assert json.loads(Path(result.report_path).read_text())["optimize"] is False


# ------------------------------------------------------------------------------------------ the gate
@pytest.mark.parametrize("case", ["failed", "missing", "other_checkpoint", "damaged"])
def test_export_refuses_a_checkpoint_without_a_passed_gate(tmp_path: Path, tiny_shards: Params, case: str) -> None:
    """`lpt export` run directly honours the gate verdict for the very checkpoint it exports."""
    from typer.testing import CliRunner

    from lpt.cli import app
    from lpt.config import write_params_atomic

    params = params_on_shared_shards(tmp_path, tiny_shards)
    train_stand_in(params, gate_passed={"failed": False, "missing": None}.get(case, True))
    gate = Path(params.evaluate.out_dir) / "gate.json"
    if case == "other_checkpoint":
        gate.write_text(gate.read_text().replace('"checkpoint_sha256": "', '"checkpoint_sha256": "0'))
    elif case == "damaged":
        gate.write_text('{"passed": tru')
    with pytest.raises(GateNotPassed, match="gate.json"):
        run_export(params)
    assert not Path(params.export.out_dir).exists()
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())
    result = CliRunner().invoke(app, ["export", "--params", str(path)])
    assert result.exit_code == 6 and "Traceback" not in result.output  # lpt.exitcodes.GATE_NOT_PASSED
    assert result.output.startswith("error: ") and "gate" in result.output
