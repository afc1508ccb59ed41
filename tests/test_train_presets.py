"""Presets under configs/: every preset yields a valid params.yaml; merge semantics; embedded default in sync."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from lpt.config import ParamsError, load_params, read_raw
from lpt.methods import LPT_RECIPE
from lpt.presets import apply_preset, list_presets, main, preset_overrides

REPO = Path(__file__).resolve().parents[1]
VIT_B_PRESETS = ["cifar100_lt_vitb16", "places_lt_vitb16", "inat2018_vitb16"]


@pytest.fixture
def params_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", dst)
    return dst


def test_all_presets_listed() -> None:
    assert set(VIT_B_PRESETS + ["embedded_default"]) <= set(list_presets())


@pytest.mark.parametrize("name", VIT_B_PRESETS)
def test_vitb16_preset_gives_the_paper_recipe(params_copy: Path, name: str) -> None:
    changed = apply_preset(name, params_copy)
    params = load_params(params_copy)
    assert "backbone.name" in changed
    assert params.backbone.name == "vit_base_patch16_224.augreg_in21k"
    assert params.backbone.weights == "hub"
    assert params.backbone.timm_kwargs == {}  # replaced whole: no small-ViT kwargs leak in
    assert params.transforms.input_size == 224
    assert params.transforms.mean == params.transforms.std == (0.5, 0.5, 0.5)
    m = params.model
    assert (m.shared_blocks, m.prompt_length, m.pool_size, m.top_k) == (6, 10, 20, 2)
    for phase in (params.train.phase1, params.train.phase2):
        assert (phase.batch_size, phase.lr, phase.momentum) == (256, 0.02, 0.9)
        assert phase.weight_decay is None and phase.warmup_epochs is None  # the method's own: LPT's 0.01 and 1
        assert phase.epochs in (40, 80)
    assert LPT_RECIPE.weight_decay == 0.01 and LPT_RECIPE.warmup_epochs == 1.0 and LPT_RECIPE.scale == 20.0
    assert apply_preset(name, params_copy) == []  # idempotent


def test_embedded_default_matches_params_yaml(params_copy: Path) -> None:
    """configs/embedded_default.yaml restores exactly the shipped params.yaml values."""
    assert apply_preset("embedded_default", params_copy) == []


def test_embedded_default_undoes_a_vitb16_preset(params_copy: Path) -> None:
    original = load_params(params_copy).to_dict()
    apply_preset("places_lt_vitb16", params_copy)
    apply_preset("embedded_default", params_copy)
    restored = load_params(params_copy).to_dict()
    for section in ("transforms", "backbone", "model", "loss", "train"):
        assert restored[section] == original[section], section
    assert restored["data"]["source"] == "synthetic"


SOURCE_SECTIONS = ("cifar100", "list", "inat", "imagefolder", "fashion_mnist")


@pytest.mark.parametrize("name", [p for p in list_presets() if p != "embedded_default"])
def test_embedded_default_sets_every_key_another_preset_sets(name: str) -> None:
    """Else applying it after ``name`` would leave that key at ``name``'s value (a data.<source> section
    other than the default's stays, unused while data.source is synthetic)."""
    default = set(preset_overrides("embedded_default"))
    missing = [key for key in preset_overrides(name)
               if key not in default and key.split(".")[:2][-1] not in SOURCE_SECTIONS]
    assert missing == []


@pytest.mark.parametrize("name", [p for p in list_presets() if p != "embedded_default"])
def test_a_preset_round_trip_gives_back_the_shipped_bytes(params_copy: Path, name: str) -> None:
    """`lpt params preset NAME` then `lpt params preset embedded_default`: params.yaml is byte for byte the
    shipped file (comments, blank lines, `null`, flow lists, comment columns), but for the data.<source>
    section NAME added."""
    shipped = params_copy.read_text()
    apply_preset(name, params_copy)
    applied = params_copy.read_text()
    assert applied != shipped
    apply_preset("embedded_default", params_copy)
    restored = read_raw(params_copy)
    added = [s for s in SOURCE_SECTIONS if s in restored["data"] and s not in read_raw(REPO / "params.yaml")["data"]]
    text = params_copy.read_text()
    for section in added:  # what the preset added stays; everything else is the shipped text
        start = text.index(f"  {section}:\n")
        end = start + len(f"  {section}:\n")
        while text[end:].startswith("    "):
            end = text.index("\n", end) + 1
        text = text[:start] + text[end:]
    assert text == shipped


