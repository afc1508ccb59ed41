"""AdaptFormer-style bottleneck adapters in parallel to each block's MLP (LIFT, Shi et al., ICML 2024).

Each timm block computes ``x + ls2(mlp(norm2(x)))``. :func:`attach_adapters` replaces every block's ``mlp``
attribute by :class:`ParallelAdapterMLP`, which returns ``mlp(h) + adapter(h)`` for ``h = norm2(x)``: the
adapter runs beside the frozen MLP on the same normalised input (AdaptFormer's formulation,
Chen et al., NeurIPS 2022)::

    adapter(h) = scale * up(relu(down(h)))      down: D -> r,  up: r -> D,  scale: one learnable scalar

``up`` starts at zero, so an untrained adapter leaves the backbone's function exactly unchanged; ``down`` is
Kaiming-normal, ``scale`` starts at 1 (LIFT's choice; AdaptFormer fixes it at 0.1). LIFT's code gives each
adapter a LayerNorm of its own on ``x``; here it reads the block's frozen ``norm2`` output instead, which
differs only by a per-feature affine map that ``down`` can absorb.

Shapes: B batch, N tokens, D embed dim, r bottleneck. Parameters per block: 2 D r + D + r + 1.

The block loop is untouched (the adapter lives inside the block), so every forward of
:class:`lpt.model.lpt.LPTModel`, its export and its block-reuse paths see the adapters without changes.
The adapters themselves are registered on the model (``LPTModel.adapters``), not inside the backbone:
the backbone's frozen tensors keep their meaning, and the adapters' tensors go through the model's
``trainable_state_dict`` like prompts and head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BottleneckAdapter", "ParallelAdapterMLP", "attach_adapters", "default_adapter_dim"]


def default_adapter_dim(num_classes: int, depth: int) -> int:
    """LIFT's bottleneck width ``2 ** max(0, floor(log2(C / (2 L))))``: trainable adapter parameters grow
    with the number of classes C, and shrink per block with the depth L (C=100, L=12 -> 4; C=10 -> 1)."""
    assert num_classes >= 1 and depth >= 1, (num_classes, depth)
    return 2 ** max(0, math.floor(math.log2(num_classes / (2 * depth))))


class BottleneckAdapter(nn.Module):
    """``scale * up(relu(down(h)))``: [B, N, D] -> [B, N, D].

    Args:
        dim: D.
        bottleneck: r.
        generator: random generator for ``down``'s initial weights.
    """

    def __init__(self, dim: int, bottleneck: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        assert dim >= 1 and bottleneck >= 1, (dim, bottleneck)
        self.down = nn.Linear(dim, bottleneck)  # [r, D]
        self.up = nn.Linear(bottleneck, dim)  # [D, r]
        self.scale = nn.Parameter(torch.ones(1))
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # zero: the adapted block starts as the frozen block
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(h))) * self.scale  # [B, N, r] inside, [B, N, D] out


class ParallelAdapterMLP(nn.Module):
    """A block's MLP with an adapter beside it: ``mlp(h) + adapter(h)``.

    The wrapped MLP is a submodule (the backbone keeps owning it); the adapter is only referenced, so its
    tensors are registered once, on the model that trains and saves them.

    Args:
        mlp: the block's frozen MLP.
        adapter: the :class:`BottleneckAdapter` (registered elsewhere).
    """

    def __init__(self, mlp: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.mlp = mlp
        self._adapter = (adapter,)  # a tuple is not a submodule: no second registration of the adapter

    @property
    def adapter(self) -> BottleneckAdapter:
        return self._adapter[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h) + self._adapter[0](h)  # [B, N, D]


def attach_adapters(blocks: nn.ModuleList | list[nn.Module], dim: int, bottleneck: int,
                    generator: torch.Generator | None = None) -> nn.ModuleList:
    """Wrap every block's ``mlp`` with a :class:`ParallelAdapterMLP`; return the adapters (one per block).

    Args:
        blocks: the backbone's transformer blocks (each with an ``mlp`` attribute).
        dim: D, the embed dim.
        bottleneck: r.
        generator: draws every adapter's ``down`` weights, block after block.

    Raises:
        ValueError: a block without an ``mlp`` attribute, or one that already has an adapter.
    """
    adapters = nn.ModuleList()
    for i, block in enumerate(blocks):
        mlp = getattr(block, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise ValueError(f"block {i} ({type(block).__name__}) has no `mlp` module to put an adapter beside")
        if isinstance(mlp, ParallelAdapterMLP):
            raise ValueError(f"block {i} already has an adapter")
        adapter = BottleneckAdapter(dim, bottleneck, generator=generator)
        block.mlp = ParallelAdapterMLP(mlp, adapter)
        adapters.append(adapter)
    return adapters
