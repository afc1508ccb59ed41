"""Task packs: the pack file, the backbone graph with task inputs, parity against each task's own
single-task export, several tasks in one session, refusals, and `lpt predict --pack` without torch.

Two tasks share one random tiny backbone (``backbone.weights: none`` rebuilds the same weights from the
seed): task A is the tiny default (10 classes, T = 4, P = 4); task B has other data (6 classes) and other
prompt sizes (T = 3, P = 5), so it exercises the graph's dynamic T, P and C.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_params
from test_runtime import RUNTIME_BLOCKED, run_torch_free_cli
from lpt.config import Params
from lpt.data.ingest import run_ingest
from lpt.data.reader import ShardImages, load_manifest
from lpt.export import GateNotPassed, ParityFailed, run_export
from lpt.model.lpt import create_lpt_model
from lpt.pack import (BACKBONE_GRAPH_FILE, PACK_TENSORS, PackError, pack_tensors, run_pack, write_pack)
from lpt.runtime import PACK_METADATA_KEY, PredictError, Predictor, format_predictions, read_pack
from lpt.utils import OutputDirError, write_json_atomic
from test_export import train_stand_in

METRICS = {"overall": 0.5, "few": 0.25, "many": 0.75, "num_samples": 80, "gate_passed": True}


def stand_in_with_metrics(params: Params, gate_passed: bool | None = True) -> None:
    """A 'trained' checkpoint + the gate verdict and metrics ``lpt evaluate`` would write for it."""
    train_stand_in(params, gate_passed)
    write_json_atomic(Path(params.evaluate.out_dir) / "metrics.json", METRICS)


def sample_images(params: Params, n: int | None = None) -> list:
    """The first ``n`` test images (all by default) as Pillow images."""
    data = ShardImages(params.data.out_dir, "test")
    return [data[i][0] for i in range(len(data) if n is None else n)]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Params) -> dict[str, tuple[Params, object, object]]:
    """Task A and task B on the same backbone: each trained (stand-in), exported and packed."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("packs")
    a = make_tiny_params(root / "a", data__out_dir=str(tiny_shards.data.out_dir), pack__name="task_a")
    b = make_tiny_params(root / "b", data__synthetic__num_classes=6, model__prompt_length=3, model__pool_size=5,
                         pack__name="task_b")
    run_ingest(b)
    out = {}
    for name, params in (("a", a), ("b", b)):
        stand_in_with_metrics(params)
        out[name] = (params, run_export(params), run_pack(params))
    return out


# ---------------------------------------------------------------------------------------- the pack file
def test_pack_holds_exactly_the_trainable_tensors_and_its_metadata_in_one_header_key(tasks) -> None:
    from safetensors.numpy import load_file

    params, export, packed = tasks["a"]
    with safe_open(str(packed.pack_path), framework="np") as fh:
        assert list(fh.metadata()) == [PACK_METADATA_KEY]  # one key: byte-reproducible header
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    checkpoint = load_file(str(Path(params.train.out_dir) / "phase2" / "model.safetensors"))
    assert sorted(tensors) == sorted(PACK_TENSORS[k] for k in checkpoint)
    for name, value in checkpoint.items():
        np.testing.assert_array_equal(tensors[PACK_TENSORS[name]], value)
    assert packed.pack_bytes == packed.pack_path.stat().st_size < packed.backbone_bytes / 10

    pack = read_pack(packed.pack_path)
    exported = Predictor(export.model_path)
    assert pack.name == "task_a" and pack.metadata["method"] == "lpt" and pack.metadata["phase"] == 2
    assert pack.class_names == load_manifest(params.data.out_dir)["class_names"] == exported.class_names
    assert pack.preprocessing == exported.preprocessing and pack.logit_scale == exported.logit_scale
    assert pack.backbone_fingerprint == exported.metadata["backbone_fingerprint"]
    assert pack.metadata["recipe_sha256"] == exported.metadata["params_sha256"] == "ab" * 32
    assert pack.metadata["checkpoint_sha256"] == exported.metadata["checkpoint_sha256"]
    assert pack.metadata["metrics"] == METRICS and pack.metadata["gate"]["passed"] is True
    assert pack.geometry == {"task_inputs": ["shared_prompt", "group_prompts", "keys", "head"],
                             "outputs": ["logits", "selected"], "depth": 4, "embed_dim": 48, "shared_blocks": 2,
                             "top_k": 2, "input_size": 32, "ln_eps": 1e-6}
    report = json.loads(packed.report_path.read_text())
    assert report["parity"]["top1_agreement"] == 1.0 and report["test"]["num_images"] == packed.num_images
    assert report["files"]["task_a.pack"]["bytes"] == packed.pack_bytes


