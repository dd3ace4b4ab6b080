"""KeyDiff: keep the keys that point away from the mean key direction (query-free).

Per row and KV head, over the real (non-padding) prompt keys R:

    anchor   = mean_{i in R} k_i / ||k_i||
    score(j) = -cos(k_j, anchor) = -(k_j . anchor) / (||k_j|| * ||anchor||)

(Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction"): keys similar to all the others carry
little that is distinctive, so the most dissimilar ones are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ScoreContext, Selector, register


@register
@dataclass
class KeyDiff(Selector):
    name = "keydiff"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        keys = ctx.keys.float()
        real = ctx.layout.real_mask(keys.device).unsqueeze(1).unsqueeze(-1)  # [B, 1, n, 1]
        unit = F.normalize(keys, dim=-1) * real
        anchor = unit.sum(2, keepdim=True) / real.sum(2, keepdim=True).clamp(min=1)  # [B, H, 1, D]
        return -F.cosine_similarity(keys, anchor, dim=-1, eps=1e-8)
