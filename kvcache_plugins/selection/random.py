"""Random: seeded uniform scores, the floor every method must beat.

    score(j) ~ U(0, 1), drawn from a generator seeded with (seed, layer) so runs are reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import HeldContext, ScoreContext, Selector, register


@register
@dataclass
class RandomSelector(Selector):
    name = "random"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        B, H, n = ctx.keys.shape[0], ctx.keys.shape[1], ctx.keys.shape[2]
        return self._draw(ctx.seed, ctx.layer_idx, B, H, n).to(ctx.keys.device)

    def score_held(self, held: HeldContext) -> torch.Tensor:
        """The unchunked draw at each slot's position: exact."""
        B, H = held.keys.shape[:2]
        draw = self._draw(held.seed, held.layer_idx, B, H, held.total).to(held.keys.device)
        return draw.gather(2, held.positions.clamp(min=0).to(draw.device).expand(B, H, held.held))

    @staticmethod
    def _draw(seed: int, layer_idx: int, B: int, H: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 100_003 + layer_idx)
        return torch.rand(B, H, n, generator=g)
