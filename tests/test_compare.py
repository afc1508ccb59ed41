"""`lpt compare`: pixel baselines, seed statistics and tie calls, the results page (notes, README block),
and one end-to-end run on the tiny config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lpt.baselines import logreg_fit, logreg_scores, ncm_fit, ncm_scores
from lpt.compare import (CompareError, NOTES_MARKER, README_END, README_START, aggregate, budget, call_difference,
                         run_results, tte_table, update_readme, verdict_lines)
from lpt.config import Params

from conftest import make_tiny_params


# ----------------------------------------------------------------------------------- pixel baselines
def test_nearest_class_mean_by_hand() -> None:
    x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]], np.float32)  # class 0 mean (1, 0); class 1 mean (10, 10)
    y = np.array([0, 0, 1])
    means = ncm_fit(x, y, 3)  # class 2 has no images
    assert np.allclose(means[:2], [[1.0, 0.0], [10.0, 10.0]]) and np.isnan(means[2]).all()
    scores = ncm_scores(means, np.array([[1.0, 1.0], [6.0, 6.0]], np.float32))
    # squared distances: (0 + 1, 81 + 81) and (25 + 36, 16 + 16)
    assert np.allclose(scores[:, :2], [[-1.0, -162.0], [-61.0, -32.0]])
    assert scores[:, 2].tolist() == [-np.inf, -np.inf] and scores.argmax(1).tolist() == [0, 1]


def test_logistic_regression_separates_and_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, (40, 5)), rng.normal(2, 1, (8, 5))]).astype(np.float32)
    y = np.array([0] * 40 + [1] * 8)
    a, b = logreg_fit(x, y, 2, l2=1e-3), logreg_fit(x, y, 2, l2=1e-3)
    assert np.array_equal(a["weight"], b["weight"])
    assert (logreg_scores(a, x).argmax(1) == y).mean() == 1.0
    strong = logreg_fit(x, y, 2, l2=10.0)
    assert np.abs(strong["weight"]).sum() < np.abs(a["weight"]).sum()  # the penalty shrinks the weights


@pytest.mark.slow
def test_pixel_ncm_on_fashion_mnist_lt(tmp_path: Path) -> None:
    """The project's Fashion-MNIST-LT split (1,236 train images, 500 -> 5, official 10k test): pixel NCM on the
    32-px test-time pixels reaches 66.21 % overall / 78.50 % few (the issue quoted 66.6 / 78.9; see docs)."""
    from lpt.baselines import run_pixel_baseline
    from lpt.data.ingest import run_ingest

    root = Path("/usr/share/datasets/fashion-mnist")
    if not (root / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST IDX files not installed (Debian package dataset-fashion-mnist)")
    params = make_tiny_params(tmp_path, data__source="fashion_mnist", data__imbalance_ratio=100,
                              data__max_per_class=500, data__val_per_class=20, data__shard_maxcount=5000)
    run_ingest(params)
    result = run_pixel_baseline("pixel_ncm", params)
    assert result.metrics["num_samples"] == 10000
    assert result.metrics["overall"] == pytest.approx(0.6621, abs=1e-4)
    assert result.metrics["few"] == pytest.approx(0.7850, abs=1e-4)


# ---------------------------------------------------------------------------------------- statistics
def _cell(overall: float, few: float, seed: int | None = 0) -> dict:
    return {"seed": seed, "epochs": [4, 0], "metrics": {"overall": overall, "few": few, "ece": None},
            "train_seconds": 10.0, "infer_ms_per_image": 1.0}


def test_aggregate_is_mean_and_sample_std() -> None:
    row = aggregate([_cell(0.5, 0.1, 0), _cell(0.7, 0.3, 1)])
    assert row["n"] == 2 and row["seeds"] == [0, 1]
    assert row["mean"]["overall"] == pytest.approx(0.6) and row["std"]["overall"] == pytest.approx(math.sqrt(0.02))
    assert "ece" not in row["mean"]  # a None metric is absent, not zero
    assert aggregate([_cell(0.5, 0.1)])["std"]["overall"] is None


def test_differences_within_the_spread_are_ties() -> None:
    lpt = aggregate([_cell(0.60, 0.40, 0), _cell(0.62, 0.44, 1)])  # sd 0.0141 / 0.0283
    probe = aggregate([_cell(0.58, 0.10, 0), _cell(0.60, 0.12, 1)])  # sd 0.0141 / 0.0141
    overall = call_difference(lpt, probe, "overall")
    assert overall["diff"] == pytest.approx(0.02) and overall["spread"] == pytest.approx(0.02)
    assert overall["call"] == "tie"  # |0.02| <= sqrt(0.0141² + 0.0141²) = 0.02
    few = call_difference(lpt, probe, "few")
    assert few["call"] == "win" and call_difference(probe, lpt, "few")["call"] == "loss"
    deterministic = aggregate([_cell(0.30, 0.50, None)])  # a pixel baseline: no spread of its own
    assert call_difference(lpt, deterministic, "few")["call"] == "loss"  # -0.08 beyond 0.0283
    single = aggregate([_cell(0.61, 0.42)])
    assert call_difference(single, deterministic, "overall") == {"diff": pytest.approx(0.31), "spread": None,
                                                                 "call": "not called"}
    lines = verdict_lines({"linear_probe": probe, "lpt": lpt})
    assert lines == ["- vs linear probe (CE) (`linear_probe`): overall +2.00 points (spread ±2.00): tie (within the "
                     "spread); few +31.00 points (spread ±3.16): **win**"]


def test_tte_metrics_get_a_table_of_their_own() -> None:
    """TTE figures never enter the single-crop table: their own table, rows without TTE left out."""
    def with_tte(overall: float, few: float, seed: int) -> dict:
        cell = _cell(overall, few, seed)
        cell["metrics"].update(tte_overall=overall + 0.01, tte_few=few + 0.02)
        return cell

    rows = {"pixel_ncm": aggregate([_cell(0.3, 0.2, None)]),
            "lift": aggregate([with_tte(0.50, 0.30, 0), with_tte(0.52, 0.32, 1)]),
            "lpt": aggregate([with_tte(0.60, 0.40, 0), with_tte(0.62, 0.44, 1)])}
    table = tte_table(rows).splitlines()
    assert table[0].startswith("| method | seeds | overall | many | medium | few (<20) | ECE |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| LIFT", "| LPT"]  # no pixel row
    assert table[3].split(" | ")[2] == "62.00 ± 1.41"  # LPT's tte_overall: 61 and 63
    assert tte_table({"pixel_ncm": rows["pixel_ncm"]}) is None


def test_every_method_gets_the_same_epoch_budget(tiny_params: Params) -> None:
    p = make_tiny_params(Path("/unused"), train__phase1__epochs=3, train__phase2__epochs=2)
    assert budget(p, "lpt") == (3, 2)
    assert {budget(p, m) for m in ("linear_probe", "linear_probe_cb", "vpt_deep_la", "lift", "lpt_phase1")} == {(5, 0)}


def test_compare_refuses_shards_of_another_source(tiny_shards: Params, tmp_path: Path) -> None:
    from lpt.compare import run_compare

    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir), data__source="fashion_mnist")
    with pytest.raises(CompareError, match="the shards are of data.source 'synthetic', not 'fashion_mnist'"):
        run_compare(params, ["pixel_ncm"], tmp_path / "t.md")


def test_one_phase_methods_get_both_step_floors(tiny_params: Params) -> None:
    from lpt.compare import _cell_params

    p = make_tiny_params(Path("/unused"), train__phase1__min_steps=30, train__phase2__min_steps=20)
    assert _cell_params(p, "lpt", 0).train.phase1.min_steps == 30
    assert _cell_params(p, "lpt", 0).train.phase2.min_steps == 20
    assert {_cell_params(p, m, 0).train.phase1.min_steps for m in ("linear_probe_cb", "lift", "lpt_phase1")} == {50}


# ---------------------------------------------------------------------------------------- the page
def _fake_compare(tmp_path: Path, value: list[float]):
    def fake(params, methods, out, seeds):  # one table per source, no training
        path = tmp_path / f"{params.data.source}.md"
        path.write_text(f"### {params.data.source} table ({','.join(methods)}) {value[0]}\n")
        rows = {m: aggregate([_cell(value[0], 0.2, s) for s in seeds]) for m in methods}
        path.with_suffix(".json").write_text(json.dumps({"source": params.data.source, "seeds": list(seeds), "rows": rows}))
        return path
    return fake


def test_results_page_keeps_notes_and_flags_them_when_the_tables_change(tiny_params: Params, tmp_path: Path,
                                                                         monkeypatch) -> None:
    import lpt.compare as E

    value = [0.5]
    monkeypatch.setattr(E, "run_compare", _fake_compare(tmp_path, value))
    out = tmp_path / "results.md"
    run_results(tiny_params, ["lpt"], ["synthetic", "fashion_mnist"], out, [0, 1])
    text = out.read_text()
    sha = text.split("Tables `", 1)[1].split("`", 1)[0]
    assert "Stale notes" in text.split(NOTES_MARKER)[1]  # nothing written for these tables yet
    assert "--seeds 0,1 --out" in text
    # the author writes notes for these tables and stamps them
    out.write_text(text.split(NOTES_MARKER)[0] + NOTES_MARKER + f"\n<!-- notes written for tables {sha} -->\nLPT wins.\n")
    run_results(tiny_params, ["linear_probe", "lpt"], ["synthetic", "fashion_mnist"], out, [0, 1])
    text = out.read_text()
    assert "### synthetic table (linear_probe,lpt)" in text and "(lpt) 0.5\n" not in text  # old tables gone
    assert text.count("LPT wins.") == 1 and "Stale notes" in text  # other tables now: flagged
    sha2 = text.split("Tables `", 1)[1].split("`", 1)[0]
    notes = text.split(NOTES_MARKER)[1].replace(f"tables {sha} -->", f"tables {sha2} -->")
    out.write_text(text.split(NOTES_MARKER)[0] + NOTES_MARKER + notes)  # rewritten for the new tables
    run_results(tiny_params, ["linear_probe", "lpt"], ["synthetic", "fashion_mnist"], out, [0, 1])
    text = out.read_text()
    assert "Stale notes" not in text and text.count("LPT wins.") == 1


def test_readme_block_is_replaced_between_its_markers(tiny_params: Params, tmp_path: Path, monkeypatch) -> None:
    import lpt.compare as E

    monkeypatch.setattr(E, "run_compare", _fake_compare(tmp_path, [0.5]))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\noutro\n")
    run_results(tiny_params, ["linear_probe", "lpt"], ["synthetic", "fashion_mnist"], tmp_path / "r.md", [0, 1], readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\noutro\n") and "old table" not in text
    assert "| **LPT** | 50.00 ± 0.00 | 20.00 ± 0.00 | 50.00 ± 0.00 | 20.00 ± 0.00 |" in text
    assert "--readme" in text
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(CompareError, match="no results block"):
        update_readme(tmp_path / "plain.md", "x")


def test_cli_refuses_bad_rows_and_seeds_in_one_line(tiny_params: Params, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lpt.cli import app
    from lpt.config import write_params_atomic

    write_params_atomic(tmp_path / "p.yaml", tiny_params.to_dict())
    runner = CliRunner()
    for args, code, text in ((["--methods", "lpt,nope"], 1, "unknown methods ['nope']"),
                             (["--seeds", "0,x"], 2, "expected comma-separated integers"),
                             (["--seeds", "1,1"], 1, "seeds must be distinct"),
                             (["--readme", "README.md"], 2, "--readme needs --sources")):
        result = runner.invoke(app, ["compare", "--params", str(tmp_path / "p.yaml"), *args])
        assert result.exit_code == code, result.output
        assert result.output.startswith("error: ") and text in result.output and "Traceback" not in result.output


# ------------------------------------------------------------------------------------------ end to end
def test_compare_end_to_end_with_seeds_and_reuse(tiny_shards: Params, tmp_path: Path, capsys) -> None:
    """Two seeds of LIFT and a pixel baseline on the tiny config; a rerun reuses every cell."""
    from lpt.compare import run_compare

    torch.set_num_threads(1)
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir))
    out = run_compare(params, ["lift", "pixel_ncm"], tmp_path / "table.md", seeds=[0, 1])
    text = out.read_text()
    data = json.loads(out.with_suffix(".json").read_text())
    assert list(data["rows"]) == ["pixel_ncm", "lift"]  # table order, not argument order
    lift = data["rows"]["lift"]
    assert lift["n"] == 2 and [c["seed"] for c in lift["cells"]] == [0, 1]
    a, b = (c["metrics"]["overall"] for c in lift["cells"])
    assert lift["mean"]["overall"] == pytest.approx((a + b) / 2)
    assert lift["epochs"] == [2, 0] and lift["mean"]["train_seconds"] > 0 and lift["mean"]["infer_ms_per_image"] > 0
    for seed in (0, 1):  # each seed trained on its own: different heads
        assert (tmp_path / f"reports/compare/synthetic/lift/seed{seed}/models/phase2/model.safetensors").is_file()
    assert (tmp_path / "reports/compare/synthetic/pixel_ncm/cell.json").is_file()
    assert "| LIFT | 2 | " in text and "| pixel nearest class mean | – | " in text and "× plain forward" in text
    assert "no `lpt` row" in text
    capsys.readouterr()
    again = run_compare(params, ["lift", "pixel_ncm"], tmp_path / "table.md", seeds=[0, 1])
    assert capsys.readouterr().out.count("reused") == 3
    assert "3 of 3 cells were reused" in again.read_text()
    assert json.loads(again.with_suffix(".json").read_text())["rows"]["lift"]["mean"] == lift["mean"]


def test_gate_reads_the_compare_probe_of_the_same_seed(tmp_path: Path) -> None:
    from lpt.gate import probe_metrics_path

    params = make_tiny_params(tmp_path, seed=3)
    assert probe_metrics_path(params) == tmp_path / "reports/compare/synthetic/linear_probe/seed3/eval/metrics.json"


def test_a_cell_that_trains_again_drops_its_stale_record_before_training(
        tiny_shards: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed half-way must not leave an earlier run's cell.json beside its own partial models."""
    from lpt import compare

    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir))
    path = compare.compare_cell_dir(params, "lpt", 0) / compare.CELL_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": "another run's inputs", "metrics": {"overall": 0.5}}))

    def killed(*args, **kwargs):  # the process dies during training
        raise KeyboardInterrupt

    monkeypatch.setattr("lpt.train.run_phase", killed)
    with pytest.raises(KeyboardInterrupt):
        compare.run_cell(params, "lpt", 0)
    assert not path.exists()
