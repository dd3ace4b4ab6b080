"""H2O (heavy hitters): attention each key receives from every prompt query, normalised by how many see it.

For key j of KV head h (G query heads share it), over the real (non-padding) prompt queries i:

    score(j) = sum_{i >= j} sum_{g} softmax_j(q_{i,g} . k_j * scaling) / (G * |{i : i >= j}|)

Computed ``chunk`` queries at a time: working memory ``O(B * H_q * chunk * n)``, never an ``n x n`` matrix per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_scores import attention_probability_sums
from .base import ScoreContext, Selector, register


@register
@dataclass
class H2O(Selector):
    """``chunk``: prompt queries per attention chunk (memory grows linearly with the prompt)."""

    name = "h2o"
    needs_queries = True
    chunk: int = 128

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"h2o chunk must be positive, got {self.chunk}")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        layout = ctx.layout
        device = ctx.keys.device
        n = layout.length
        real = layout.real_mask(device)
        positions = torch.arange(n, device=device)
        sums = attention_probability_sums(
            ctx.queries, ctx.keys, positions, real.float(), real, ctx.scaling, ctx.softcap, self.chunk
        )
        seen_by = (n - positions).float().view(1, 1, n)  # real queries i >= j (padding sits before every real key)
        return sums / (seen_by * (ctx.queries.shape[1] // ctx.num_kv_heads))
