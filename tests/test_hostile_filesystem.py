"""Hostile paths and filesystem faults (issue 25, part B): output folders the project did not write are never
replaced, filesystem faults are one `error:` line naming the path with the previous outputs intact, outputs
honour the umask, and a pack or preset never points outside its own folder.

Real faults only: a file size limit (RLIMIT_FSIZE) on a real subprocess, a path through a regular file
(ENOTDIR), a name over NAME_MAX (ENAMETOOLONG), writes to /dev/full (ENOSPC). The tests run as root here, where
a read-only folder does not stop a write: the permission test is skipped then.
"""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO_ROOT, make_tiny_params
from PIL import Image

from lpt.config import write_params_atomic
from lpt.data.ingest import run_ingest
from lpt.utils import (OutputDirError, OutputWriteError, atomic_dir, atomic_path, check_output_dir,
                       refuse_protected, save_safetensors, write_json_atomic)


# ------------------------------------------------------------------------------------------ helpers
def _tiny(root: Path, **kw):
    base = dict(data__imbalance_ratio=4, data__max_per_class=8, data__val_per_class=2, data__test_per_class=2)
    base.update(kw)
    return make_tiny_params(root, **base)


def _params_file(tmp_path: Path, params) -> Path:
    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())
    return path


def _cli(*args: str):
    from typer.testing import CliRunner

    from lpt.cli import app

    return CliRunner().invoke(app, list(args))


def _one_error_line(output: str, *needles: str) -> str:
    """Exactly one `error:` line, the last thing printed, naming every needle; no traceback."""
    assert "Traceback" not in output, output
    lines = output.rstrip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    for needle in needles:
        assert needle in errors[0], (needle, output)
    return errors[0]


