"""Shared test fixtures: a tiny config (tiny ViT, tiny synthetic data) whose outputs live under tmp_path.

Environment flags are set before any heavy import so a missing hub download fails fast and no
telemetry is attempted.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from pathlib import Path
from typing import Any

import pytest

from lpt.config import Params, apply_overrides, parse_params, read_raw

REPO_ROOT = Path(__file__).resolve().parents[1]

# Overrides that shrink the real params.yaml to something that trains in seconds on 2 cores.
TINY_OVERRIDES: dict[str, Any] = {
    "data.source": "synthetic",
    "data.imbalance_ratio": 10,
    "data.max_per_class": 40,
    "data.val_per_class": 4,
    "data.test_per_class": 8,
    "data.shard_maxcount": 60,
    "data.workers": 1,
    "data.synthetic.num_classes": 10,
    "data.synthetic.image_size": 32,
    "transforms.input_size": 32,
    "transforms.resize": 32,
    "backbone.name": "vit_tiny_patch16_224",
    "backbone.weights": "none",
    "backbone.timm_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3},
    "pretrain.source_classes": 5,
    "pretrain.per_class": 20,
    "pretrain.teacher": "none",
    "pretrain.epochs": 1,
    "pretrain.batch_size": 32,
    "model.prompt_length": 4,
    "model.pool_size": 4,
    "model.shared_blocks": 2,
    "model.top_k": 2,
    "train.phase1.epochs": 1,
    "train.phase1.batch_size": 16,
    "train.phase2.epochs": 1,
    "train.phase2.batch_size": 16,
    "train.phase1.min_steps": 0,  # tiny runs: their epochs only (the step floor is for real small sets)
    "train.phase2.min_steps": 0,
    "train.checkpoint_every": 5,
    "train.threads": 1,
    "evaluate.batch_size": 64,
    # a seconds-long tiny run is not held to the embedded default's quality gate (tests set their own)
    "evaluate.gate.min_overall": 0.0,
    "evaluate.gate.min_few": 0.0,
    "evaluate.gate.pixel_baselines": [],
}


def make_tiny_params(root: Path, **overrides: Any) -> Params:
    """The repo's params.yaml shrunk by TINY_OVERRIDES, every output path under ``root``.

    Extra ``overrides`` use double underscores for dots: ``make_tiny_params(tmp, train__method="vpt_deep")``.
    """
    raw = read_raw(REPO_ROOT / "params.yaml")
    ov = dict(TINY_OVERRIDES)
    ov.update({
        "data.out_dir": str(root / "data/shards"),
        "validate.report_dir": str(root / "data/validation"),
        "pretrain.out_dir": str(root / "models/pretrain"),
        "pretrain.cache_dir": str(root / "data/pretrain"),
        "train.out_dir": str(root / "models"),
        "evaluate.out_dir": str(root / "reports"),
        "export.out_dir": str(root / "models/export"),
        "pack.out_dir": str(root / "models/pack"),
    })
    ov.update({k.replace("__", "."): v for k, v in overrides.items()})
    return parse_params(apply_overrides(raw, ov), source="tiny params")


def tiny_raw_params() -> dict[str, Any]:
    """TINY_OVERRIDES applied to params.yaml with the file's relative paths kept (for DVC repos in tmp dirs)."""
    return apply_overrides(read_raw(REPO_ROOT / "params.yaml"), TINY_OVERRIDES)


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    return make_tiny_params(tmp_path)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """Tiny synthetic shards ingested once per session (read-only for tests: copy before mutating)."""
    from lpt.data.ingest import run_ingest

    root = tmp_path_factory.mktemp("tiny")
    params = make_tiny_params(root)
    run_ingest(params)
    return params
