"""StreamingLLM: attention sinks plus the most recent tokens.

    score(j) = j        (newer is better; the first ``sink_tokens`` tokens are protected by the cache)

The cache protects 4 sink tokens by default with this selector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import HeldContext, ScoreContext, Selector, register


@register
@dataclass
class Streaming(Selector):
    name = "streaming"
    needs_queries = False
    default_sinks = 4

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        n = ctx.keys.shape[2]
        return torch.arange(n, dtype=torch.float32, device=ctx.keys.device).view(1, 1, n)

    def score_held(self, held: HeldContext) -> torch.Tensor:
        """``p``, the slot's position: exact (a position-only score keeps the unchunked positions)."""
        return held.positions.float()