def _run_cli(*args: str, cwd: Path, preexec=None) -> subprocess.CompletedProcess[str]:
    """``python -m lpt ARGS`` in a fresh interpreter (this checkout's code), optionally with a setup hook."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lpt", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          preexec_fn=preexec, timeout=300)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.md").write_text("the user's own file\n")
    return path


# ------------------------------------------------------------------------------------------ 1. output folders
def test_ingest_into_a_user_folder_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    params = _tiny(tmp_path / "out")
    docs = _user_folder(tmp_path / "docs")
    result = _cli("ingest", "--params", str(_params_file(tmp_path, params)), "-S", f"data.out_dir={docs}")
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, "data.out_dir", str(docs), "notes.md", "did not write")
    assert (docs / "notes.md").read_text() == "the user's own file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "params.yaml"], "nothing written anywhere"


def test_ingest_into_a_raw_dataset_folder_is_refused(tmp_path: Path) -> None:
    """A folder of the stage's own entry names (train/ val/ test/) but no manifest: the user's images, not shards."""
    raw = tmp_path / "mydata"
    for split in ("train", "val", "test"):
        (raw / split / "cat").mkdir(parents=True)
        (raw / split / "cat" / "1.png").write_bytes(b"png")
    with pytest.raises(OutputDirError, match=r"has no manifest\.json"):
        run_ingest(_tiny(tmp_path / "out", data__out_dir=str(raw)))
    assert len(list(raw.rglob("*.png"))) == 3


@pytest.mark.parametrize("target", [".", ".git", ".git/objects", ".dvc", "..", "ancestor", "home", "repo", "file"])
def test_protected_out_dirs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    project = tmp_path / "work" / "project"
    (project / ".git" / "objects").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / ".dvc").mkdir()
    (project / "README.md").write_text("readme\n")
    other_repo = tmp_path / "other"
    (other_repo / ".git").mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "work" / "a-file").write_text("mine\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    out = {"ancestor": str(tmp_path / "work"), "home": str(home), "repo": str(other_repo),
           "file": str(tmp_path / "work" / "a-file")}.get(target, target)
    before = _tree(tmp_path)
    params = _tiny(tmp_path / "out", data__out_dir=out)
    result = _cli("ingest", "--params", str(_params_file(tmp_path / "work", params)))
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, "data.out_dir", repr(out))
    after = _tree(tmp_path)
    after.pop("work/params.yaml")
    assert after == before, "nothing touched"


def test_evaluate_export_pack_train_refuse_user_folders_before_any_work(tmp_path: Path) -> None:
    """No model exists here: the refusal comes first, exit 2, naming the key and the folder."""
    params = _tiny(tmp_path / "out")
    path = _params_file(tmp_path, params)
    reports = tmp_path / "reports"
    _user_folder(reports / "plots")
    user = _user_folder(tmp_path / "mine")
    for args, needles in [
        (["evaluate", "-S", f"evaluate.out_dir={reports}"], ["evaluate.out_dir plots", str(reports / "plots")]),
        (["evaluate", "-S", "evaluate.out_dir=."], ["evaluate.out_dir", "working directory"]),
        (["export", "-S", f"export.out_dir={user}"], ["export.out_dir", str(user), "notes.md"]),
        (["pack", "-S", f"pack.out_dir={user}"], ["pack.out_dir", str(user), "notes.md"]),
        (["train", "--phase", "1", "-S", "train.out_dir=."], ["train.out_dir", "working directory"]),
        (["train", "--phase", "1", "-S", f"train.out_dir={tmp_path}", "-S", f"data.out_dir={tmp_path}/x"], []),
    ]:
        if args[0] == "train" and not needles:  # train.out_dir/phase1 as a user folder
            _user_folder(tmp_path / "phase1")
            needles = ["train.out_dir phase1", str(tmp_path / "phase1")]
        result = _cli(*args, "--params", str(path))
        assert result.exit_code == 2, (args, result.output)
        _one_error_line(result.output, *needles)
    assert (reports / "plots" / "notes.md").is_file() and (user / "notes.md").is_file()
    assert (tmp_path / "phase1" / "notes.md").is_file()


def test_previous_outputs_and_empty_folders_are_replaced_as_before(tmp_path: Path) -> None:
    params = _tiny(tmp_path / "out")
    out = Path(params.data.out_dir)
    out.mkdir(parents=True)  # an empty folder is accepted
    run_ingest(params)
    first = _tree(out)
    (out / "train" / "stale.tar").write_bytes(b"x")  # inside an own entry: replaced with the folder
    run_ingest(params)  # an earlier output (manifest + splits, no marker) is replaced
    assert _tree(out) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["shards"], "no temp or .old left"


def test_linked_output_folder_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "big-disk" / "export"
    target.mkdir(parents=True)
    (target / "model.onnx").write_bytes(b"old")
    link = tmp_path / "models" / "export"
    link.parent.mkdir()
    link.symlink_to(target)
    with atomic_dir(link, "export.out_dir", own=("model.onnx",)) as tmp:
        (tmp / "model.onnx").write_bytes(b"new")
    assert not link.is_symlink() and (link / "model.onnx").read_bytes() == b"new"
    assert (target / "model.onnx").read_bytes() == b"old", "the folder the link pointed to is left alone"
    assert sorted(p.name for p in link.parent.iterdir()) == ["export"]


def test_check_output_dir_rules(tmp_path: Path) -> None:
    own = {"what": "x.out_dir", "own": ("model.onnx", "*.pack"), "key": None}
    folder = tmp_path / "o"
    check_output_dir(folder, **own)  # absent
    folder.mkdir()
    check_output_dir(folder, **own)  # empty
    (folder / "a.pack").write_bytes(b"")
    (folder / "model.onnx").write_bytes(b"")
    check_output_dir(folder, **own)  # only its own entries
    (folder / ".DS_Store").write_bytes(b"")
    with pytest.raises(OutputDirError, match=r"x.out_dir .* \(\.DS_Store\)"):
        check_output_dir(folder, **own)
    with pytest.raises(OutputDirError, match="has no model.json"):
        check_output_dir(folder, "x", own=("*",), key="model.json")
    with pytest.raises(OutputDirError, match="is a file, not a folder"):
        check_output_dir(folder / "a.pack", "x")
    refuse_protected(tmp_path / "new", "x")  # an ordinary new folder


# ------------------------------------------------------------------------------------------ 2. filesystem faults
def test_file_size_limit_is_one_line_and_keeps_the_previous_shards(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (``ulimit -f``): the shard write fails with EFBIG, the process is not killed by SIGXFSZ."""
    params = _tiny(tmp_path / "out")
    run_ingest(params)
    out = Path(params.data.out_dir)
    before = _tree(out)
    assert max(len(b) for b in before.values()) > 16384, "the limit must be below the shard size"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    proc = _run_cli("ingest", "--params", str(_params_file(tmp_path, params)), cwd=tmp_path, preexec=limit)
    assert proc.returncode == 1, proc.stderr
    _one_error_line(proc.stderr, f"cannot write {out}", "File too large [EFBIG]", "previous one is unchanged")
    assert _tree(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["shards"], "the temp folder is removed"


def test_no_space_is_one_line_and_keeps_the_previous_output(tmp_path: Path) -> None:
    """ENOSPC from a real device (/dev/full) while an output folder is written."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    out = tmp_path / "models" / "export"
    with atomic_dir(out, "export.out_dir", own=("model.onnx",)) as tmp:
        (tmp / "model.onnx").write_bytes(b"previous")
    with pytest.raises(OutputWriteError) as info:
        with atomic_dir(out, "export.out_dir", own=("model.onnx",)) as tmp:
            (tmp / "model.onnx").write_bytes(b"half")
            with open("/dev/full", "wb") as full:
                full.write(b"\0" * 65536)
    text = str(info.value)
    assert "\n" not in text and info.value.__cause__ is None and info.value.__suppress_context__
    assert text == f"cannot write {out}: No space left on device [ENOSPC]; the previous one is unchanged"
    assert (out / "model.onnx").read_bytes() == b"previous"
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"]


_SAVE_UNDER_LIMIT = """
import resource, sys, torch
from lpt.utils import OutputWriteError, atomic_dir, save_safetensors
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    with atomic_dir(sys.argv[1], "resume state", own=("state.safetensors",)) as tmp:
        save_safetensors({"w": torch.zeros(4096)}, tmp / "state.safetensors")
except OutputWriteError as err:
    print(f"error: {err}")
"""


def test_safetensors_over_the_file_size_limit_is_one_line(tmp_path: Path) -> None:
    """safetensors' own writer raises ``SafetensorError`` ("I/O error ... (os error 27)"), no OSError: a training
    checkpoint over ``ulimit -f`` ended in a traceback (bench.faults). ``save_safetensors`` writes the same bytes
    with Python's file I/O, so the fault is one line naming the output and the previous one is kept."""
    import torch
    from safetensors.torch import save_file

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "1"})
    ours = tmp_path / "ours.safetensors"
    assert save_safetensors(tensors, ours, metadata={"format": "1"}) == ours
    assert ours.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()

    out = tmp_path / "last"
    out.mkdir()
    (out / "state.safetensors").write_bytes(b"previous")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", _SAVE_UNDER_LIMIT, str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _one_error_line(proc.stdout, f"cannot write {out}", "File too large [EFBIG]", "previous one is unchanged")
    assert _tree(out) == {"state.safetensors": b"previous"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "ours.safetensors", "reference.safetensors"]