def test_pack_outputs_are_byte_identical_when_rerun(tasks, tmp_path: Path) -> None:
    params, _, packed = tasks["a"]
    again = run_pack(params.model_copy(update={"pack": params.pack.model_copy(update={"out_dir": tmp_path / "again"})}))
    for name in ("task_a.pack", BACKBONE_GRAPH_FILE, "pack.json"):
        assert (tmp_path / "again" / name).read_bytes() == (packed.pack_path.parent / name).read_bytes(), name


def test_tasks_of_one_backbone_get_the_same_backbone_graph(tasks) -> None:
    """The graph depends on the backbone and the geometry only: task B's is task A's file, byte for byte."""
    (_, _, a), (_, _, b) = tasks["a"], tasks["b"]
    assert a.backbone_path.read_bytes() == b.backbone_path.read_bytes()
    import onnx

    graph = onnx.load(str(a.backbone_path))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims == {"image": ["batch", 3, 32, 32], "shared_prompt": [4, "prompt_length", 48],
                    "group_prompts": ["pool_size", 2, "prompt_length", 48], "keys": ["pool_size", 48],
                    "head": ["num_classes", 48]}


# ------------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("task", ["a", "b"])
def test_each_pack_on_the_backbone_graph_matches_its_own_single_task_export(tasks, task: str) -> None:
    """Both tasks run on task A's backbone graph (task B with other T, P and C: dynamic axes)."""
    params, export, packed = tasks[task]
    shared_graph = tasks["a"][2].backbone_path
    on_backbone = Predictor(shared_graph, packs=[packed.pack_path], providers=["CPUExecutionProvider"])
    single = Predictor(export.model_path, providers=["CPUExecutionProvider"])
    images = sample_images(params)
    x = np.stack([single.preprocess(im) for im in images])
    logits, selected = on_backbone.run(x, task=f"task_{task}")
    ref_logits, ref_selected = single.run(x)
    assert logits.shape == ref_logits.shape == (len(images), len(single.class_names))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    np.testing.assert_array_equal(np.sort(selected, 1), np.sort(ref_selected, 1))
    rows = on_backbone.predict_images(images, top_k=3)
    expected = single.predict_images(images, top_k=3)
    assert [r["labels"] for r in rows] == [r["labels"] for r in expected]
    assert all(r["task"] == f"task_{task}" for r in rows)


