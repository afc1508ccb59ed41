"""The strict params schema: unknown keys, wrong types, ranges, source sections, overrides, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT

from lpt.config import (ParamsError, apply_overrides, load_params, parse_override, parse_params, read_raw,
                        write_params_atomic)


@pytest.fixture
def raw() -> dict:
    return read_raw(REPO_ROOT / "params.yaml")


def test_repo_params_are_valid(raw: dict) -> None:
    params = parse_params(raw)
    assert params.data.source == "synthetic" and params.validate_.report_dir == Path("data/validation")
    assert params.to_dict()["validate"]["imbalance_tolerance"] == params.validate_.imbalance_tolerance


def test_unknown_key_is_refused_with_its_path(raw: dict) -> None:
    with pytest.raises(ParamsError, match=r"data\.imbalance_ration: unknown key"):
        parse_params(apply_overrides(raw, {"data.imbalance_ration": 10}))
    with pytest.raises(ParamsError, match=r"validate\.typo: unknown key"):
        parse_params(apply_overrides(raw, {"validate.typo": 1}))


def test_wrong_type_is_refused(raw: dict) -> None:
    with pytest.raises(ParamsError, match=r"data\.max_per_class: got 'lots'"):
        parse_params(apply_overrides(raw, {"data.max_per_class": "lots"}))
    with pytest.raises(ParamsError, match=r"data\.source: got 'imagenet'"):
        parse_params(apply_overrides(raw, {"data.source": "imagenet"}))


def test_out_of_range_is_refused(raw: dict) -> None:
    with pytest.raises(ParamsError, match=r"data\.imbalance_ratio: got 0.5.*greater than or equal to 1"):
        parse_params(apply_overrides(raw, {"data.imbalance_ratio": 0.5}))
    with pytest.raises(ParamsError, match=r"validate\.imbalance_tolerance"):
        parse_params(apply_overrides(raw, {"validate.imbalance_tolerance": 2}))


def test_every_problem_is_listed_at_once(raw: dict) -> None:
    with pytest.raises(ParamsError, match=r"\(2 problems\)") as err:
        parse_params(apply_overrides(raw, {"data.workers": 0, "data.shard_maxcount": -1}))
    assert "data.workers" in str(err.value) and "data.shard_maxcount" in str(err.value)


@pytest.mark.parametrize("source", ["cifar100", "list", "imagefolder", "inat"])
def test_selected_source_needs_its_section(raw: dict, source: str) -> None:
    with pytest.raises(ParamsError, match=rf"data\.source is '{source}' but the section data\.{source} is missing"):
        parse_params(apply_overrides(raw, {"data.source": source}))


def test_source_section_fields_are_checked(raw: dict) -> None:
    ok = parse_params(apply_overrides(raw, {"data.source": "cifar100", "data.cifar100": {"path": "x.tar.gz"}}))
    assert ok.data.cifar100.path == Path("x.tar.gz")
    with pytest.raises(ParamsError, match=r"data\.list\.train_list"):
        parse_params(apply_overrides(raw, {"data.source": "list", "data.list": {"root": "r", "test_list": "t"}}))


def test_override_parsing() -> None:
    assert parse_override("data.max_per_class=50") == ("data.max_per_class", 50)
    assert parse_override("transforms.mean=[0.1, 0.2, 0.3]") == ("transforms.mean", [0.1, 0.2, 0.3])
    assert parse_override("data.skip_bad=true") == ("data.skip_bad", True)
    assert parse_override("backbone.weights=a=b.pth") == ("backbone.weights", "a=b.pth")
    assert parse_override("evaluate.gate.max_drop_vs_probe=") == ("evaluate.gate.max_drop_vs_probe", None)
    with pytest.raises(ParamsError, match="KEY.PATH=VALUE"):
        parse_override("data.max_per_class")


def test_apply_overrides_creates_sections_and_leaves_input_alone(raw: dict) -> None:
    out = apply_overrides(raw, {"data.list.root": "r", "seed": 3})
    assert out["data"]["list"] == {"root": "r"} and out["seed"] == 3
    assert "list" not in raw["data"] and raw["seed"] == 0
    with pytest.raises(ParamsError, match=r"seed is a value, not a section"):
        apply_overrides(raw, {"seed.x": 1})


def test_load_params_with_overrides_and_errors(tmp_path: Path) -> None:
    params = load_params(REPO_ROOT / "params.yaml", {"data.max_per_class": 50})
    assert params.data.max_per_class == 50
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_write_params_atomic_validates_and_never_half_writes(tmp_path: Path, raw: dict, monkeypatch) -> None:
    path = tmp_path / "params.yaml"
    write_params_atomic(path, apply_overrides(raw, {"seed": 5}))
    assert load_params(path).seed == 5
    before = path.read_bytes()
    with pytest.raises(ParamsError):
        write_params_atomic(path, apply_overrides(raw, {"data.bogus": 1}))
    assert path.read_bytes() == before

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(yaml, "safe_dump", crash)
    with pytest.raises(OSError, match="disk full"):
        write_params_atomic(path, apply_overrides(raw, {"seed": 6}))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"], "no temp file left behind"


def test_cli_params_check_exits_2_on_bad_params(tmp_path: Path, raw: dict) -> None:
    from typer.testing import CliRunner

    from lpt.cli import app

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(apply_overrides(raw, {"data.max_per_class": 0})))
    result = CliRunner().invoke(app, ["params", "check", str(path)])
    assert result.exit_code == 2 and "data.max_per_class" in result.output
    ok = CliRunner().invoke(app, ["params", "check", str(REPO_ROOT / "params.yaml"), "-S", "data.max_per_class=9"])
    assert ok.exit_code == 0, ok.output