def test_applying_the_default_to_the_default_writes_nothing(params_copy: Path) -> None:
    before = params_copy.read_bytes()
    mtime = params_copy.stat().st_mtime_ns
    assert apply_preset("embedded_default", params_copy) == []
    assert params_copy.read_bytes() == before and params_copy.stat().st_mtime_ns == mtime


def test_unknown_preset_is_a_clear_error(params_copy: Path) -> None:
    with pytest.raises(FileNotFoundError, match="available"):
        apply_preset("no_such_preset", params_copy)


def test_invalid_preset_leaves_params_untouched(params_copy: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"phase1": {"epochs": 0}}, "model": {"prompt_lenght": 3}}))
    before = params_copy.read_text()
    with pytest.raises(ParamsError, match="prompt_lenght"):
        apply_preset(bad, params_copy)
    assert params_copy.read_text() == before


def test_preset_flags_work_in_dvc_exp_run_as_written(tmp_path: Path) -> None:
    """README: `dvc exp run $(python -m lpt.presets NAME)` in a real DVC repo gives the preset's params."""
    import os
    import subprocess
    import sys

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    shutil.copytree(REPO / "configs", repo / "configs")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"show": {
        "cmd": "python -c \"print(open('params.yaml').read())\" > seen.txt", "params": ["seed"], "outs": ["seen.txt"]}}}))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    run = subprocess.run(["bash", "-c", "dvc exp run $(python -m lpt.presets cifar100_lt_vitb16)"], cwd=repo,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    expected = tmp_path / "expected.yaml"
    shutil.copy(REPO / "params.yaml", expected)
    apply_preset("cifar100_lt_vitb16", expected, REPO / "configs")
    assert load_params(repo / "params.yaml").to_dict() == load_params(expected).to_dict()


def test_preset_flags_are_one_word_each(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    flat = preset_overrides("places_lt_vitb16")
    assert flat["train.phase1.epochs"] == 40 and flat["backbone.timm_kwargs"] == {}
    assert main(["places_lt_vitb16"]) == 0
    words = capsys.readouterr().out.split()
    assert "'" not in " ".join(words) and words[0] == "-S"
    assert "backbone.name=vit_base_patch16_224.augreg_in21k" in words
    assert words[words.index("~backbone.timm_kwargs") + 2] == "+backbone.timm_kwargs={}"  # replaced whole
    assert "+data.list.root=data/source/places365" in words or any(w.startswith("+data.list.") for w in words)


def test_presets_come_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text("train:\n  phase1:\n    epochs: 3\n")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert list_presets() == ["mine"]
    assert apply_preset("mine", "params.yaml") == ["train.phase1.epochs"]


def test_preset_values_round_trip_through_yaml(params_copy: Path) -> None:
    apply_preset("inat2018_vitb16", params_copy)
    raw = read_raw(params_copy)
    assert "&" not in params_copy.read_text()  # no YAML anchors leak into params.yaml
    assert raw["train"]["phase2"]["epochs"] == 80


def test_preset_keeps_comments_and_exponent_floats(params_copy: Path) -> None:
    before = [line for line in params_copy.read_text().splitlines() if line.lstrip().startswith("#")]
    apply_preset("cifar100_lt_vitb16", params_copy)
    text = params_copy.read_text()
    after = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert before and after == before
    raw = yaml.safe_load(text)  # PyYAML reads 1e-06 as a string: exponent floats must carry a dot
    assert isinstance(raw["backbone"]["ln_eps"], float)
    assert isinstance(raw["train"]["phase1"]["warmup_lr"], float)
    load_params(params_copy)
