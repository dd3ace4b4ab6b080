"""H2O (heavy hitters): attention each key receives from every prompt query, normalised by how many see it.

For key j of KV head h (G query heads share it), over the real (non-padding) prompt queries i:

    score(j) = sum_{i >= j} sum_{g} softmax_j(q_{i,g} . k_j * scaling) / (G * |{i : i >= j}|)

Computed ``chunk`` queries at a time: working memory ``O(B * H_q * chunk * n)``, never an ``n x n`` matrix per layer.

Chunked (:meth:`H2O.score_held`): the attention every held key received from all real queries so far, summed over
chunks, divided by ``G`` times the queries at or after it. An approximation (evicted keys leave the softmax); with
one chunk it is unchunked H2O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_scores import attention_probability_sums
from .base import HeldContext, ScoreContext, Selector, register


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

    def observe_held(self, held: HeldContext) -> None:
        """Add this chunk's attention to every held slot to ``held.state["h2o"]`` (``[B, H_kv, T]``, summed over the
        query heads)."""
        real = held.real_queries()
        sums = held.attention(torch.arange(held.chunk, device=real.device), real.float(), self.chunk)
        acc = held.state.get("h2o")
        if acc is not None:
            sums[..., : acc.shape[-1]] += acc
        held.state["h2o"] = sums

    def score_held(self, held: HeldContext) -> torch.Tensor:
        seen = (held.start + held.chunk - held.positions).clamp(min=1).float()  # real queries at or after each key
        return held.state["h2o"] / (seen * held.query_heads_per_kv)
