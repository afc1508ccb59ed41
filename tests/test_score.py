"""Scoring a batch with the gated export: lpt.score, `lpt score`, and the Prefect flow `score` (deployment score/batch)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpt.config import Params, write_params_atomic
from lpt.export import run_export
from lpt.score import ScoreError, ScoreRefused, histogram, score_images
from lpt.utils import write_json_atomic

from conftest import make_tiny_params
from test_hostile_images import _png_header
from test_pack import sample_images, stand_in_with_metrics
from test_pipelines import _artifacts, prefect_harness  # noqa: F401  (the session's Prefect API)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Params) -> Params:
    params = make_tiny_params(tmp_path_factory.mktemp("score"), data__out_dir=str(tiny_shards.data.out_dir))
    stand_in_with_metrics(params)
    run_export(params)
    return params


def _batch(params: Params, folder: Path, good: int = 12) -> tuple[list[Path], dict[str, Path]]:
    """``good`` test images as PNG plus one of each kind of bad input."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, img in enumerate(sample_images(params, good)):
        images.append(folder / f"ok{i:02d}.png")
        img.save(images[-1])
    bad = {"not an image": folder / "notes.png", "truncated PNG": folder / "cut.png",
           "huge image": folder / "huge.png"}
    bad["not an image"].write_text("this is text, not a picture")
    bad["truncated PNG"].write_bytes(images[0].read_bytes()[:60])
    bad["huge image"].write_bytes(_png_header(100_000, 100_000))  # 10^10 pixels, refused from the header
    deep = folder / "deep16.png"  # a 16-bit PNG is an image: it is scored (converted to 8-bit RGB)
    Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)).save(deep)
    images.append(deep)
    return images, bad


def test_a_batch_is_scored_and_each_bad_image_is_skipped_by_name(exported: Params, tmp_path: Path) -> None:
    good, bad = _batch(exported, tmp_path / "in")
    out = tmp_path / "out" / "pred.csv"
    progress: list[tuple[int, int]] = []
    result = score_images(exported, [tmp_path / "in"], out=out, top_k=2, batch_size=5,
                          on_progress=lambda d, n: progress.append((d, n)))
    assert result.scored == len(good) and sorted(p for p, _ in result.skipped) == sorted(map(str, bad.values()))
    assert progress[-1] == (len(good) + len(bad),) * 2 and len(progress) >= 3
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == sorted(map(str, good))
    assert set(rows[0]) == {"path", "class_1", "score_1", "class_2", "score_2"}
    assert all(float(r["score_1"]) >= float(r["score_2"]) for r in rows)
    summary = json.loads((out.parent / "pred.csv.summary.json").read_text())
    assert summary["scored"] == len(good) and len(summary["skipped"]) == 3
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert "too many pixels" in reasons["huge.png"] or "pixels" in reasons["huge.png"]
    assert all(str(tmp_path) not in r for r in reasons.values())  # the path is the key, not repeated
    assert sum(h["predicted"] for h in summary["histogram"]) == len(good)
    assert sum(h["train_share"] for h in summary["histogram"]) == pytest.approx(1.0)
    assert 0.0 <= summary["drift_total_variation"] <= 1.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.csv", "pred.csv.summary.json"]  # no temps


def test_a_split_of_the_shards_is_scored_with_its_indices(exported: Params, tmp_path: Path) -> None:
    result = score_images(exported, split="test", out=tmp_path / "test.csv", top_k=1)
    assert result.scored == len(sample_images(exported)) and not result.skipped
    assert (tmp_path / "test.csv").read_text().splitlines()[1].startswith("test/0,")


def test_the_histogram_and_its_distance_to_the_prior_by_hand() -> None:
    rows, tv = histogram(np.array([0, 0, 0, 2]), ["a", "b", "c"], [2, 1, 1])
    assert [r["predicted"] for r in rows] == [3, 0, 1] and [r["train_share"] for r in rows] == [0.5, 0.25, 0.25]
    assert tv == pytest.approx(0.5 * (0.25 + 0.25 + 0.0))
    assert histogram(np.array([1]), ["a", "b"], None)[1] is None


def test_scoring_refuses_an_export_whose_gate_did_not_pass(exported: Params, tmp_path: Path) -> None:
    good, _ = _batch(exported, tmp_path / "in", good=2)
    gate = Path(exported.evaluate.out_dir) / "gate.json"
    saved = gate.read_text()
    try:
        write_json_atomic(gate, {**json.loads(saved), "passed": False, "failures": ["few 0.1 < 0.3"]})
        with pytest.raises(ScoreRefused, match="quality gate failed"):
            score_images(exported, good, out=tmp_path / "x.csv")
        assert not (tmp_path / "x.csv").exists()
        from typer.testing import CliRunner

        from lpt.cli import app

        params_file = tmp_path / "params.yaml"
        write_params_atomic(params_file, exported.to_dict())
        res = CliRunner().invoke(app, ["score", str(good[0]), "-p", str(params_file), "--out", str(tmp_path / "y.csv")])
        assert res.exit_code == 6 and res.output.count("error: ") == 1 and "Traceback" not in res.output
    finally:
        gate.write_text(saved)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoreError, match="no images"):  # a folder without images: one line, nothing written
        score_images(exported, [tmp_path / "empty"], out=tmp_path / "z.csv")
    assert not (tmp_path / "z.csv").exists()


def test_the_score_flow_publishes_the_histogram_and_the_summary(prefect_harness, exported: Params,  # noqa: F811
                                                                tmp_path: Path) -> None:
    from pipelines.score_flow import score

    good, bad = _batch(exported, tmp_path / "in", good=6)
    project = tmp_path / "project"
    project.mkdir()
    write_params_atomic(project / "params.yaml", exported.to_dict())
    state = score(inputs=[str(tmp_path / "in")], out=str(tmp_path / "pred.csv"), top_k=1, repo_dir=str(project),
                  return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert (result["scored"], result["skipped"]) == (len(good), len(bad))
    arts = _artifacts(state.state_details.flow_run_id)
    assert {"predicted-classes", "score-summary"} <= set(arts)
    table = json.loads(arts["predicted-classes"].data)
    assert sum(row["predicted"] for row in table) == len(good) and "training share" in table[0]
    assert f"Scored {len(good)} images" in arts["score-summary"].data and "total-variation" in arts["score-summary"].data
