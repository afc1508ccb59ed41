"""One rank of the two-node check in tests/test_scale.py (run under torchrun, never collected by pytest).

Joins the gloo group torchrun set up, draws this rank's epoch from the training samplers exactly as
``lpt train`` does (:func:`lpt.train.batches.build_samplers` / :func:`~lpt.train.batches.epoch_indices`,
``floor(N / B) + 1`` steps of the rank's share of the batch), streams the train split's sample keys
through :func:`lpt.data.reader.stream_samples` with two DataLoader workers, gathers every rank's results
over the process group and, on rank 0, writes them to ``OUT`` as JSON.

Usage: ``torchrun ... tests/ddp_epoch_probe.py PARAMS_YAML OUT_JSON``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(params_file: str, out: str) -> None:
    import webdataset as wds

    from lpt.config import load_params
    from lpt.data.reader import stream_samples
    from lpt.train.distributed import dist_from_env, init_distributed, shutdown

    params = load_params(params_file)
    info = dist_from_env()
    # the stream first: its DataLoader workers fork before gloo starts its threads (webdataset's
    # split_by_node reads RANK / WORLD_SIZE from the environment torchrun set)
    keys = list(wds.WebLoader(stream_samples(params.data.out_dir, "train", shuffle_buffer=16, seed=params.seed)
                              .map(lambda sample: sample["__key__"]), batch_size=None, num_workers=2))
    init_distributed(info, "cpu")
    try:
        _draw_and_gather(params, info, keys, out)
    finally:
        shutdown(info)  # leave the group before exit: gloo's threads must not outlive it (SIGABRT)


def _draw_and_gather(params, info, keys: list[str], out: str) -> None:
    from lpt.data.reader import ShardImages
    from lpt.optim import steps_per_epoch
    from lpt.train.batches import build_samplers, epoch_indices
    from lpt.train.distributed import all_gather

    labels = ShardImages(Path(params.data.out_dir), "train").labels
    batch = params.train.phase2.batch_size
    rank_batch = batch // info.world_size
    need = steps_per_epoch(len(labels), batch) * rank_batch
    samplers = build_samplers(np.asarray(labels), per_rank_epoch=need, seed=params.seed, rank=info.rank,
                              world_size=info.world_size, streams=("ib", "cb"),
                              samples_per_class=params.train.phase2.samples_per_class)
    streams = epoch_indices(samplers, {}, epoch=0, need=need)
    mine = {"rank": info.rank, "world_size": info.world_size, "local_world_size": info.local_world_size,
            "ib": streams["ib"].tolist(), "cb": streams["cb"].tolist(), "keys": keys}
    gathered = all_gather(info, mine)
    if info.is_main:
        Path(out).write_text(json.dumps({"num_samples": len(labels), "batch": batch, "ranks": gathered}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
