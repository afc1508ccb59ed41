"""This process's place in a torchrun launch, and the few collectives training needs.

Launching several processes is the pipeline layer's job (``python -m pipelines.launch --nproc N -- lpt
train ...``, what dvc.yaml runs; ``--nnodes``/``--node-rank`` across machines); the library only reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DistInfo", "dist_from_env", "init_distributed", "barrier", "all_gather", "all_reduce_sum", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun launch (``world_size`` 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node (torchrun's --nproc_per_node); world_size over all nodes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> DistInfo:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` as set by torchrun (on every
    node of a multi-node launch; ``LOCAL_WORLD_SIZE`` defaults to ``WORLD_SIZE``, a single node)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return DistInfo(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def init_distributed(dist_info: DistInfo, device: str) -> str:
    """Join the process group (nccl on GPU, gloo on CPU); returns this rank's device."""
    import torch.distributed as tdist

    if not dist_info.enabled:
        return device
    if device.startswith("cuda"):
        torch.cuda.set_device(dist_info.local_rank)
        device = f"cuda:{dist_info.local_rank}"
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def barrier(dist_info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist_info.enabled:
        import torch.distributed as tdist

        tdist.barrier()


def all_gather(dist_info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (JSON-like values), in rank order."""
    if not dist_info.enabled:
        return [obj]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist_info.world_size
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_sum(dist_info: DistInfo, tensor: torch.Tensor, device: str) -> torch.Tensor:
    """Sum ``tensor`` over ranks (returned on the CPU)."""
    if not dist_info.enabled:
        return tensor
    import torch.distributed as tdist

    tensor = tensor.to(device)
    tdist.all_reduce(tensor)
    return tensor.cpu()


def shutdown(dist_info: DistInfo) -> None:
    """Leave the process group."""
    if dist_info.enabled:
        import torch.distributed as tdist

        if tdist.is_initialized():
            tdist.destroy_process_group()