def test_one_session_serves_both_tasks_for_every_image(tasks, tmp_path: Path) -> None:
    (pa, ea, a), (pb, eb, b) = tasks["a"], tasks["b"]
    for i, image in enumerate(sample_images(pa, 5)):
        image.save(tmp_path / f"img{i}.png")
    predictor = Predictor(a.backbone_path, packs=[a.pack_path, b.pack_path])
    assert [p.name for p in predictor.packs] == ["task_a", "task_b"]
    rows = predictor.predict_paths([tmp_path], top_k=2, batch_size=2)
    assert [(Path(r["path"]).name, r["task"]) for r in rows] == [
        (f"img{i}.png", t) for i in range(5) for t in ("task_a", "task_b")]
    for task, export in (("task_a", ea), ("task_b", eb)):
        expected = Predictor(export.model_path).predict_paths([tmp_path], top_k=2)
        got = [r for r in rows if r["task"] == task]
        assert [r["labels"] for r in got] == [r["labels"] for r in expected]
        for g, e in zip(got, expected):
            assert g["scores"] == pytest.approx(e["scores"], abs=1e-5) and sorted(g["prompts"]) == sorted(e["prompts"])
    text = format_predictions(rows, "text").splitlines()
    assert text[1].startswith(rows[1]["path"] + " [task_b]: ")
    assert format_predictions(rows, "csv").splitlines()[0] == "path,task,rank,label,class,score"
    with pytest.raises(PredictError, match="top_k must be between 1 and 6 .*task_b"):
        predictor.predict_paths([tmp_path], top_k=7)


@pytest.mark.parametrize("method", ["vpt_deep", "linear_probe"])
def test_single_pass_methods_pack_with_their_own_graph(tmp_path: Path, tiny_shards: Params, method: str) -> None:
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir), train__method=method)
    stand_in_with_metrics(params)
    export, packed = run_export(params), run_pack(params)
    on_backbone = Predictor(packed.backbone_path, packs=[packed.pack_path])
    assert [i.name for i in on_backbone.session.get_inputs()] == (
        ["image", "shared_prompt", "head"] if method == "vpt_deep" else ["image", "head"])
    assert [o.name for o in on_backbone.session.get_outputs()] == ["logits"]
    images = sample_images(params, 16)
    single = Predictor(export.model_path)
    x = np.stack([single.preprocess(im) for im in images])
    np.testing.assert_allclose(on_backbone.run(x, task=0)[0], single.run(x)[0], atol=1e-5)
    assert "prompts" not in on_backbone.predict_images(images[:1])[0]


# ------------------------------------------------------------------------------------------------ refusals
def _one_line(err: BaseException, *needles: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def _repacked(src: Path, dst: Path, edit) -> Path:
    """A copy of a pack whose metadata went through ``edit`` (a pack as someone else could have written it)."""
    from safetensors.numpy import load_file, save_file

    with safe_open(str(src), framework="np") as fh:
        meta = json.loads(fh.metadata()[PACK_METADATA_KEY])
    edit(meta)
    save_file(load_file(str(src)), str(dst), metadata={PACK_METADATA_KEY: json.dumps(meta)})
    return dst


def test_pack_of_another_backbone_is_refused_naming_both(tasks, tmp_path: Path) -> None:
    _, _, a = tasks["a"]
    other = torch.Generator().manual_seed(1)
    other_fp = f"{int(torch.randint(0, 2**62, (1,), generator=other)):016x}"

    def another_backbone(meta: dict) -> None:
        meta["backbone"]["fingerprint"] = other_fp

    foreign = _repacked(a.pack_path, tmp_path / "foreign.pack", another_backbone)
    with pytest.raises(PredictError) as info:
        Predictor(a.backbone_path, packs=[foreign])
    _one_line(info.value, "foreign.pack", other_fp, str(a.backbone_path), read_pack(a.pack_path).backbone_fingerprint)


def test_pack_whose_geometry_does_not_fit_the_graph_is_refused(tasks, tmp_path: Path, tiny_shards: Params) -> None:
    """A real task with S = 1 and k = 1: its own graph differs, task A's graph is refused naming both."""
    _, _, a = tasks["a"]
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir), model__shared_blocks=1,
                              model__top_k=1, pack__name="task_c")
    stand_in_with_metrics(params)
    packed = run_pack(params)
    assert packed.backbone_path.read_bytes() != a.backbone_path.read_bytes()
    with pytest.raises(PredictError) as info:
        Predictor(a.backbone_path, packs=[packed.pack_path])
    _one_line(info.value, str(packed.pack_path), str(a.backbone_path), "shared_blocks 1 vs 2", "top_k 1 vs 2")


