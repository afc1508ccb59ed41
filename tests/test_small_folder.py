"""A user's own small folder of real images, trained with the defaults (issue: small data trains right).

About 600 long-tailed Fashion-MNIST training images (10 classes, 28 px grayscale PNGs, 230 -> 2) in an
image folder, run through ingest, both phases and evaluate with params.yaml as it is, except
``data.source: imagefolder``, its root, and the output folders (under the test's tmp dir). Slow: both
phases train their step floor (``train.phaseN.min_steps``) on the embedded backbone, a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lpt.config import apply_overrides, parse_params, read_raw
from tests.conftest import REPO_ROOT

FASHION = Path("/usr/share/datasets/fashion-mnist")
TRAIN_COUNTS = [230, 137, 82, 49, 29, 17, 10, 6, 3, 2]  # IR 115, 565 images: long-tailed, every group present
TEST_PER_CLASS = 50


def _fashion_folder(root: Path) -> Path:
    """``root/train/<class>/*.png`` (TRAIN_COUNTS) and ``root/test/<class>/*.png`` from the official files."""
    from lpt.data.sources.fashion_mnist import CLASS_NAMES, read_idx

    for split, prefix, per_class in (("train", "train", TRAIN_COUNTS), ("test", "t10k", [TEST_PER_CLASS] * 10)):
        images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")  # [N, 28, 28] uint8
        labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")
        for c, n in enumerate(per_class):
            folder = root / split / CLASS_NAMES[c].replace("/", "-")
            folder.mkdir(parents=True)
            for i, idx in enumerate(np.flatnonzero(labels == c)[:n]):
                Image.fromarray(images[idx], mode="L").save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_a_small_folder_trains_right_with_the_defaults(tmp_path: Path) -> None:
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST IDX files not installed (Debian package dataset-fashion-mnist)")
    from lpt.data.ingest import run_ingest
    from lpt.evaluate import run_evaluate
    from lpt.train import run_phase

    root = _fashion_folder(tmp_path / "fashion")
    raw = apply_overrides(read_raw(REPO_ROOT / "params.yaml"), {
        "data.source": "imagefolder", "data.imagefolder": {"root": str(root)},
        "data.out_dir": str(tmp_path / "shards"), "train.out_dir": str(tmp_path / "models"),
        "evaluate.out_dir": str(tmp_path / "reports"),
    })
    raw["pretrain"]["out_dir"] = str(REPO_ROOT / raw["pretrain"]["out_dir"])  # the committed embedded backbone
    params = parse_params(raw, "params.yaml + a small image folder")

    ingest = run_ingest(params)
    manifest = json.loads(ingest.manifest_path.read_text())
    assert ingest.carved is not None and ingest.carved <= 0.2 * sum(TRAIN_COUNTS)
    assert min(manifest["train_counts"]) == 2  # the 2- and 3-image classes are not carved
    for phase in (1, 2):
        meta = json.loads((Path(run_phase(params, phase)["phase_dir"]) / "model.json").read_text())
        assert meta["steps"] >= getattr(params.train, f"phase{phase}").min_steps > 0
    result = run_evaluate(params)
    metrics = result.metrics
    assert all(math.isfinite(metrics[g]) for g in ("many", "medium", "few")), metrics  # the gate saw all three
    gate = json.loads((tmp_path / "reports" / "gate.json").read_text())
    assert gate["notes"] == [] and set(gate["pixel_overall"]) == {"pixel_ncm"}
    # The gate judges the model against the pixel nearest class mean of this very split: it passes exactly when
    # the model beats it. Measured (docs/training.md): LPT 66.8 % test against the pixel NCM's 65.6 % (with the
    # earlier random-resized crop: 59.6 %, and the gate failed it, as it should).
    beats = metrics["overall"] > gate["pixel_overall"]["pixel_ncm"]
    assert result.gate_passed == beats, (metrics["overall"], gate)
    print(f"small folder: LPT test {metrics['overall']:.4f} vs pixel NCM {gate['pixel_overall']['pixel_ncm']:.4f}")
