"""Hostile params: alias bombs, absurd sizes, non-finite floats and bad seeds are refused before any compute,
with one `error:` line naming the key path and exit 2 (docs/security.md "Params")."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lpt.config import (MAX_YAML_NODES, ParamsError, load_params, load_yaml, param_ranges, parse_params, read_raw,
                        write_params_atomic)

from conftest import REPO_ROOT, make_tiny_params
from test_untrusted_input import _assert_one_error_line, _cli


def _bomb(levels: int, key: str = "seed") -> str:
    """A "billion laughs" document: ``levels`` anchors, each a list of ten aliases of the one before."""
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    lines.append(f"{key}: *l{levels - 1}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    write_params_atomic(path, make_tiny_params(tmp_path).to_dict())
    return path


# ------------------------------------------------------------------------------------------ YAML
def test_alias_bomb_in_params_yaml_is_refused_in_one_line(params_file: Path) -> None:
    # 10**6 values once expanded (a list of a million ints under `seed`): refused before pydantic walks it
    params_file.write_text(_bomb(6) + params_file.read_text().replace("seed: 0\n", ""))
    result = _cli("params", "check", str(params_file))
    _assert_one_error_line(result, 2, str(params_file), "anchors and aliases", f"more than the {MAX_YAML_NODES}")
    assert len(result.output) < 600  # the document is never echoed back


def test_billion_laughs_and_recursive_aliases_are_refused_by_the_loader() -> None:
    # level i is a list of 10 level-(i-1) lists: 11, 111, ..., 1111111111 values (l0..l8); the document is its
    # mapping (1) + 10 keys + every level once + l8 again under `data`: 1 + 10 + 1234567899 + 1111111111
    with pytest.raises(ParamsError, match="expands to 2345679021 values"):
        load_yaml(_bomb(9, key="data"), "bomb.yaml")
    with pytest.raises(ParamsError, match="recursive alias"):
        load_yaml("a: &a [1, *a]\n", "loop.yaml")
    with pytest.raises(ParamsError, match="nested too deeply"):
        load_yaml("[" * 50_000, "deep.yaml")
    with pytest.raises(ParamsError, match="more than the 1048576"):
        load_yaml("#" * (1 << 20) + "\nseed: 0\n", "huge.yaml")
    # anchors within the bound still work: the vitb16 presets share one recipe between both phases
    assert load_yaml("p1: &p {lr: 0.1}\np2: *p\n", "ok.yaml") == {"p1": {"lr": 0.1}, "p2": {"lr": 0.1}}


@pytest.mark.parametrize("value", ["[&a [1, *a]]", "*undefined"])
def test_alias_tricks_in_an_override_are_one_line(params_file: Path, value: str) -> None:
    _assert_one_error_line(_cli("params", "check", str(params_file), "-S", f"seed={value}"), 2, "seed=",
                           "not valid YAML")


def test_committed_params_and_presets_load_through_the_bounded_loader() -> None:
    from lpt.presets import list_presets, preset_overrides

    from lpt.config import apply_overrides

    base = read_raw(REPO_ROOT / "params.yaml")
    parse_params(base)
    names = list_presets(REPO_ROOT / "configs")
    assert "inat2018_vitb16" in names and "inat2018_synthetic" in names
    for name in names:  # every preset (anchors included) still validates within the new ranges
        parse_params(apply_overrides(base, preset_overrides(name, REPO_ROOT / "configs")), source=name)


# ------------------------------------------------------------------------------------------ ranges
@pytest.mark.parametrize("key, value, needle", [
    ("train.phase1.batch_size", "1.0e+22", "train.phase1.batch_size"),
    ("train.phase1.batch_size", "65537", "less than or equal to 65536"),
    ("evaluate.batch_size", "1000000", "less than or equal to 65536"),
    ("pretrain.batch_size", "0", "greater than or equal to 1"),
    ("transforms.resize", "60000", "less than or equal to 2048"),
    ("transforms.input_size", "100000", "less than or equal to 1024"),
    ("data.synthetic.image_size", "1000000", "less than or equal to 512"),
    ("data.workers", "100000", "less than or equal to 256"),
    ("train.num_workers", "4096", "less than or equal to 256"),
    ("train.phase2.epochs", "1000000000", "less than or equal to 10000"),
    ("data.max_per_class", "10000000000", "less than or equal to 1000000"),
    ("model.pool_size", "1000000", "less than or equal to 1024"),
    ("export.opset", "99", "less than or equal to 25"),
    ("loss.scale", "1e300", "loss.scale"),
])
def test_absurd_sizes_are_refused_by_key_path(params_file: Path, key: str, value: str, needle: str) -> None:
    _assert_one_error_line(_cli("params", "check", str(params_file), "-S", f"{key}={value}"), 2,
                           f"  {key}: got", needle)


@pytest.mark.parametrize("key, value", [
    ("loss.scale", ".nan"), ("loss.scale", '"nan"'), ("loss.margin", ".inf"), ("train.phase1.lr", "-.inf"),
    ("train.phase2.warmup_epochs", '"inf"'), ("data.imbalance_ratio", ".inf"), ("evaluate.gate.min_overall", ".nan"),
    ("evaluate.gate.max_drop_vs_probe", ".nan"),  # optional float
    ("transforms.mean", "[0.5, .nan, 0.5]"), ("transforms.std", "[.inf, 0.5, 0.5]"),  # floats in a tuple
    ("export.parity.max_abs_diff", ".inf"), ("data.synthetic.difficulty", ".nan"),  # nested sections
])
def test_non_finite_floats_are_refused_for_every_float_param(params_file: Path, key: str, value: str) -> None:
    result = _cli("params", "check", str(params_file), "-S", f"{key}={value}")
    _assert_one_error_line(result, 2, key, "finite number")


def test_non_finite_float_in_free_form_timm_kwargs_is_refused(params_file: Path) -> None:
    result = _cli("params", "check", str(params_file), "-S", "backbone.timm_kwargs={img_size: 32, drop_rate: .nan}")
    _assert_one_error_line(result, 2, "backbone.timm_kwargs", "non-finite number (nan/inf) at drop_rate")


@pytest.mark.parametrize("value, needle", [
    ("-1", "greater than or equal to 0"), ("4294967296", "less than 4294967296"), ("true", "valid integer"),
    ('"7"', "valid integer"), ("1.5", "valid integer"), (".nan", "valid integer"),
])
def test_seed_is_a_non_negative_integer_below_2_to_the_32(params_file: Path, value: str, needle: str) -> None:
    _assert_one_error_line(_cli("params", "check", str(params_file), "-S", f"seed={value}"), 2, "  seed: got", needle)


def test_seed_bounds_are_inclusive_below_exclusive_above(params_file: Path) -> None:
    assert load_params(params_file, {"seed": 2**32 - 1}).seed == 2**32 - 1
    assert load_params(params_file, {"seed": 0}).seed == 0


def test_refused_before_any_compute_through_a_stage_command(params_file: Path, tmp_path: Path) -> None:
    """A stage command (here `lpt train`) refuses the same way, before touching data or models."""
    _assert_one_error_line(_cli("train", "--phase", "1", "--params", str(params_file), "-S",
                                "train.phase1.batch_size=1.0e+22"), 2, "train.phase1.batch_size")
    assert not (tmp_path / "models").exists()


# ------------------------------------------------------------------------------------------ the docs
def test_every_numeric_param_has_a_two_sided_documented_range() -> None:
    rows = param_ranges()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys)) and len(rows) > 70
    for must in ("seed", "train.phase1.batch_size", "transforms.resize", "transforms.mean", "loss.scale",
                 "evaluate.gate.max_drop_vs_probe", "export.parity.max_images"):
        assert must in keys
    assert dict((k, r) for k, _, r in rows)["seed"] == "0 ≤ x < 4294967296"
    bounded = re.compile(r"^-?[\d.e+-]+ [≤<] x [≤<] [\d.e+-]+$")
    assert [row for row in rows if not bounded.match(row[2])] == []

    doc = (REPO_ROOT / "docs/security.md").read_text()
    missing = [f"| `{k}` | {t} | {r} |" for k, t, r in rows if f"| `{k}` | {t} | {r} |" not in doc]
    assert missing == [], "docs/security.md lacks (regenerate the table from lpt.config.param_ranges()):\n" + \
        "\n".join(missing)
