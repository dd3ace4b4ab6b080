"""LagKV: a token matters if it stands out against the statistics of the chunk that follows it (query-free).

After the row's padding and sinks, the prompt is cut into chunks of ``lag`` tokens, c_0, c_1, ... For a token j
in chunk c_i with a following chunk c_{i+1}, per KV head and for X in {K, V}:

    x~_j     = (x_j - min_{t in c_{i+1}} x_t) / (max_{t in c_{i+1}} x_t - min_{t in c_{i+1}} x_t)   (per channel)
    s_X(j)   = softmax_{j' in c_i}( std_channels(x~_j') )[j]
    s(j)     = (s_K(j) + s_V(j)) / 2
    score(j) = rank of s(j) within c_i / lag        (in [0, 1): every chunk keeps the same share, as in the paper)

or ``score(j) = s(j)`` with ``cross_chunk=True`` (scores compared across chunks; kvpress' ``cross_scoring``). The
last whole chunk and the incomplete tail have no following chunk: they score ``2 + j / n`` (kept first, newest
highest); so does every token of a prompt shorter than two chunks, which makes it recency there, as kvpress does.
The cache protects 4 sink tokens by default with this selector (kvpress' ``n_sink``). (Liang et al., 2025, "LagKV:
Lag-Relative Information of the KV Cache Tells Which Tokens Are Important"; kvpress ``LagKVPress``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreContext, Selector, register


def _lag_scores(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[H, c, lag, D]`` (c >= 2 whole chunks) -> ``[H, c - 1, lag]``: ``s_X`` of the first c - 1 chunks."""
    ref = x[:, 1:]
    lo = ref.amin(dim=2, keepdim=True)
    hi = ref.amax(dim=2, keepdim=True)
    normed = (x[:, :-1] - lo) / (hi - lo).clamp(min=1e-6)
    return normed.std(dim=-1).softmax(dim=-1)


@register
@dataclass
class LagKV(Selector):
    """``lag``: chunk length (kvpress' ``lag_size``); ``cross_chunk``: compare raw scores across chunks."""

    name = "lagkv"
    needs_queries = False
    default_sinks = 4
    lag: int = 128
    cross_chunk: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.lag, bool) or not isinstance(self.lag, int) or self.lag < 2:
            raise ValueError(f"lagkv lag must be an int >= 2, got {self.lag!r}")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.values is None:
            raise ValueError("lagkv scores keys and values: the score context carries no values")
        keys, values = ctx.keys.float(), ctx.values.float()
        B, H, n, D = keys.shape
        out = (2.0 + torch.arange(n, device=keys.device) / n).expand(B, H, n).clone()
        start = ctx.layout.pad + ctx.layout.sinks
        for b in range(B):
            s = int(start[b])
            chunks = (n - s) // self.lag
            if chunks < 2:
                continue
            stop = s + chunks * self.lag
            k = keys[b, :, s:stop].reshape(H, chunks, self.lag, D)
            v = values[b, :, s:stop].reshape(H, chunks, self.lag, D)
            scores = (_lag_scores(k) + _lag_scores(v)) / 2  # [H, chunks - 1, lag]
            if not self.cross_chunk:
                scores = scores.argsort(dim=-1, stable=True).argsort(dim=-1).float() / self.lag
            out[b, :, s : stop - self.lag] = scores.flatten(1)
        return out