def test_predictor_refuses_mixed_up_files(tasks, tmp_path: Path) -> None:
    _, export, a = tasks["a"]
    with pytest.raises(PredictError, match="backbone graph for task packs, not a single-task export"):
        Predictor(a.backbone_path)
    with pytest.raises(PredictError, match="a single-task export, not a backbone graph"):
        Predictor(export.model_path, packs=[a.pack_path])
    with pytest.raises(PredictError, match="are both task 'task_a'"):
        Predictor(a.backbone_path, packs=[a.pack_path, a.pack_path])
    with pytest.raises(PredictError, match="task must be one of"):
        Predictor(a.backbone_path, packs=[a.pack_path]).run(np.zeros((1, 3, 32, 32), np.float32), task="nope")


@pytest.mark.parametrize("case", ["garbage", "no_metadata", "future_format", "wrong_shape", "missing_tensor"])
def test_damaged_or_foreign_pack_files_are_one_line(tasks, tmp_path: Path, case: str) -> None:
    from safetensors.numpy import load_file, save_file

    _, _, a = tasks["a"]
    path = tmp_path / f"{case}.pack"
    tensors = load_file(str(a.pack_path))
    with safe_open(str(a.pack_path), framework="np") as fh:
        header = fh.metadata()
    if case == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        needle = "not a readable task pack"
    elif case == "no_metadata":
        save_file(tensors, str(path))
        needle = "not an LPT task pack"
    elif case == "future_format":
        _repacked(a.pack_path, path, lambda m: m.update(pack_format=99))
        needle = "format 99 is not supported"
    elif case == "wrong_shape":
        tensors["head"] = np.zeros((10, 47), np.float32)  # D must be the backbone's 48
        save_file(tensors, str(path), metadata=header)
        needle = "'head' has shape [10, 47]"
    else:
        del tensors["keys"]
        save_file(tensors, str(path), metadata=header)
        needle = "but its geometry names"
    with pytest.raises(PredictError) as info:
        read_pack(path)
    _one_line(info.value, str(path), needle)


@pytest.mark.parametrize("case", ["failed", "missing"])
def test_pack_refuses_a_checkpoint_without_a_passed_gate(tmp_path: Path, tiny_shards: Params, case: str) -> None:
    from typer.testing import CliRunner

    from lpt.cli import app
    from lpt.config import write_params_atomic

    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir))
    stand_in_with_metrics(params, gate_passed=False if case == "failed" else None)
    with pytest.raises(GateNotPassed, match="gate.json"):
        run_pack(params)
    assert not Path(params.pack.out_dir).exists()
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())
    result = CliRunner().invoke(app, ["pack", "--params", str(path)])
    assert result.exit_code == 6 and result.output.startswith("error: ") and "Traceback" not in result.output


def test_pack_parity_failure_writes_nothing(tmp_path: Path, tiny_shards: Params) -> None:
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir),
                              export__parity__max_abs_diff=1e-12)
    stand_in_with_metrics(params)
    with pytest.raises(ParityFailed, match="pack-vs-torch max abs logit diff .* 1e-12"):
        run_pack(params)
    assert not Path(params.pack.out_dir).exists()
    assert not list(tmp_path.rglob("*.pack")) and not list(tmp_path.rglob("backbone.onnx"))


def test_method_with_tensors_a_graph_cannot_take_is_refused(tiny_params: Params) -> None:
    """A method that trains more than prompts, keys and head (e.g. adapters) gets one clear line."""
    model = create_lpt_model(tiny_params, 10, phase=2)
    model.register_parameter("adapter", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(PackError) as info:
        pack_tensors(model)
    _one_line(info.value, "method 'lpt'", "['adapter']", "not supported by task packs")
    inside = create_lpt_model(tiny_params, 10, phase=2)  # trainable, but inside the frozen backbone
    inside.backbone.blocks[0].mlp.register_parameter("adapter", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(PackError) as info:
        pack_tensors(inside)
    _one_line(info.value, "['backbone.blocks.0.mlp.adapter']")


def test_pack_out_dir_with_foreign_files_is_refused(tmp_path: Path, tiny_shards: Params) -> None:
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir))
    Path(params.pack.out_dir).mkdir(parents=True)
    (Path(params.pack.out_dir) / "notes.txt").write_text("mine")
    stand_in_with_metrics(params)
    with pytest.raises(OutputDirError, match="pack.out_dir .* holds files this project did not write .notes.txt"):
        run_pack(params)
    assert (Path(params.pack.out_dir) / "notes.txt").read_text() == "mine"


