"""Random: seeded uniform scores, the floor every method must beat.

    score(j) ~ U(0, 1), drawn from a generator seeded with (seed, layer) so runs are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreContext, Selector, register


@register
@dataclass
class RandomSelector(Selector):
    name = "random"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        g = torch.Generator().manual_seed(ctx.seed * 100_003 + ctx.layer_idx)
        B, H, n = ctx.keys.shape[0], ctx.keys.shape[1], ctx.keys.shape[2]
        return torch.rand(B, H, n, generator=g).to(ctx.keys.device)
