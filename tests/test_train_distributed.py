"""DDP on CPU: ``train.nproc: 2`` re-launches the phase under torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors.torch import load_file

from lpt.config import Params
from lpt.train import run_phase
from tests.conftest import make_tiny_params


def test_two_gloo_processes_train_both_phases(tiny_shards: Params, tmp_path: Path) -> None:
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir), train__nproc=2,
                              train__phase1__grad_accum=2, train__checkpoint_every=4)
    for phase in (1, 2):
        result = run_phase(params, phase)
        meta = json.loads((tmp_path / f"models/phase{phase}/model.json").read_text())
        assert meta["world_size"] == 2 and meta["phase"] == phase
        assert all(math.isfinite(row["loss"]) for row in meta["history"])
        assert load_file(result["checkpoint"])
        state = json.loads((tmp_path / f"models/phase{phase}/last/state.json").read_text())
        assert len(state["ranks"]) == 2  # every rank's sampler + RNG state is kept for resume