def test_write_pack_is_deterministic(tmp_path: Path, tiny_params: Params) -> None:
    model = create_lpt_model(tiny_params, 10, phase=2)
    meta = {"b": [1, 2], "a": {"z": 1, "y": "x"}}
    first = write_pack(tmp_path / "1.pack", pack_tensors(model), meta).read_bytes()
    assert write_pack(tmp_path / "2.pack", pack_tensors(model), dict(reversed(meta.items()))).read_bytes() == first


# ------------------------------------------------------------------------------------------------ torch-free CLI
# the torch-free consumer with packs: safetensors' numpy reader is allowed, its torch binding is not
PACK_BLOCKED = tuple(m for m in RUNTIME_BLOCKED if m != "safetensors") + ("safetensors.torch",)


def run_pack_consumer(*args: str) -> subprocess.CompletedProcess[str]:
    return run_torch_free_cli(*args, blocked=PACK_BLOCKED)


def test_lpt_predict_with_packs_without_torch(tasks, tmp_path: Path) -> None:
    (pa, _, a), (_, _, b) = tasks["a"], tasks["b"]
    for i, image in enumerate(sample_images(pa, 4)):
        image.save(tmp_path / f"img{i}.png")
    # moved like a plain file copy: the packs from two folders, the backbone graph found beside the first
    proc = run_pack_consumer("predict", "--pack", str(a.pack_path), "--pack", str(b.pack_path), str(tmp_path),
                             "--top-k", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "LEAKED []" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = Predictor(a.backbone_path, packs=[a.pack_path, b.pack_path]).predict_paths([tmp_path], top_k=2)
    key = lambda r: (r["path"], r["task"], r["labels"])  # noqa: E731
    assert [key(r) for r in rows] == [key(r) for r in expected]

    other = run_pack_consumer("predict", "--backbone", str(b.backbone_path), "--pack", str(b.pack_path), str(tmp_path))
    assert other.returncode == 0, other.stderr
    assert len(other.stdout.splitlines()) == 4 and all(" [task_b]: " in line for line in other.stdout.splitlines())


def test_lpt_predict_refusals_are_one_error_line(tasks, tmp_path: Path) -> None:
    _, export, a = tasks["a"]
    sample_images(tasks["a"][0], 1)[0].save(tmp_path / "img.png")

    def another_backbone(meta: dict) -> None:
        meta["backbone"]["fingerprint"] = "0" * 16

    foreign = _repacked(a.pack_path, tmp_path / "foreign.pack", another_backbone)
    for args, code, needles in (
        (["--backbone", str(a.backbone_path), "--pack", str(foreign), str(tmp_path)], 1,
         [str(foreign), "0" * 16, str(a.backbone_path)]),
        (["--pack", str(tmp_path / "absent.pack"), str(tmp_path)], 1, ["absent.pack: no such task pack file"]),
        ([str(export.model_path)], 2, ["at least one image"]),
    ):
        proc = run_pack_consumer("predict", *args)
        assert proc.returncode == code, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("LEAKED")]
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        for needle in needles:
            assert needle in lines[0]


