"""Hostile image files (issue 25): no code execution through a decoder, no decompression bomb, no
train/serve skew, no hang on a FIFO.

Real files throughout: a real EPS payload with a mock ``gs`` first on PATH that records whether it ran, PNG
headers claiming absurd sizes, 16-bit and float TIFF/PNG files, real FIFOs made with ``os.mkfifo``. Every
command that could hang runs in a subprocess with a timeout, so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image, UnidentifiedImageError
from test_runtime import INPUT, MEAN, RESIZE, STD, make_toy_onnx, toy_metadata
from test_untrusted_input import _gradient_file, _list_source, _one_clean_line, _png, _tiny

from lpt.data.imageio import ALLOWED_FORMATS, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, ImageRefused, open_image
from lpt.data.ingest import IngestError, run_ingest
from lpt.runtime import Predictor, PredictRefused, load_image

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
%%EndComments
newpath 0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""
"""A minimal valid EPS file: Pillow's EPS plugin renders it by running Ghostscript (``gs``)."""

CLI_TIMEOUT = 120
"""Seconds a CLI subprocess may take: far above what these tiny inputs need; a hang (FIFO) fails the test."""


# ------------------------------------------------------------------------------------------ helpers
def _run(*args: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m lpt ARGS`` from the worktree, in a subprocess that is killed after CLI_TIMEOUT."""
    env = dict(os.environ)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "lpt", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=CLI_TIMEOUT)


def _one_error_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _mock_gs(tmp_path: Path) -> tuple[Path, Path]:
    """A ``gs`` script (in its own folder, to put first on PATH) that creates a marker file when it runs."""
    bin_dir, marker = tmp_path / "mockbin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 0\n")
    gs.chmod(gs.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir, marker


def _png_header(width: int, height: int) -> bytes:
    """A well-formed RGB PNG whose header claims ``width`` x ``height`` (the data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _imagefolder(root: Path) -> Path:
    for c in ("a", "b"):
        for i in range(2):
            _png(root / "train" / c / f"{i}.png")
            _png(root / "test" / c / f"{i}.png")
    return root


def _params_file(params, tmp_path: Path) -> Path:
    from lpt.config import write_params_atomic

    path = tmp_path / "params.yaml"
    write_params_atomic(path, params.to_dict())
    return path


@pytest.fixture
def toy_model(tmp_path: Path) -> Path:
    return make_toy_onnx(tmp_path / "toy.onnx", toy_metadata())


# ------------------------------------------------------------------------------------------ 1. formats
def test_eps_named_png_runs_nothing_and_is_refused_by_lpt_predict(tmp_path: Path, toy_model: Path) -> None:
    bin_dir, marker = _mock_gs(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    _png(folder / "a.png")
    (folder / "payload.png").write_bytes(EPS)

    # the test can fail: Pillow left to itself takes the file for EPS and runs `gs` when decoding it
    probe = ("import sys; from PIL import Image; im = Image.open(sys.argv[1]); print(im.format); "
             "im.load()")
    control = subprocess.run([sys.executable, "-c", probe, str(folder / "payload.png")], capture_output=True,
                             text=True, timeout=CLI_TIMEOUT,
                             env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert control.stdout.strip() == "EPS", control.stderr
    assert marker.exists(), "the mock gs did not run for Pillow's own EPS decoder: the test would prove nothing"
    marker.unlink()

    for target in (folder, folder / "payload.png"):
        proc = _run("predict", str(toy_model), str(target), path_prefix=bin_dir)
        _one_error_line(proc, 2, f"{folder / 'payload.png'}: format EPS is not allowed", "allowed: PNG, JPEG")
        assert not marker.exists(), "gs ran"
        assert proc.stdout == ""


def test_eps_in_an_image_folder_is_a_bad_item_and_runs_nothing(tmp_path: Path, monkeypatch) -> None:
    bin_dir, marker = _mock_gs(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    root = _imagefolder(tmp_path / "imf")
    (root / "train" / "a" / "payload.png").write_bytes(EPS)
    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)})
    with pytest.raises(IngestError) as info:
        run_ingest(params)
    _one_clean_line(info.value, "payload.png", "format EPS is not allowed", "allowed: " + ", ".join(ALLOWED_FORMATS))
    assert not Path(params.data.out_dir).exists() and not marker.exists()

    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)}, data__skip_bad=True)
    manifest = json.loads(run_ingest(params).manifest_path.read_text())
    skipped = [i for i in manifest["skipped"]["items"] if "payload.png" in i["item"]]
    assert [i["reason"] for i in skipped] == ["format EPS is not allowed; allowed: " + ", ".join(ALLOWED_FORMATS)]
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "SGI", "DDS"])
def test_formats_outside_the_allowlist_are_refused_by_name(fmt: str) -> None:
    """Pillow decodes these; the project refuses them, naming the format."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format=fmt)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as check:
        assert check.format == fmt  # Pillow alone would decode it
    with pytest.raises(ImageRefused, match=f"^format {fmt} is not allowed; allowed: PNG, JPEG, "):
        open_image(data)


def test_bytes_of_no_known_format_are_not_an_image() -> None:
    with pytest.raises(UnidentifiedImageError, match="cannot identify image data: no known image format"):
        open_image(b"just some text, not an image at all")


def test_pillow_pixel_limit_is_the_projects() -> None:
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS == 8192 * 8192 and MAX_IMAGE_SIDE == 16384


# ------------------------------------------------------------------------------------------ 1b. sizes
@pytest.mark.parametrize("size", [(1, 10_000_000), (10_000_000, 1), (9000, 9000), (40_000, 40_000)])
def test_absurd_sizes_are_refused_from_the_header(tmp_path: Path, toy_model: Path, size: tuple[int, int]) -> None:
    data = _png_header(*size)
    assert len(data) < 200
    with pytest.raises(ImageRefused) as info:
        open_image(data)
    assert "too large" in str(info.value)

    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(PredictRefused) as refused:
        load_image(path)
    _one_clean_line(refused.value, f"{path}: ", "too large")

    root = _imagefolder(tmp_path / "imf")
    (root / "test" / "b" / "bomb.png").write_bytes(data)
    with pytest.raises(IngestError) as ingest_error:
        run_ingest(_tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)}))
    _one_clean_line(ingest_error.value, "bomb.png", "too large")


def test_absurd_size_from_lpt_predict_is_one_line_exit_2(tmp_path: Path, toy_model: Path) -> None:
    path = tmp_path / "tall.png"
    path.write_bytes(_png_header(1, 10_000_000))
    _one_error_line(_run("predict", str(toy_model), str(path)), 2, f"{path}: 1 x 10000000 pixels is too large")


# ------------------------------------------------------------------------------------------ 2. train/serve skew
@pytest.mark.parametrize("mode,ext", [("I;16", "png"), ("I;16B", "tif"), ("I", "tif"), ("F", "tif")])
def test_high_bit_depth_file_gives_the_same_tensor_in_training_and_serving(tmp_path: Path, toy_model: Path,
                                                                           mode: str, ext: str) -> None:
    """The same file, read as training reads it (ingest -> shard -> test transform) and as ``lpt predict``
    reads it (Predictor preprocessing), gives the same pixels and the same input tensor."""
    from lpt.config import TransformConfig
    from lpt.data.reader import ShardImages, build_transform

    root = _imagefolder(tmp_path / "imf")
    file = root / "test" / "a" / f"zz_gradient.{ext}"
    expected = _gradient_file(file, mode)  # hand-computed 8-bit values: v >> 8, or round(v * 255) for F
    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)})
    run_ingest(params)
    test = ShardImages(params.data.out_dir, "test")
    trained_on = next(test[i][0] for i in range(len(test)) if test[i][0].size == (64, 16))

    served = load_image(file)
    assert np.array_equal(np.asarray(served), np.asarray(trained_on))
    assert np.array_equal(np.asarray(served)[..., 1], expected)

    predictor = Predictor(toy_model)
    transform = build_transform(TransformConfig(input_size=INPUT, resize=RESIZE, mean=MEAN, std=STD), train=False)
    np.testing.assert_allclose(predictor.preprocess(served), transform(trained_on).numpy(), atol=2e-6, rtol=0)


def test_float_image_outside_unit_range_is_refused_when_served_too(tmp_path: Path) -> None:
    path = tmp_path / "hot.tif"
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(path)
    from lpt.runtime import PredictError

    with pytest.raises(PredictError) as info:
        load_image(path)
    _one_clean_line(info.value, str(path), "outside [0, 1]")


# ------------------------------------------------------------------------------------------ 3. FIFOs
def test_fifo_in_an_image_folder_is_reported_not_opened(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path / "imf")
    fifo = root / "train" / "a" / "pipe.png"
    os.mkfifo(fifo)
    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)})
    proc = _run("ingest", "--params", str(_params_file(params, tmp_path)))
    _one_error_line(proc, 1, str(fifo), "not a regular file (a FIFO)")

    params = _tiny(tmp_path, data__source="imagefolder", data__imagefolder={"root": str(root)}, data__skip_bad=True)
    proc = _run("ingest", "--params", str(_params_file(params, tmp_path)))
    assert proc.returncode == 0, proc.stderr
    skipped = json.loads((Path(params.data.out_dir) / "manifest.json").read_text())["skipped"]["items"]
    assert [(i["item"], i["reason"]) for i in skipped] == [
        (str(fifo), "not a regular file (a FIFO): an image must be a regular file")]


def test_fifo_in_a_list_file_is_a_bad_item_not_a_hang(tmp_path: Path) -> None:
    section = _list_source(tmp_path / "lst", [4, 3])
    os.mkfifo(Path(section["root"]) / "c0" / "pipe.png")
    lines = Path(section["train_list"]).read_text().splitlines()
    Path(section["train_list"]).write_text("\n".join([*lines, "c0/pipe.png 0"]) + "\n")
    where = f"{section['train_list']}:{len(lines) + 1}"
    params = _tiny(tmp_path, data__source="list", data__list=section)
    proc = _run("ingest", "--params", str(_params_file(params, tmp_path)))
    _one_error_line(proc, 1, where, "pipe.png", "not a regular file (a FIFO)")

    params = _tiny(tmp_path, data__source="list", data__list=section, data__skip_bad=True)
    proc = _run("ingest", "--params", str(_params_file(params, tmp_path)))
    assert proc.returncode == 0, proc.stderr
    skipped = json.loads((Path(params.data.out_dir) / "manifest.json").read_text())["skipped"]["items"]
    assert len(skipped) == 1 and skipped[0]["item"].startswith(where) and "a FIFO" in skipped[0]["reason"]


def test_fifo_given_to_lpt_predict_is_one_line_exit_2(tmp_path: Path, toy_model: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    _png(folder / "a.png")
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    for target in (folder, fifo):
        _one_error_line(_run("predict", str(toy_model), str(target)), 2, f"{fifo}: not a regular file (a FIFO)")