def test_nested_atomic_write_fault_names_the_outer_output(tmp_path: Path) -> None:
    """A fault inside a file written atomically into the temp folder names the folder, not a temp path."""
    out = tmp_path / "shards"
    with pytest.raises(OutputWriteError) as info:
        with atomic_dir(out, "data.out_dir", own=("manifest.json",)) as tmp:
            with atomic_path(tmp / "manifest.json") as inner:
                inner.write_text("{}")
                with open("/dev/full", "wb") as full:
                    full.write(b"\0" * 65536)
    assert str(info.value) == f"cannot write {out}: No space left on device [ENOSPC]; nothing was written"
    assert not out.exists() and not list(tmp_path.iterdir())


def test_input_read_errors_inside_an_atomic_write_are_not_renamed(tmp_path: Path) -> None:
    """An error about an input (read while the output is written) keeps its own message and type."""
    with pytest.raises(FileNotFoundError, match="missing-input"):
        with atomic_dir(tmp_path / "o", "x") as tmp:
            (tmp / "a").write_text((tmp_path / "missing-input").read_text())
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["through-a-file", "name-too-long"])
def test_unwritable_out_dir_is_one_line(tmp_path: Path, case: str) -> None:
    """ENOTDIR (a path component is a regular file) and ENAMETOOLONG: exit 1 naming the path, nothing written."""
    (tmp_path / "a-file").write_text("mine\n")
    out = tmp_path / "a-file" / "sub" / "shards" if case == "through-a-file" else tmp_path / ("x" * 300) / "shards"
    params = _tiny(tmp_path / "out", data__out_dir=str(out))
    result = _cli("ingest", "--params", str(_params_file(tmp_path, params)))
    assert result.exit_code == 1, result.output
    fault = "Not a directory [ENOTDIR]" if case == "through-a-file" else "File name too long [ENAMETOOLONG]"
    _one_error_line(result.output, f"cannot write {out}", fault, "nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "params.yaml"]
    assert (tmp_path / "a-file").read_text() == "mine\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: chmod is no fault for root")
