"""Eviction during generation: which stored slots a layer keeps once it holds ``max_tokens + evict_every``.

Sinks, the question span and the newest ``recent`` slots stay (:func:`~kvcache_plugins.selection.layout.slot_roles`);
of the other slots, each row keeps the ``max_tokens - |protected|`` best by the policy's score:

``"h2o"``       ``acc[b, h, s]``: attention the slot received from the queries since the prompt (summed over the
                query heads of its KV head; averaged over the KV heads unless the granularity is ``"head"``);
``"streaming"`` the slot's position (the oldest go first).
"""

from __future__ import annotations

import torch

from .attention_scores import attention_probability_sums
from .base import select_slots
from .layout import PromptLayout, slot_roles

DECODE_POLICIES = ("h2o", "streaming")


def decode_keep(
    policy: str, per_head: bool, positions: torch.Tensor, acc: torch.Tensor | None, layout: PromptLayout,
    max_tokens: int, recent: int,
) -> torch.Tensor:
    """``LongTensor [B, H_s, K]``: the slots to keep (``-1`` unused), for ``positions`` ``[B, H_s, S]`` and the
    accumulated attention ``acc`` ``float32 [B, H, S]`` (``h2o``). Every head of a row holds the same number of
    slots with sinks first, question and decoded tokens last, so the roles are read off the first head."""
    protected, candidates = slot_roles(positions[:, 0, :], layout, recent)
    budget = (max_tokens - protected.sum(-1)).clamp(min=0)
    if policy == "h2o":
        scores = acc if per_head else acc.mean(1, keepdim=True)
    else:
        scores = positions.float() if per_head else positions[:, :1, :].float()
    return select_slots(scores, candidates, protected, budget)


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None, scaling: float, softcap: float | None
) -> torch.Tensor:
    """``float32 [B, H_kv, S]``: attention the step's queries ``[B, H_q, q, D]`` (the newest ``q`` of the ``S``
    keys ``[B, H_kv, S, D]``) paid to every key, summed over queries and the query heads of each KV head; ``valid``
    ``Bool [B, S]`` masks unused slots."""
    B, _, q, _ = query.shape
    S = key.shape[2]
    real = torch.ones(B, S, dtype=torch.bool, device=key.device) if valid is None else valid
    positions = torch.arange(S - q, S, device=key.device)
    return attention_probability_sums(query, key, positions, torch.ones(B, q, device=key.device), real, scaling, softcap)
