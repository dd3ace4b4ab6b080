"""Knorm: keys with a small norm draw more attention (query-free).

    score(j) = -|| k_j ||_2        per KV head
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import HeldContext, ScoreContext, Selector, register


@register
@dataclass
class KNorm(Selector):
    name = "knorm"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return -ctx.keys.float().norm(dim=-1)

    def score_held(self, held: HeldContext) -> torch.Tensor:
        """The same rule on the held keys: exact in the first layer; deeper keys of later chunks come from hidden
        states that saw only the kept past."""
        return -held.keys[:, :, : held.held].float().norm(dim=-1)
