"""SnapKV: attention from an observation window at the end of the prompt, pooled along the sequence.

With the last ``window`` prompt positions W of a row (the question usually sits there) and G query heads per KV head:

    a(j)     = 1 / (|W| * G) * sum_{i in W} sum_{g} softmax_j(q_{i,g} . k_j * scaling)
    score(j) = mean_{|t - j| <= kernel // 2} a(t)        (1-D average pooling, kernel ``kernel``, stride 1)

so neighbours of an attended token are kept with it. The observation window itself is always kept, as in the
SnapKV paper and kvpress: its positions score ``2 + j / n`` (above any pooled probability, newest highest), so they
take the first places of the budget. (Before, the window was scored like any other context token and mostly
dropped.)

Chunked (:meth:`SnapKV.score_held`): the same formula with the chunk's last ``window`` real queries as the
observation window, pooled along the held slots in position order; the chunk's window scores above every pooled
value (so the last chunk's window, the prompt's, is always kept). An approximation (earlier chunks are judged by
their own window); with one chunk it is unchunked SnapKV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_scores import attention_probability_sums, last_queries
from .base import HeldContext, ScoreContext, Selector, register


@register
@dataclass
class SnapKV(Selector):
    """``window``: observation window (last prompt tokens); ``kernel``: odd average-pooling width."""

    name = "snapkv"
    needs_queries = True
    window: int = 32
    kernel: int = 5
    chunk: int = 256

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"snapkv window must be positive, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv kernel must be a positive odd number, got {self.kernel}")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        layout = ctx.layout
        span = layout.real_len.clamp(max=self.window)
        positions, weights = last_queries(layout.length, span, ctx.keys.device)
        sums = attention_probability_sums(
            ctx.queries[:, :, positions], ctx.keys, positions, weights, layout.real_mask(ctx.keys.device),
            ctx.scaling, ctx.softcap, self.chunk,
        )
        sums = sums / (ctx.queries.shape[1] // ctx.num_kv_heads)
        B, H, n = sums.shape
        if self.kernel > 1:
            sums = F.avg_pool1d(
                sums.view(B * H, 1, n), self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False
            ).view(B, H, n)
        in_window = (weights > 0).view(B, 1, -1)  # [B, 1, m] over the window positions
        window_scores = 2.0 + positions.float().view(1, 1, -1) / n
        sums[:, :, positions] = torch.where(in_window, window_scores, sums[:, :, positions])
        return sums

    def score_held(self, held: HeldContext) -> torch.Tensor:
        B, H, T = held.keys.shape[0], held.keys.shape[1], held.held
        offsets, weight = held.last_real_queries(torch.tensor(self.window))
        sums = held.attention(offsets, weight, self.chunk) / held.query_heads_per_kv
        if self.kernel > 1:
            sums = F.avg_pool1d(sums.view(B * H, 1, T), self.kernel, stride=1, padding=self.kernel // 2,
                                count_include_pad=False).view(B, H, T)
        span = (weight > 0).sum(-1)  # the window's real queries per row
        end = held.start + held.chunk
        in_window = (held.positions >= (end - span).view(B, 1, 1)) & (held.positions < end)
        return torch.where(in_window, 2.0 + held.positions.float() / held.total, sums)
