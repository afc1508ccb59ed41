"""DDP on CPU: the pipeline's launcher runs a phase under torchrun with 2 gloo processes (what dvc.yaml does
for ``train.nproc: 2``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from lpt.config import Params
from tests.conftest import REPO_ROOT, make_tiny_params


def test_two_gloo_processes_train_both_phases(tiny_shards: Params, tmp_path: Path) -> None:
    params = make_tiny_params(tmp_path, data__out_dir=str(tiny_shards.data.out_dir), train__nproc=2,
                              train__phase1__grad_accum=2, train__checkpoint_every=4)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_dict()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for phase in (1, 2):
        cmd = [sys.executable, "-m", "pipelines.launch", "--nproc", "2", "--", "lpt", "train", "--phase", str(phase),
               "--params", str(params_file)]
        run = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        meta = json.loads((tmp_path / f"models/phase{phase}/model.json").read_text())
        assert meta["world_size"] == 2 and meta["phase"] == phase
        assert all(math.isfinite(row["loss"]) for row in meta["history"])
        assert load_file(str(tmp_path / f"models/phase{phase}/model.safetensors"))
        assert not any((tmp_path / "models/.scratch").iterdir())  # finished: resume state removed
