"""run_evaluate / gate / plots / report / compare on the tiny config (tiny ViT, 10 classes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from lpt.config import Params, write_params_atomic
from conftest import REPO_ROOT, make_tiny_params, tiny_raw_params

torch = pytest.importorskip("torch")


def _params(root: Path, shards: Params, **overrides) -> Params:
    """Tiny params with outputs under ``root`` and the session's (read-only) shards as data."""
    return make_tiny_params(root, data__out_dir=str(shards.data.out_dir),
                            **overrides)


@pytest.fixture(scope="module")
def trained(tiny_shards: Params, tmp_path_factory: pytest.TempPathFactory) -> Params:
    """Both LPT phases trained once on the tiny data (a few seconds on 2 cores)."""
    from lpt.train import run_phase

    torch.set_num_threads(1)
    params = _params(tmp_path_factory.mktemp("trained"), tiny_shards,
                     train__phase1__epochs=4, train__phase2__epochs=2)
    run_phase(params, 1)
    run_phase(params, 2)
    return params


def _save_untrained(params: Params, collapse_head: bool = False) -> Params:
    """Save a never-trained final checkpoint (random prompts, keys, head) through the model's own writer."""
    from lpt.data.reader import load_manifest
    from lpt.model.lpt import create_lpt_model, save_trained_model
    from lpt.utils import seed_everything

    manifest = load_manifest(params.data.out_dir)
    seed_everything(params.seed)  # the same random backbone evaluation rebuilds (backbone.weights: none)
    model = create_lpt_model(params, manifest["num_classes"], phase=2)
    if collapse_head:  # every class weight identical: (near-)tied cosines, one class predicted for everything
        with torch.no_grad():
            model.head.weight.fill_(1.0)
    save_trained_model(model, Path(params.train.out_dir) / "phase2",
                       {"class_counts": manifest["train_counts"], "best_val_acc": None})
    return params


@pytest.fixture
def untrained(tiny_shards: Params, tmp_path: Path) -> Params:
    """Untrained prompts and a random head."""
    return _save_untrained(_params(tmp_path / "untrained", tiny_shards))


@pytest.fixture
def collapsed(tiny_shards: Params, tmp_path: Path) -> Params:
    """Untrained prompts and a collapsed head (a classic broken-training outcome: one class for everything)."""
    return _save_untrained(_params(tmp_path / "collapsed", tiny_shards), collapse_head=True)


def _with(params: Params, root: Path, **overrides) -> Params:
    """Same model and data, evaluation written under ``root`` with extra overrides."""
    ov = {"evaluate.out_dir": str(root)} | {k.replace("__", "."): v for k, v in overrides.items()}
    from lpt.config import apply_overrides, parse_params

    return parse_params(apply_overrides(params.to_dict(), ov))


def _declared_plots(raw: dict | None = None) -> list[str]:
    """The top-level plots of dvc.yaml, their ``${...}`` resolved against ``raw`` params (default params.yaml)."""
    import re

    raw = raw if raw is not None else yaml.safe_load((REPO_ROOT / "params.yaml").read_text())

    def value(m: re.Match) -> str:
        node = raw
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    return [re.sub(r"\$\{([^}]+)\}", value, next(iter(p)) if isinstance(p, dict) else p) for p in spec["plots"]]


