"""Q2C (question-to-context): how much the question attends to each context token.

For layer l and KV head h, with the question positions Q of a row and the G query heads sharing h:

    score(j) = 1 / (|Q| * G) * sum_{i in Q} sum_{g} softmax_j(q_{i,g} . k_j * scaling)

The softmax runs over every key query i can see (causal, padding excluded); only context columns are used.

Chunked (:meth:`Q2C.score_held`): under ``cache.prefill`` the question is appended to every chunk at its true
positions (Finch, Corallo & Papotti, 2024) and its queries score the held slots (softmax over the held slots and the
question's own keys); under ``generate(prefill_chunk_size=...)`` the question comes last, so each chunk's last
``question_len`` queries stand in for it (the final chunk, holding the question, scores with the real one). With one
chunk it is unchunked Q2C.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_scores import attention_probability_sums, last_queries
from .base import HeldContext, ScoreContext, Selector, register


@register
@dataclass
class Q2C(Selector):
    """Question-to-context attention. ``chunk``: question queries per attention chunk."""

    name = "q2c"
    needs_queries = True
    needs_question = True
    question_probe = True
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

    def score_held(self, held: HeldContext) -> torch.Tensor:
        B, T, probe = held.keys.shape[0], held.held, held.probe
        device = held.keys.device
        if probe:  # Finch: the question's queries at their true positions, over the held slots and the question
            qpos = torch.arange(held.total - probe, held.total, device=device)
            key_pos = torch.cat([held.positions, qpos.view(1, 1, probe).expand(B, held.positions.shape[1], probe)], -1)
            key_valid = torch.cat([held.valid, held.valid.new_ones(B, probe)], dim=-1)
            weight = torch.full((B, probe), 1.0 / probe, device=device)
            sums = attention_probability_sums(
                held.queries[:, :, held.chunk :], held.keys, qpos, weight, key_valid, held.scaling, held.softcap,
                self.chunk, key_positions=key_pos,
            )
            return sums[..., :T] / held.query_heads_per_kv
        offsets, weight = held.last_real_queries(held.layout.question_len)
        return held.attention(offsets, weight, self.chunk) / held.query_heads_per_kv
