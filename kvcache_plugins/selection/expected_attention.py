"""Expected attention: the attention a key can expect from future queries, times the norm of its value.

Future queries of query head g are modelled as Gaussian, q ~ N(mu_g, Sigma_g), with the mean and covariance of the
queries at the last ``window`` real prompt positions W (after RoPE, as the model used them). For a Gaussian q,
``log E[exp(s * q . k)] = s * mu . k + s^2 / 2 * k^T Sigma k``, so with s the model's scaling:

    z_g(j)   = s * mu_g . k_j + s^2 / 2 * k_j^T Sigma_g k_j
    a(j)     = 1 / G * sum_{g} softmax_j(z_g(j))             (over the row's real keys; G query heads per KV head)
    score(j) = (a(j) + epsilon) * ||v_j||_2

(Devoto et al., 2025, "Expected Attention"; kvpress ``ExpectedAttentionPress``.) Difference from kvpress: it
takes the statistics before RoPE and rotates them to the next positions (averaging the rotation); here the
queries after RoPE at the last positions stand for the next ones, which needs no knowledge of the model's rotary
embedding and agrees where dimensions rotate slowly over the horizon. Soft-capping is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_scores import last_queries
from .base import ScoreContext, Selector, register


@register
@dataclass
class ExpectedAttention(Selector):
    """``window``: recent prompt queries the statistics come from; ``covariance``: include the variance term;
    ``epsilon``: added to the expected attention before weighting by the value norm."""

    name = "expected_attention"
    needs_queries = True
    window: int = 64
    covariance: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"expected_attention window must be a positive int, got {self.window!r}")

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        if ctx.values is None:
            raise ValueError("expected_attention weights by value norms: the score context carries no values")
        layout = ctx.layout
        keys = ctx.keys.float()
        device = keys.device
        B, H, n, D = keys.shape
        G = ctx.queries.shape[1] // H
        positions, weights = last_queries(layout.length, layout.real_len.clamp(max=self.window), device)
        q = ctx.queries[:, :, positions].float().view(B, H, G, -1, D)  # [B, H, G, m, D]
        w = weights.view(B, 1, 1, -1, 1)
        mu = (q * w).sum(3)  # [B, H, G, D]
        z = torch.einsum("bhgd,bhnd->bhgn", mu, keys) * ctx.scaling
        if self.covariance:
            centred = (q - mu.unsqueeze(3)) * w.sqrt()
            sigma = centred.transpose(-1, -2) @ centred  # [B, H, G, D, D]
            z = z + 0.5 * ctx.scaling**2 * torch.einsum("bhnd,bhgde,bhne->bhgn", keys, sigma, keys)
        z = z.masked_fill(~layout.real_mask(device).view(B, 1, 1, n), float("-inf"))
        attention = z.softmax(-1).mean(2)
        return (attention + self.epsilon) * ctx.values.float().norm(dim=-1)
