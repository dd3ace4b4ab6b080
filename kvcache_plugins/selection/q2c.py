"""Q2C (question-to-context): how much the question attends to each context token.

For layer l and KV head h, with the question positions Q of a row and the G query heads sharing h:

    score(j) = 1 / (|Q| * G) * sum_{i in Q} sum_{g} softmax_j(q_{i,g} . k_j * scaling)

The softmax runs over every key query i can see (causal, padding excluded); only context columns are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_scores import attention_probability_sums, last_queries
from .base import ScoreContext, Selector, register


@register
@dataclass
class Q2C(Selector):
    """Question-to-context attention. ``chunk``: question queries per attention chunk."""

    name = "q2c"
    needs_queries = True
    chunk: int = 256

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        layout = ctx.layout
        positions, weights = last_queries(layout.length, layout.question_len, ctx.keys.device)
        queries = ctx.queries[:, :, positions]
        sums = attention_probability_sums(
            queries, ctx.keys, positions, weights, layout.real_mask(ctx.keys.device), ctx.scaling, ctx.softcap,
            self.chunk,
        )
        return sums / (ctx.queries.shape[1] // ctx.num_kv_heads)
