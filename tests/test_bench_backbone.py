"""The backbone-candidate benches: the proxy's scores against hand-computed values, and the candidate's params."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from bench.backbone_candidate import candidate_params
from bench.backbone_proxy import mean_pairwise_cosine, nearest_class_mean
from lpt.config import ParamsError, load_params
from tests.conftest import REPO_ROOT


def test_mean_pairwise_cosine_is_one_for_parallel_and_zero_for_orthogonal_features() -> None:
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)
    # pairs (a, b), (a, c), (b, c) of a = (1, 0), b = (0, 1), c = (1, 1)/√2: (0 + 0.7071 + 0.7071) / 3
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])) == pytest.approx(0.4714, abs=1e-4)


def test_nearest_class_mean_assigns_by_cosine_to_the_class_means() -> None:
    ftr = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]])
    ytr = torch.tensor([0, 0, 1, 1])
    fva = torch.tensor([[5.0, 1.0], [1.0, 5.0], [1.0, 0.9]])  # nearest in angle: 0, 1, 0
    assert nearest_class_mean(ftr, ytr, fva, torch.tensor([0, 1, 0])) == pytest.approx(1.0)
    assert nearest_class_mean(ftr, ytr, fva, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_a_candidate_pretrains_into_its_own_folder_and_a_bad_override_is_refused(tmp_path: Path) -> None:
    path = candidate_params(REPO_ROOT / "params.yaml", ["pretrain.epochs=3", "pretrain.kd_bias=false"],
                            tmp_path / "c1", tmp_path / "cache")
    params = load_params(path)
    assert params.pretrain.epochs == 3 and params.pretrain.kd_bias is False
    assert params.pretrain.out_dir == tmp_path / "c1" / "pretrain" and params.pretrain.cache_dir == tmp_path / "cache"
    assert yaml.safe_load(path.read_text())["backbone"]["name"] == load_params(REPO_ROOT / "params.yaml").backbone.name
    with pytest.raises(ParamsError, match="pretrain.kd_bais"):
        candidate_params(REPO_ROOT / "params.yaml", ["pretrain.kd_bais=false"], tmp_path / "c2", tmp_path / "cache")
    assert not (tmp_path / "c2").exists()  # refused before anything was written


def test_bench_figures_are_written_as_json_into_a_new_folder_and_none_writes_nothing(tmp_path: Path) -> None:
    import json

    from bench.timing import write_figures

    write_figures(None, {"a": 1})
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "new" / "figures.json"
    write_figures(out, {"ms": 1.5, "path": Path("models/x")})
    assert json.loads(out.read_text()) == {"ms": 1.5, "path": "models/x"} and out.read_text().endswith("}\n")


def test_bad_bench_input_is_one_error_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import argparse

    from bench.backbone_candidate import main as candidate
    from bench.backbone_proxy import lite_spec

    assert lite_spec("2:4@64") == (2, 4, 64)
    for bad in ("2:4", "5:4@64", "0:8@64", "0:4@8", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected N:STAGES@SIZE"):
            lite_spec(bad)
    out = tmp_path / "out"
    assert candidate(["--name", "c", "--shards", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "shards manifest not found" in capsys.readouterr().err and not out.exists()
