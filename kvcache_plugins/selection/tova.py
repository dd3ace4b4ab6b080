"""TOVA (token omission via attention): keep the keys the newest prompt query attends to.

For the last real prompt position t of a row and the G query heads sharing KV head h:

    score(j) = 1 / G * sum_{g} softmax_j(q_{t,g} . k_j * scaling)        (softcapped first where the model does)

(Oren et al., 2024, "Transformers are Multi-State RNNs"). kvpress averages over all heads of the layer; here
each KV head keeps its own score and the cache's ``granularity`` decides whether heads share one position set.

Chunked (:meth:`TOVA.score_held`): the chunk's newest real query over the held slots (the rule TOVA applies at
every step of its own recurrence); with one chunk it is unchunked TOVA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_scores import attention_probability_sums, last_queries
from .base import HeldContext, ScoreContext, Selector, register


@register
@dataclass
class TOVA(Selector):
    name = "tova"
    needs_queries = True

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        layout = ctx.layout
        device = ctx.keys.device
        positions, weights = last_queries(layout.length, layout.real_len.clamp(max=1), device)
        sums = attention_probability_sums(
            ctx.queries[:, :, positions], ctx.keys, positions, weights, layout.real_mask(device), ctx.scaling,
            ctx.softcap,
        )
        return sums / (ctx.queries.shape[1] // ctx.num_kv_heads)

    def score_held(self, held: HeldContext) -> torch.Tensor:
        offsets, weight = held.last_real_queries(torch.tensor(1))
        return held.attention(offsets, weight) / held.query_heads_per_kv
