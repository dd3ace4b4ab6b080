"""LagKV: a token matters if it stands out against the statistics of the chunk that follows it (query-free).

After the row's padding and sinks, the prompt is cut into chunks of ``lag`` tokens, c_0, c_1, ... For a token j
in chunk c_i with a following chunk c_{i+1}, per KV head and for X in {K, V}:

    x~_j     = (x_j - min_{t in c_{i+1}} x_t) / (max_{t in c_{i+1}} x_t - min_{t in c_{i+1}} x_t)   (per channel)
    s_X(j)   = softmax_{j' in c_i}( std_channels(x~_j') )[j]
    score(j) = s_K(j) + s_V(j)

The last whole chunk and the incomplete tail have no following chunk: they score ``+inf`` (kept first), as do all
tokens of a prompt shorter than two chunks. (Liang et al., 2025, "LagKV: Lag-Relative Information of the KV Cache
Tells Which Tokens Are Important"; kvpress ``LagKVPress``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreContext, Selector, register


def _lag_scores(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[H, c, lag, D]`` (c >= 2 whole chunks) -> ``[H, (c - 1) * lag]`` scores of the first c - 1 chunks."""
    ref = x[:, 1:]
    lo = ref.amin(dim=2, keepdim=True)
    hi = ref.amax(dim=2, keepdim=True)
    normed = (x[:, :-1] - lo) / (hi - lo).clamp(min=1e-6)
    return normed.std(dim=-1).softmax(dim=-1).flatten(1)


@register
@dataclass
class LagKV(Selector):
    """``lag``: chunk length (kvpress' ``lag_size``, 128 there)."""

    name = "lagkv"
    needs_queries = False
    lag: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.lag, bool) or not isinstance(self.lag, int) or self.lag < 2:
            raise ValueError(f"lagkv lag must be an int >= 2, got {self.lag!r}")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.values is None:
            raise ValueError("lagkv scores keys and values: the score context carries no values")
        keys, values = ctx.keys.float(), ctx.values.float()
        B, H, n, D = keys.shape
        out = torch.full((B, H, n), float("inf"), device=keys.device)
        start = ctx.layout.pad + ctx.layout.sinks
        for b in range(B):
            s = int(start[b])
            chunks = (n - s) // self.lag
            if chunks < 2:
                continue
            stop = s + chunks * self.lag
            k = keys[b, :, s:stop].reshape(H, chunks, self.lag, D)
            v = values[b, :, s:stop].reshape(H, chunks, self.lag, D)
            out[b, :, s : stop - self.lag] = _lag_scores(k) + _lag_scores(v)
        return out
