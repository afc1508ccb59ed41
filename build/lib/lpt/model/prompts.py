"""Prompt parameters of LPT: the shared prompt and the group prompt pool with its keys.

Shapes (B batch, L blocks, S shared-only blocks, T tokens per layer, D embed dim, P pool size, k top-k):
    shared prompt       [L, T, D]          one set of T tokens per block (VPT-deep)
    group prompt pool   [P, L-S, T, D]     one prompt per group, for blocks S..L-1
    keys                [P, D]             one key per group prompt, matched against the query by cosine

Both are initialised truncated-normal with std 0.02 (as in the spec). The modules hold parameters and
the (ONNX-friendly) selection maths; the transformer pass that consumes them lives in ``lpt.model.lpt``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SharedPrompt", "GroupPromptPool", "PoolSelection"]


class SharedPrompt(nn.Module):
    """The shared (phase-1) prompt: T tokens for each of the L blocks.

    Args:
        num_layers: L, the backbone depth.
        length: T tokens per block.
        dim: D, the embed dim.
        init_std: truncated-normal std.
    """

    def __init__(self, num_layers: int, length: int, dim: int, init_std: float = 0.02,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        assert num_layers >= 1 and length >= 1 and dim >= 1, (num_layers, length, dim)
        self.prompt = nn.Parameter(torch.empty(num_layers, length, dim))  # [L, T, D]
        nn.init.trunc_normal_(self.prompt, std=init_std, a=-2 * init_std, b=2 * init_std, generator=generator)

    def layer(self, i: int, batch: int) -> torch.Tensor:
        """Block ``i``'s tokens broadcast over the batch: [B, T, D] (a view, no copy)."""
        return self.prompt[i].unsqueeze(0).expand(batch, -1, -1)


class PoolSelection(NamedTuple):
    """The result of matching queries against the pool keys."""

    prompts: torch.Tensor  # [B, L-S, T, D] element-wise mean of the k selected prompts
    selected: torch.Tensor  # [B, k] int64 indices into the pool
    sim: torch.Tensor  # scalar: (sum over batch and k of cos(q, key_selected)) / B


class GroupPromptPool(nn.Module):
    """P group-specific prompts for blocks S..L-1 and one key per prompt.

    Args:
        pool_size: P.
        num_layers: L - S, the blocks that see group prompts.
        length: T tokens per block.
        dim: D.
        top_k: k prompts selected (and averaged) per sample.
        init_std: truncated-normal std for prompts and keys.
        generator: the pool's own random generator (prompts first, then keys), so its initial values do
            not depend on what was built before it.
    """

    def __init__(
        self, pool_size: int, num_layers: int, length: int, dim: int, top_k: int, init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        assert 1 <= top_k <= pool_size, f"top_k ({top_k}) must be in 1..pool_size ({pool_size})"
        assert num_layers >= 1 and length >= 1, (num_layers, length)
        self.top_k = top_k
        self.prompts = nn.Parameter(torch.empty(pool_size, num_layers, length, dim))  # [P, L-S, T, D]
        self.keys = nn.Parameter(torch.empty(pool_size, dim))  # [P, D]
        nn.init.trunc_normal_(self.prompts, std=init_std, a=-2 * init_std, b=2 * init_std, generator=generator)
        nn.init.trunc_normal_(self.keys, std=init_std, a=-2 * init_std, b=2 * init_std, generator=generator)

    def select(self, query: torch.Tensor) -> PoolSelection:
        """Match queries to keys and build each sample's group prompt.

        The query carries no gradient (it is detached here too). The key-matching similarity is the only
        path to the keys' gradient; top-k indices are not differentiable, so the prompts get gradient only
        through the prompted pass.

        Args:
            query: [B, D] the final-norm CLS feature of the shared-prompt pass.

        Returns:
            :class:`PoolSelection`.
        """
        # matching in float32 even under autocast: bf16 cosines would make top-k ties and flips likely.
        with torch.autocast(device_type=query.device.type, enabled=False):
            q = F.normalize(query.detach().float(), dim=-1)  # [B, D]
            keys = F.normalize(self.keys.float(), dim=-1)  # [P, D]
            cos = q @ keys.t()  # [B, P]
            top_cos, selected = torch.topk(cos, self.top_k, dim=1)  # [B, k], [B, k]
        batch = query.shape[0]
        sim = top_cos.sum() / batch  # scalar; gradient flows to the selected keys only
        # gather the selected prompts without python loops: index_select on the flattened indices.
        picked = self.prompts.index_select(0, selected.reshape(-1))  # [B*k, L-S, T, D]
        picked = picked.reshape(batch, self.top_k, *self.prompts.shape[1:])  # [B, k, L-S, T, D]
        return PoolSelection(prompts=picked.mean(dim=1), selected=selected, sim=sim)