def test_read_only_parent_is_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        params = _tiny(tmp_path / "out", data__out_dir=str(locked / "shards"))
        result = _cli("ingest", "--params", str(_params_file(tmp_path, params)))
        assert result.exit_code == 1, result.output
        _one_error_line(result.output, f"cannot write {locked / 'shards'}", "Permission denied [EACCES]")
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------------------ 3. umask
def _modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                             (0o002, 0o664, 0o775)])
def test_atomic_outputs_honour_the_umask(tmp_path: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"a": 1})
        with atomic_dir(tmp_path / "d", "x", own=("f",)) as tmp:
            write_json_atomic(tmp / "f", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == file_mode
    assert _modes(tmp_path / "d") == {("dir", dir_mode), ("file", file_mode)}


def test_ingest_outputs_honour_the_umask(tmp_path: Path) -> None:
    params = _tiny(tmp_path / "out")
    proc = _run_cli("ingest", "--params", str(_params_file(tmp_path, params)), cwd=tmp_path,
                    preexec=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    assert _modes(Path(params.data.out_dir)) == {("dir", 0o755), ("file", 0o644)}


# ------------------------------------------------------------------------------------------ 4. packs and presets
def _crafted_pack(path: Path, **meta_changes) -> Path:
    """A minimal valid task pack written by hand (one head tensor), with ``meta_changes`` applied."""
    from safetensors.numpy import save_file

    from lpt.runtime import PACK_FORMAT, PACK_METADATA_KEY

    meta = {"pack_format": PACK_FORMAT, "name": "crafted", "class_names": ["a", "b"], "logit_scale": 16.0,
            "preprocessing": {"input_size": "8", "resize": "8", "mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]"},
            "backbone": {"fingerprint": "0" * 16}, "geometry": {"task_inputs": ["head"], "depth": 2, "embed_dim": 4,
                                                               "shared_blocks": 1},
            "backbone_graph": "backbone.onnx", **meta_changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"head": np.ones((2, 4), dtype=np.float32)}, str(path), metadata={PACK_METADATA_KEY: json.dumps(meta)})
    return path


@pytest.mark.parametrize("graph", ["../x.onnx", "/etc/passwd", "sub/backbone.onnx", "..", "a\\..\\b.onnx", 7])
def test_pack_backbone_graph_outside_the_pack_folder_is_refused(tmp_path: Path, graph) -> None:
    from lpt.runtime import PredictError, read_pack

    assert read_pack(_crafted_pack(tmp_path / "ok" / "t.pack")).backbone_graph_path() == tmp_path / "ok" / "backbone.onnx"
    pack = _crafted_pack(tmp_path / "packs" / "t.pack", backbone_graph=graph)
    with pytest.raises(PredictError) as info:
        read_pack(pack)
    text = str(info.value)
    assert "\n" not in text and str(pack) in text and f"backbone_graph {graph!r}" in text
    image = tmp_path / "i.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    result = _cli("predict", "--pack", str(pack), str(image))
    assert result.exit_code == 1, result.output
    _one_error_line(result.output, str(pack), "backbone_graph")


def test_pack_backbone_graph_link_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    from lpt.runtime import PredictError, read_pack

    outside = tmp_path / "elsewhere" / "backbone.onnx"
    outside.parent.mkdir()
    outside.write_bytes(b"not yours")
    pack = _crafted_pack(tmp_path / "packs" / "t.pack")
    (pack.parent / "backbone.onnx").symlink_to(outside)
    with pytest.raises(PredictError, match="outside the pack's folder") as info:
        read_pack(pack).backbone_graph_path()
    assert str(pack) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["../../etc/x", "/etc/passwd", "configs/embedded_default", "..", ".hidden",
                                  "a b", "embedded_default.yaml", ""])
def test_preset_names_are_plain_identifiers(tmp_path: Path, name: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text())
    result = _cli("params", "preset", name, "--params", str(params))
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, f"preset name {name!r}", "plain name")
    assert params.read_text() == (REPO_ROOT / "params.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "lpt.presets", name], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: preset name") and proc.stdout == "", proc.stderr


def test_preset_link_out_of_the_presets_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lpt.config import ParamsError
    from lpt.presets import apply_preset

    secret = tmp_path / "secret.yaml"
    secret.write_text(yaml.safe_dump({"train": {"phase1": {"epochs": 3}}}))
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").symlink_to(secret)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="outside configs/"):
        apply_preset("mine", "params.yaml")
    assert (tmp_path / "params.yaml").read_text() == (REPO_ROOT / "params.yaml").read_text()


def test_ingest_into_its_tracked_input_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(A data.out_dir that holds data.source_dir holds something that is not ingest's: refused before this.)"""
    out = "data/source/shards"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/source").mkdir(parents=True)
    params = _tiny(tmp_path / "out", data__out_dir=out, data__source_dir="data/source")
    result = _cli("ingest", "--params", str(_params_file(tmp_path, params)))
    assert result.exit_code == 2, result.output
    _one_error_line(result.output, "data.out_dir", repr(out), "data.source_dir", "overlap")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "data" in p.parts) == \
        ["data", "data/source"]
