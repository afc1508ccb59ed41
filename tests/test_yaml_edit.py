"""lpt.yaml_edit: a params edit changes the values it sets and no other byte of the file."""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest
import yaml

import lpt.yaml_edit
from lpt.config import ParamsError, update_params_file
from lpt.yaml_edit import edit_yaml_text, flow_text

TEXT = """\
# a header comment
data:                         # stages: ingest
  source: synthetic           # which source
  mean: [0.5, 0.5, 0.5]
  eps: 1.0e-6
  cap: null                   # null = all
  name: 'it''s'               # a quoted string

train:
  phase1:
    epochs: 2                 # epochs
    steps: null # a long key with one space
  list:
  - 1
  - 2
"""


def test_the_module_examples_hold() -> None:
    assert doctest.testmod(lpt.yaml_edit).failed == 0


def test_an_edit_changes_only_the_values_it_sets() -> None:
    out = edit_yaml_text(TEXT, {"data.source": "imagefolder", "data.mean": [0.485, 0.456, 0.406],
                                "train.phase1.epochs": 40})
    changed = [(a, b) for a, b in zip(TEXT.splitlines(), out.splitlines()) if a != b]
    assert changed == [
        ("  source: synthetic           # which source", "  source: imagefolder         # which source"),
        ("  mean: [0.5, 0.5, 0.5]", "  mean: [0.485, 0.456, 0.406]"),
        ("    epochs: 2                 # epochs", "    epochs: 40                # epochs"),
    ]
    assert len(out.splitlines()) == len(TEXT.splitlines()) and out.endswith("\n")


def test_equal_values_leave_the_text_as_it_is() -> None:
    same = {"data.eps": 1e-6, "data.cap": None, "data.mean": [0.5, 0.5, 0.5], "data.name": "it's",
            "train.list": [1, 2]}
    assert edit_yaml_text(TEXT, same) == TEXT


def test_a_round_trip_through_longer_values_gives_back_the_bytes() -> None:
    there = edit_yaml_text(TEXT, {"data.source": "a_source_name_longer_than_the_comment_gap",
                                  "train.phase1.steps": 1234, "data.cap": 7})
    assert "a_source_name_longer_than_the_comment_gap  # which source" in there
    assert "    steps: 1234 # a long key" in there and "  cap: 7                      # null = all" in there
    back = edit_yaml_text(there, {"data.source": "synthetic", "train.phase1.steps": None, "data.cap": None})
    assert back == TEXT


def test_a_quoted_value_is_replaced_whole() -> None:
    out = edit_yaml_text(TEXT, {"data.name": "a # b"})
    assert "  name: 'a # b'               # a quoted string" in out and yaml.safe_load(out)["data"]["name"] == "a # b"


def test_new_keys_and_block_values_go_through_the_round_trip_with_null_kept() -> None:
    out = edit_yaml_text(TEXT, {"data.imagefolder.root": "data/source/images", "train.list": [3]})
    loaded = yaml.safe_load(out)
    assert loaded["data"]["imagefolder"] == {"root": "data/source/images"} and loaded["train"]["list"] == [3]
    assert "cap: null                   # null = all" in out  # ruamel would write `cap:` without the fix
    assert "eps: 1.0e-6" in out and "# a header comment" in out
    from ruamel.yaml.representer import RoundTripRepresenter  # our representers are our own class's

    assert RoundTripRepresenter.yaml_representers[type(None)] is RoundTripRepresenter.represent_none


@pytest.mark.parametrize("value, text", [(None, "null"), (True, "true"), (1e-06, "1.0e-06"), (3, "3"),
                                         ("a: b", "'a: b'"), ("null", "'null'"), ([1, "x"], "[1, x]")])
def test_flow_text_reads_back_equal(value: object, text: str) -> None:
    assert flow_text(value) == text and yaml.safe_load(f"k: {text}")["k"] == value


def test_update_params_file_does_not_touch_an_unchanged_file(tmp_path: Path) -> None:
    from conftest import REPO_ROOT

    path = tmp_path / "params.yaml"
    path.write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    mtime = path.stat().st_mtime_ns
    update_params_file(path, {"seed": 0, "model.head_dropout": None})
    assert path.stat().st_mtime_ns == mtime
    update_params_file(path, {"seed": 3})
    assert path.read_text() == (REPO_ROOT / "params.yaml").read_text().replace("seed: 0\n", "seed: 3\n", 1)
    with pytest.raises(ParamsError, match="seed"):
        update_params_file(path, {"seed": -1})
    assert "seed: 3\n" in path.read_text()


def test_dvc_exp_run_set_rewrites_only_the_line_it_changes() -> None:
    """`dvc exp run -S` writes params.yaml through DVC's own YAML writer: params.yaml is kept in the form
    that writer gives (a null is an empty value), so DVC's round trip leaves every other byte as it is."""
    import shutil
    import tempfile

    from dvc.utils.serialize import modify_yaml

    from conftest import REPO_ROOT

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        shutil.copy(REPO_ROOT / "params.yaml", path)
        with modify_yaml(str(path)):
            pass
        assert path.read_text() == (REPO_ROOT / "params.yaml").read_text()
        with modify_yaml(str(path)) as data:
            data["train"]["phase2"]["epochs"] = 8
        changed = [(a, b) for a, b in zip((REPO_ROOT / "params.yaml").read_text().splitlines(),
                                          path.read_text().splitlines()) if a != b]
        assert [b for _, b in changed] == ["    epochs: 8                 # ~60 s/epoch on 2 cores"]
