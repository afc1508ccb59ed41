"""AdaptFormer bottleneck adapters beside each block's MLP, placed as LIFT places them (Shi et al., ICML 2024).

A timm block computes ``x = x + attn-branch(x)`` and then ``x + drop_path2(ls2(mlp(norm2(x))))``. LIFT's
AdaptFormer (Chen et al., NeurIPS 2022) reads the same residual ``x`` through a LayerNorm *of its own* and adds
its output to the residual directly, beside the MLP branch and outside its layer scale::

    x_out = x + ls2(mlp(norm2(x))) + adapter(x)
    adapter(x) = scale * up(relu(down(ln(x))))       ln: trainable LayerNorm(D); down: D -> r; up: r -> D

:func:`attach_adapters` does this without touching the block loop: ``norm2`` is wrapped by a :class:`_Tap`
that keeps its input ``x`` for the rest of the block's forward, and ``ls2`` by :class:`AdapterBeside`,
which returns ``ls2(y) + adapter(x)``. The layer scale of DeiT-III / DINOv2-style blocks therefore does not
throttle the adapter (it multiplies the MLP branch only). ``drop_path2`` still wraps the sum; it is an identity
for the frozen backbone, which stays in eval mode.

A block without an ``ls2`` module (timm ``Eva``: ``gamma_2`` is a bare tensor) gets the adapter inside its MLP
(:class:`AdapterBeside` around ``mlp``: ``mlp(h) + adapter(x)``, the tapped ``x`` again), which is LIFT's placement
whenever ``gamma_2`` is None; with a ``gamma_2`` layer scale that one family's adapter is scaled by it.

``up`` starts at zero, so an untrained adapter leaves the backbone's function exactly unchanged; ``down`` is
Kaiming-normal, ``ln`` starts at weight 1 / bias 0 and ``scale`` at 1 (LIFT's choices; AdaptFormer fixes the
scale at 0.1).

Shapes: B batch, N tokens, D embed dim, r bottleneck. Parameters per block: 2 D r + D + r + 1 + 2 D (the LN).

The adapters themselves are registered on the model (``LPTModel.adapters``), not inside the backbone: the
backbone's frozen tensors keep their meaning, and the adapters' tensors go through the model's
``trainable_state_dict`` like prompts and head. The wrappers only reference them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BottleneckAdapter", "AdapterBeside", "attach_adapters", "default_adapter_dim"]


def default_adapter_dim(num_classes: int, depth: int) -> int:
    """LIFT's bottleneck width ``2 ** max(0, floor(log2(C / (2 L))))``: trainable adapter parameters grow
    with the number of classes C, and shrink per block with the depth L (C=100, L=12 -> 4; C=10 -> 1)."""
    assert num_classes >= 1 and depth >= 1, (num_classes, depth)
    return 2 ** max(0, math.floor(math.log2(num_classes / (2 * depth))))


class BottleneckAdapter(nn.Module):
    """``scale * up(relu(down(ln(x))))``: [B, N, D] -> [B, N, D].

    Args:
        dim: D.
        bottleneck: r.
        generator: random generator for ``down``'s initial weights.
    """

    def __init__(self, dim: int, bottleneck: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        assert dim >= 1 and bottleneck >= 1, (dim, bottleneck)
        self.ln = nn.LayerNorm(dim)  # LIFT's own LayerNorm on the residual (weight 1, bias 0)
        self.down = nn.Linear(dim, bottleneck)  # [r, D]
        self.up = nn.Linear(bottleneck, dim)  # [D, r]
        self.scale = nn.Parameter(torch.ones(1))
        nn.init.kaiming_normal_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # zero: the adapted block starts as the frozen block
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(self.ln(x)))) * self.scale  # [B, N, r] inside, [B, N, D] out


class _Tap(nn.Module):
    """``norm2`` unchanged, keeping its input (the residual ``x``) for the adapter later in the same block."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.x: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.x = x  # [B, N, D]; read once by the adapter wrapper of the same block, in the same forward
        return self.norm(x)


class AdapterBeside(nn.Module):
    """A block module followed by the adapter's output on the tapped residual: ``inner(y) + adapter(x)``.

    Wraps ``ls2`` (LIFT's placement: outside the layer scale) or, for a block without an ``ls2`` module,
    ``mlp``. The tap and the adapter are held in a tuple, so neither is registered a second time.
    """

    def __init__(self, inner: nn.Module, tap: _Tap, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.inner = inner
        self._refs = (tap, adapter)

    @property
    def adapter(self) -> BottleneckAdapter:
        return self._refs[1]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        tap, adapter = self._refs
        assert tap.x is not None, "the block ran its MLP branch without norm2"
        x, tap.x = tap.x, None
        return self.inner(y) + adapter(x)  # [B, N, D]


def attach_adapters(blocks: nn.ModuleList | list[nn.Module], dim: int, bottleneck: int,
                    generator: torch.Generator | None = None) -> nn.ModuleList:
    """Give every block an adapter on its residual (module docstring); return the adapters (one per block).

    Args:
        blocks: the backbone's transformer blocks (each with ``norm2`` and ``mlp``).
        dim: D, the embed dim.
        bottleneck: r.
        generator: draws every adapter's ``down`` weights, block after block.

    Raises:
        ValueError: a block without ``norm2`` / ``mlp`` modules, or one that already has an adapter.
    """
    adapters = nn.ModuleList()
    for i, block in enumerate(blocks):
        norm, mlp = getattr(block, "norm2", None), getattr(block, "mlp", None)
        if not isinstance(norm, nn.Module) or not isinstance(mlp, nn.Module):
            raise ValueError(f"block {i} ({type(block).__name__}) has no `norm2` and `mlp` modules to put an adapter beside")
        if isinstance(norm, _Tap):
            raise ValueError(f"block {i} already has an adapter")
        adapter = BottleneckAdapter(dim, bottleneck, generator=generator)
        tap = _Tap(norm)
        block.norm2 = tap
        ls = getattr(block, "ls2", None)
        if isinstance(ls, nn.Module):
            block.ls2 = AdapterBeside(ls, tap, adapter)
        else:
            block.mlp = AdapterBeside(mlp, tap, adapter)
        adapters.append(adapter)
    return adapters
