"""Attention probabilities of chosen prompt queries over the prompt keys, computed in query chunks.

For a query at position ``i`` and key ``j`` of KV head ``h`` (query heads ``h*G .. h*G+G-1`` share it):

    logit(i, j) = q_i . k_j * scaling          (then softcap * tanh(logit / softcap) if the model soft-caps)
    p(i, j)     = softmax_j over the keys query i can see: pos(j) <= pos(i) and j a real token

The keys are the prompt (``pos(j) = j``) or the held slots of a cache (kept tokens at their logical positions,
then a prefill chunk), the same rule for unchunked and chunked scoring.

Probabilities are computed in fp32, ``chunk`` queries at a time, so the working memory is
``O(B * H_q * chunk * n)`` rather than ``O(n^2)``.
"""

from __future__ import annotations

import torch


def attention_probability_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    query_weight: torch.Tensor,
    real: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    chunk: int = 256,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i w_i * p(i, j)`` per KV head, summed over the query heads that share it.

    Args:
        queries: ``[B, H_q, m, D]`` the chosen queries.
        keys: ``[B, H_kv, n, D]``.
        query_positions: ``LongTensor [m]`` logical position of each chosen query (same for every row).
        query_weight: ``[B, m]`` weight of each query per row (0 drops it).
        real: ``Bool [B, n]`` keys that are real tokens (not padding, not unused slots).
        scaling, softcap: as the model applies them.
        chunk: queries per chunk.
        key_positions: ``LongTensor [B, H_s, n]`` logical position of each key (``H_s`` 1 or ``H_kv``), for keys
            that are held slots of a cache (kept tokens of earlier chunks, then a chunk); default ``j`` (the keys
            are the prompt itself). Query ``i`` sees key ``j`` when ``key_positions[j] <= query_positions[i]``.

    Returns:
        ``float32 [B, H_kv, n]``.
    """
    B, Hq, m, D = queries.shape
    Hkv, n = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    k_t = keys.float().transpose(-1, -2)  # [B, H_kv, D, n]; matmul reads the strided view directly
    out = torch.zeros(B, Hkv, n, dtype=torch.float32, device=keys.device)
    if key_positions is None:
        key_pos = torch.arange(n, device=keys.device).view(1, 1, 1, 1, n)
    else:
        key_pos = key_positions.to(keys.device).view(B, key_positions.shape[1], 1, 1, n)
    blocked = ~real.to(keys.device).view(B, 1, 1, 1, n)
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        c = stop - start
        # query heads of one KV head are adjacent: [B, H_kv, G * c, D] @ [B, H_kv, D, n]
        q = queries[:, :, start:stop].float().reshape(B, Hkv, G, c, D).reshape(B, Hkv, G * c, D)
        logits = torch.matmul(q, k_t).mul_(scaling).view(B, Hkv, G, c, n)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        hidden = (key_pos > query_positions[start:stop].to(keys.device).view(1, 1, 1, c, 1)) | blocked
        logits.masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        w = query_weight[:, start:stop].float().to(keys.device).view(B, 1, 1, c, 1)
        out += (probs * w).nan_to_num_(0.0).sum(dim=(2, 3))
    return out


def last_queries(layout_length: int, span: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and per-row weights of the last ``span[b]`` prompt positions of each row.

    Returns ``(positions [m], weights [B, m])`` with ``m = max(span)``; weights are 1 inside each row's span and 0
    outside, normalised to sum to 1 per row (rows with an empty span get zero weights).
    """
    m = int(span.max()) if span.numel() else 0
    positions = torch.arange(layout_length - m, layout_length, device=device)
    offset = torch.arange(m, device=device).view(1, m)
    inside = offset >= (m - span.to(device)).view(-1, 1)
    weights = inside.float()
    return positions, weights / weights.sum(-1, keepdim=True).clamp(min=1.0)