# ------------------------------------------------------------------------------------------------ workflow
@pytest.mark.slow
def test_second_task_with_dvc_reuses_the_frozen_pretrain_output(tmp_path: Path) -> None:
    """The documented multi-task workflow on the project's dvc.yaml (tiny): task A with `dvc repro`, then
    `frozen: true` on the pretrain stage, then task B (other classes, other prompt sizes) as `dvc exp run -S`:
    the pretrain stage does not run again, its backbone file is unchanged, and both packs run on one
    backbone graph next to each other."""
    import shutil

    import yaml

    from test_pipelines import PY, _project_repo, _sh

    repo = _project_repo(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["backbone"]["weights"] = "pretrain"  # the embedded default: the pretrain stage trains the backbone
    params["pack"]["name"] = "task_a"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "task a", cwd=repo)
    _sh(PY, "-m", "dvc", "repro", "-q", cwd=repo)
    backbone_file = repo / "models/pretrain/backbone.safetensors"
    backbone_bytes = backbone_file.read_bytes()
    pretrain_lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["pretrain"]
    deploy = tmp_path / "deploy"  # what would be copied to a consumer: the backbone graph once, then packs
    deploy.mkdir()
    shutil.copy(repo / "models/pack/task_a.pack", deploy)
    shutil.copy(repo / "models/pack/backbone.onnx", deploy)

    # `dvc freeze pretrain` refuses templated stages ("cannot dump a parametrized stage"): the line by hand
    dvc_yaml = (repo / "dvc.yaml").read_text()
    assert dvc_yaml.count("\n  pretrain:\n") == 1
    (repo / "dvc.yaml").write_text(dvc_yaml.replace("\n  pretrain:\n", "\n  pretrain:\n    frozen: true\n"))
    _sh("git", "add", "-A", cwd=repo)
    _sh("git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "task a done; backbone frozen", cwd=repo)
    log = _sh(PY, "-m", "dvc", "exp", "run", "-n", "task_b", "-S", "data.synthetic.num_classes=6",
              "-S", "model.prompt_length=3", "-S", "model.pool_size=5", "-S", "pack.name=task_b", cwd=repo)
    assert "Running stage 'pretrain'" not in log and "Running stage 'pack'" in log
    assert backbone_file.read_bytes() == backbone_bytes
    # a frozen stage keeps its outputs; DVC records the current inputs beside them in dvc.lock
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["pretrain"]["outs"] == pretrain_lock["outs"]
    assert (repo / "models/pack/backbone.onnx").read_bytes() == (deploy / "backbone.onnx").read_bytes()
    shutil.copy(repo / "models/pack/task_b.pack", deploy)

    predictor = Predictor(deploy / "backbone.onnx", packs=[deploy / "task_a.pack", deploy / "task_b.pack"])
    assert [len(p.class_names) for p in predictor.packs] == [10, 6]
    rows = predictor.predict_arrays(np.zeros((2, 3, 32, 32), np.float32))
    assert [r["task"] for r in rows] == ["task_a", "task_b"] * 2


@pytest.mark.parametrize("where", ["beside_the_pack", "--backbone"])
def test_damaged_backbone_graph_is_one_line_exit_2(tasks, tmp_path: Path, where: str) -> None:
    """`lpt predict --pack` on a truncated backbone graph (ONNX Runtime cannot load it): one `error:` line
    naming the graph file, exit 2, whether the graph is the one beside the pack or given with --backbone."""
    import shutil

    from PIL import Image
    from typer.testing import CliRunner

    from lpt.cli import app

    _, _, a = tasks["a"]
    pack = Path(shutil.copy(a.pack_path, tmp_path / Path(a.pack_path).name))
    graph = tmp_path / (BACKBONE_GRAPH_FILE if where == "beside_the_pack" else "cut.onnx")
    data = Path(a.backbone_path).read_bytes()
    graph.write_bytes(data[: len(data) // 3])
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30), (200, 30, 90)).save(image)
    args = ["predict", "--pack", str(pack), str(image)] + (["--backbone", str(graph)] if where == "--backbone" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {graph}: cannot load as an ONNX model"), result.output