def test_run_evaluate_writes_metrics_plots_figures_report(trained: Params, tmp_path: Path):
    from lpt.data.reader import load_manifest

    params = _with(trained, tmp_path / "reports")
    result = run_evaluate_ok(params)
    manifest = load_manifest(params.data.out_dir)
    n_test = manifest["splits"]["test"]["count"]

    metrics = json.loads(result.metrics_path.read_text())
    for key in ("overall", "top5", "many", "medium", "few", "many_authors", "medium_authors", "few_authors",
                "mean_per_class", "ece", "trainable_share", "gate_passed"):
        assert key in metrics, key
    assert all(isinstance(v, (int, float, bool)) or v is None for v in metrics.values())  # metrics, not config
    assert metrics["gate_passed"] is True
    gate = json.loads((Path(params.evaluate.out_dir) / "gate.json").read_text())
    checkpoint = json.loads((Path(params.train.out_dir) / "phase2/model.json").read_text())
    assert gate["passed"] is True and gate["checkpoint_sha256"] == checkpoint["weights_sha256"]
    assert metrics["num_samples"] == n_test
    assert 0.0 <= metrics["overall"] <= metrics["top5"] <= 1.0
    assert 0.0 <= metrics["ece"] <= 1.0
    assert 0.0 < metrics["trainable_share"] < 1.0

    plots = Path(params.evaluate.out_dir) / "plots"
    per_class = json.loads((plots / "per_class_accuracy.json").read_text())
    assert [r["train_count"] for r in per_class] == manifest["train_counts"]
    confusion = json.loads((plots / "confusion.json").read_text())
    assert len(confusion) == n_test and set(confusion[0]) == {"actual", "predicted"}
    usage = json.loads((plots / "prompt_usage.json").read_text())
    assert sum(r["count"] for r in usage) == n_test * params.model.top_k
    assert {r["prompt"] for r in usage} == {f"p{p:02d}" for p in range(params.model.pool_size)}

    figs = Path(params.evaluate.out_dir) / "figures"
    for name in ("per_class_accuracy.png", "confusion.png", "prompt_usage.png"):
        assert (figs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    report = result.report_path.read_text()
    assert "| many |" in report and "| few |" in report and "figures/per_class_accuracy.png" in report
    assert f"{100 * metrics['overall']:.2f}" in report

    # every plot declared in dvc.yaml exists after evaluate (training curves come from dvclive)
    for declared in _declared_plots(params.to_dict()):
        assert Path(declared).exists(), declared


def run_evaluate_ok(params: Params):
    from lpt.evaluate import run_evaluate

    result = run_evaluate(params)
    assert result.gate_passed, result.gate_failures
    return result


def test_metrics_agree_with_the_model(trained: Params, tmp_path: Path):
    """metrics.json's overall equals a direct pass over the test split with the model's own forward."""
    from torch.utils.data import DataLoader

    from lpt.data.reader import ShardImages, TransformedDataset, build_transform
    from lpt.evaluate import run_evaluate
    from lpt.model.lpt import load_trained_model

    params = _with(trained, tmp_path / "reports")
    metrics = run_evaluate(params).metrics
    from lpt.utils import seed_everything

    seed_everything(params.seed)  # backbone.weights "none": the same random backbone as training
    model, _ = load_trained_model(params)
    ds = TransformedDataset(ShardImages(Path(params.data.out_dir), "test"), build_transform(params.transforms, False))
    hits = []
    with torch.inference_mode():
        for x, y in DataLoader(ds, batch_size=32):
            hits.append((model.forward_two_pass(x).logits.argmax(1) == y).numpy())
    assert metrics["overall"] == pytest.approx(float(np.concatenate(hits).mean()))


def test_tte_metrics_are_the_five_views_averaged_and_kept_apart(trained: Params, tmp_path: Path):
    """``evaluate.tte: five_crop`` adds tte_* metrics equal to a direct pass over the five views with their
    cosines averaged; the single-crop metrics and the gate verdict are the same as without it."""
    from torch.utils.data import DataLoader

    from lpt.data.reader import ShardImages, TransformedDataset, five_crop_transform
    from lpt.evaluate import run_evaluate
    from lpt.model.lpt import load_trained_model
    from lpt.utils import seed_everything

    plain = run_evaluate(_with(trained, tmp_path / "plain")).metrics
    params = _with(trained, tmp_path / "tte", evaluate__tte="five_crop")
    metrics = run_evaluate(params).metrics
    assert {k: v for k, v in metrics.items() if not k.startswith("tte_")} == plain
    assert not any(k.startswith("tte_") for k in plain)

    seed_everything(params.seed)
    model, _ = load_trained_model(params)
    ds = TransformedDataset(ShardImages(Path(params.data.out_dir), "test"), five_crop_transform(params.transforms))
    hits = []
    with torch.inference_mode():
        for x, y in DataLoader(ds, batch_size=8):  # [B, 5, 3, H, W]
            cos = model.forward_two_pass(x.flatten(0, 1)).logits.reshape(x.shape[0], 5, -1).mean(1)
            hits.append((cos.argmax(1) == y).numpy())
    assert metrics["tte_overall"] == pytest.approx(float(np.concatenate(hits).mean()))


def test_five_crop_views_are_the_corners_and_centre_of_the_resized_image():
    from PIL import Image

    from lpt.config import TransformConfig
    from lpt.data.reader import five_crop_transform

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    cfg = TransformConfig(input_size=32, resize=32, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    views = five_crop_transform(cfg)(img)
    assert tuple(views.shape) == (5, 3, 32, 32)
    # shorter side 40 -> round(32 * 248 / 224) = 35, longer 48 -> 42 (Pillow bilinear, antialiased)
    big = np.asarray(img.resize((42, 35), Image.BILINEAR), dtype=np.float32) / 255.0  # [35, 42, 3]
    # the centre crop starts at round(3 / 2) = 2 rows (torchvision rounds half to even) and 5 columns
    want = {0: big[:32, :32], 1: big[:32, -32:], 2: big[-32:, :32], 3: big[-32:, -32:], 4: big[2:34, 5:37]}
    for i, crop in want.items():
        np.testing.assert_allclose(views[i].permute(1, 2, 0).numpy(), crop, atol=2 / 255)


def test_tte_averages_cosines_rather_than_voting():
    """Four views lean weakly to class 0, one strongly to class 1: the average picks 1 (a vote would pick 0)."""
    from lpt.evaluate import collect_stats
    from lpt.model.lpt import LPTOutput

    class Views(torch.nn.Module):
        def forward(self, x):  # [B*5, 3, H, W] -> cosines from the first pixel: view index
            v = x[:, 0, 0, 0]
            logits = torch.stack([torch.where(v < 4, 0.1, 0.0), torch.where(v < 4, 0.0, 1.0)], dim=1)
            return LPTOutput(logits=logits, sim=torch.zeros(()), selected=None, features=logits)

    x = torch.arange(5, dtype=torch.float32).reshape(1, 5, 1, 1, 1).expand(2, 5, 3, 2, 2).contiguous()
    stats = collect_stats(Views(), [(x, torch.tensor([1, 0]))], scale=20.0)
    assert stats.pred.tolist() == [1, 1]


def test_gate_passes_trained_fails_broken(trained: Params, collapsed: Params, tmp_path: Path):
    """The same thresholds (above chance = 0.10 on 10 classes) pass a trained and fail a broken model."""
    from lpt.evaluate import run_evaluate

    gate = {"evaluate__gate__min_overall": 0.25, "evaluate__gate__min_few": 0.2}
    good = run_evaluate(_with(trained, tmp_path / "good", **gate))
    bad = run_evaluate(_with(collapsed, tmp_path / "bad", **gate))
    assert good.gate_passed, good.gate_failures
    assert not bad.gate_passed
    assert bad.metrics["overall"] <= 0.15  # ~ one class of a balanced 10-class test set
    o, f = bad.metrics["overall"], bad.metrics["few"]
    assert bad.gate_failures == [f"overall = {o:.4f} < min_overall = 0.2500", f"few = {f:.4f} < min_few = 0.2000"]
    written = json.loads(bad.metrics_path.read_text())  # metrics are written even when the gate fails
    gate = json.loads((tmp_path / "bad" / "gate.json").read_text())
    assert written["gate_passed"] is False and gate["passed"] is False and gate["failures"] == bad.gate_failures


def test_cli_exits_nonzero_naming_metric_value_threshold(untrained: Params, tmp_path: Path):
    from lpt.cli import app

    params = _with(untrained, tmp_path / "reports", evaluate__gate__min_overall=0.9, evaluate__gate__min_few=0.8)
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())
    res = CliRunner().invoke(app, ["evaluate", "--params", str(path)])
    assert res.exit_code == 4  # lpt.exitcodes.GATE_FAILED
    out = res.output
    assert "quality gate failed" in out
    assert "overall = 0." in out and "min_overall = 0.9000" in out
    assert "few = " in out and "min_few = 0.8000" in out
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["gate_passed"] is False


def test_gate_max_drop_vs_probe(untrained: Params, tmp_path: Path):
    from lpt.evaluate import run_evaluate

    probe = tmp_path / "probe_metrics.json"
    probe.write_text(json.dumps({"overall": 0.99}))
    res = run_evaluate(_with(untrained, tmp_path / "r1", evaluate__gate__max_drop_vs_probe=0.05,
                             evaluate__gate__probe_metrics=str(probe)))
    assert not res.gate_passed and "max_drop_vs_probe = 0.0500" in res.gate_failures[0]
    # no probe metrics file: the check is skipped, not failed
    res = run_evaluate(_with(untrained, tmp_path / "r2", evaluate__gate__max_drop_vs_probe=0.05,
                             evaluate__gate__probe_metrics=str(tmp_path / "missing.json")))
    assert res.gate_passed and json.loads((tmp_path / "r2" / "gate.json").read_text())["probe_overall"] is None


def test_gate_requires_beating_the_pixel_baselines_on_the_same_split(trained: Params, tmp_path: Path):
    from lpt.baselines import run_pixel_baseline
    from lpt.evaluate import run_evaluate

    ncm = run_pixel_baseline("pixel_ncm", trained).metrics["overall"]
    easy = run_evaluate(_with(trained, tmp_path / "easy", evaluate__gate__pixel_baselines=["pixel_ncm"],
                              evaluate__gate__min_margin_vs_pixels=-1.0))
    verdict = json.loads((tmp_path / "easy" / "gate.json").read_text())
    assert easy.gate_passed and verdict["pixel_overall"] == {"pixel_ncm": pytest.approx(ncm)}
    margin = easy.metrics["overall"] - ncm + 0.01  # just out of reach
    hard = run_evaluate(_with(trained, tmp_path / "hard", evaluate__gate__pixel_baselines=["pixel_ncm"],
                              evaluate__gate__min_margin_vs_pixels=margin))
    assert not hard.gate_passed
    assert hard.gate_failures == [f"overall = {hard.metrics['overall']:.4f} does not beat the pixel_ncm baseline on "
                                  f"the same split ({ncm:.4f}) by more than min_margin_vs_pixels = {margin:.4f}"]
    assert "pixel_ncm" in (tmp_path / "hard" / "report.md").read_text()


def test_a_group_absent_from_the_data_is_a_named_note_not_a_failure(tiny_params: Params) -> None:
    from lpt.gate import check_gate, missing_groups

    params = _with(tiny_params, Path("/unused"), evaluate__gate__min_overall=0.5, evaluate__gate__min_few=0.5)
    metrics = {"overall": 0.6, "few": float("nan")}  # no class under 20 training images
    assert check_gate(metrics, params) == []
    assert missing_groups(metrics, params) == ["few: no class of this data set is in the few group (standard: < 20 "
                                               "training images), so min_few = 0.5000 was not applied"]
    assert check_gate({"overall": 0.6, "few": 0.4}, params) == ["few = 0.4000 < min_few = 0.5000"]
    assert missing_groups({"overall": 0.6, "few": 0.4}, params) == []


def test_dvc_renders_declared_plots(trained: Params, tmp_path: Path):
    """`dvc plots show` renders every top-level plot of dvc.yaml from the files evaluate/train wrote."""
    from lpt.evaluate import run_evaluate

    repo = tmp_path / "repo"
    repo.mkdir()
    run_evaluate(_with(trained, repo / "reports"))
    for phase in ("phase1", "phase2"):
        live = Path(trained.train.out_dir) / phase / "live"
        if live.is_dir():
            shutil.copytree(live, repo / "models" / phase / "live")
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=repo, check=True, env=env)
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_raw_params(), sort_keys=False))  # for ${...}
    shutil.copytree(REPO_ROOT / ".dvc" / "plots", repo / ".dvc" / "plots", dirs_exist_ok=True)
    out = subprocess.run([*dvc, "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert not shown.get("errors"), shown["errors"]
    for declared in _declared_plots():
        # a declared folder (dvclive's plots/metrics) renders as one plot per file inside it
        assert any(k == declared or k.startswith(declared + "/") for k, v in shown["data"].items() if v), declared
    scatter = shown["data"]["reports/plots/per_class_accuracy.json"][0]["content"]
    assert scatter["encoding"]["x"]["scale"]["type"] == "log"


def test_failing_gate_fails_the_dvc_stage_and_export_never_runs(untrained: Params, tmp_path: Path):
    """The real evaluate stage of dvc.yaml in a temp DVC repo, followed by a stand-in export stage."""
    from lpt.config import apply_overrides

    repo = tmp_path / "repo"
    shutil.copytree(untrained.data.out_dir, repo / "data" / "shards")
    shutil.copytree(Path(untrained.train.out_dir) / "phase2", repo / "models" / "phase2")
    raw = apply_overrides(tiny_raw_params(), {"evaluate.gate.min_overall": 0.9})
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    evaluate = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    evaluate["cmd"] = f"{sys.executable} -m lpt evaluate"
    evaluate["deps"] = ["data/shards", "models/phase2"]  # the library code is not copied into the temp repo
    export = {"cmd": "echo exported > exported.txt", "deps": ["reports/metrics.json"], "outs": ["exported.txt"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": evaluate, "export": export}}))
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=env)
    out = subprocess.run([sys.executable, "-m", "dvc", "repro", "export"], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "min_overall = 0.9000" in out.stdout + out.stderr
    assert not (repo / "exported.txt").exists()
    assert json.loads((repo / "reports" / "gate.json").read_text())["passed"] is False


@pytest.mark.slow
def test_compare_table(tiny_shards: Params, tmp_path: Path):
    from lpt.compare import ALL_ROWS, run_compare

    torch.set_num_threads(1)
    params = _params(tmp_path, tiny_shards)
    out = run_compare(params, list(ALL_ROWS), tmp_path / "table.md")  # every row, one seed
    text = out.read_text()
    assert "| linear probe (CE) | 1 |" in text and "| LPT | 1 |" in text and "few (<=20, auth.)" in text
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert list(rows) == list(ALL_ROWS) and all("overall" in r["mean"] for r in rows.values())
    assert (tmp_path / "reports/compare/synthetic/lpt/seed0/models/phase2/model.safetensors").is_file()
    assert text.count("not called") == 2 * (len(ALL_ROWS) - 1)  # one seed: no spread, nothing called


def test_compare_table_and_target_verdict():
    from lpt.compare import compare_table, target_verdict

    rows = {"linear_probe": {"overall": 0.60, "many": 0.9, "medium": 0.6, "few": 0.20, "few_authors": 0.25, "val_acc": 0.61},
            "lpt": {"overall": 0.58, "many": 0.8, "medium": 0.6, "few": 0.30, "few_authors": None, "val_acc": 0.59}}
    table = compare_table(rows)
    assert "| linear_probe | 60.00 | 90.00 | 60.00 | 20.00 |" in table
    assert "| lpt | 58.00 |" in table and "| – |" in table  # a missing group renders as a dash
    verdict = target_verdict(rows)
    assert "few: LPT − linear probe = +10.00 points (target >= +10 points) — met" in verdict
    assert "overall: LPT − linear probe = -2.00 points (target >= 0 points) — missed by 2.00 points" in verdict
    assert "needs both" in target_verdict({"lpt": rows["lpt"]})


def test_results_page_keeps_hand_written_notes(tiny_params: Params, tmp_path: Path, monkeypatch):
    """`lpt compare --sources` regenerates the tables but keeps everything below the notes marker."""
    import lpt.compare as E

    def fake_compare(params, methods, out, seeds):  # one table per source, no training
        path = tmp_path / f"{params.data.source}.md"
        path.write_text(f"### {params.data.source} table ({','.join(methods)})\n")
        path.with_suffix(".json").write_text(json.dumps({"seeds": [0], "rows": {}}))
        return path

    monkeypatch.setattr(E, "run_compare", fake_compare)
    out = tmp_path / "results.md"
    E.run_results(tiny_params, ["lpt"], ["synthetic", "fashion_mnist"], out)
    out.write_text(out.read_text() + "\nWhy the numbers are what they are.\n")
    E.run_results(tiny_params, ["linear_probe", "lpt"], ["synthetic", "fashion_mnist"], out)
    text = out.read_text()
    assert "### synthetic table (linear_probe,lpt)" in text and "### fashion_mnist table (linear_probe,lpt)" in text
    assert "(lpt)\n" not in text  # the old tables are gone
    assert text.count("Why the numbers are what they are.") == 1
