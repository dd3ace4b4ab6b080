"""KeyDiff: keep the keys that point away from the mean key direction (query-free).

Per row and KV head, over the real (non-padding) prompt keys R:

    anchor   = mean_{i in R} k_i / ||k_i||
    score(j) = -cos(k_j, anchor) = -(k_j . anchor) / (||k_j|| * ||anchor||)

(Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction"): keys similar to all the others carry
little that is distinctive, so the most dissimilar ones are kept.

Chunked (:meth:`KeyDiff.score_held`): the same rule over the held slots (anchor = mean direction of the held real
keys), as the paper applies it to a cache that streams in blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import HeldContext, ScoreContext, Selector, register


@register
@dataclass
class KeyDiff(Selector):
    name = "keydiff"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return _keydiff(ctx.keys.float(), ctx.layout.real_mask(ctx.keys.device))

    def score_held(self, held: HeldContext) -> torch.Tensor:
        return _keydiff(held.keys[:, :, : held.held].float(), held.valid.to(held.keys.device))


def _keydiff(keys: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``-cos(k_j, anchor)`` for keys ``[B, H, n, D]``, the anchor over the ``real`` ``Bool [B, n]`` keys."""
    real = real.unsqueeze(1).unsqueeze(-1)  # [B, 1, n, 1]
    unit = F.normalize(keys, dim=-1) * real
    anchor = unit.sum(2, keepdim=True) / real.sum(2, keepdim=True).clamp(min=1)  # [B, H, 1, D]
    return -F.cosine_similarity(keys, anchor, dim=-1, eps=1e-8)
