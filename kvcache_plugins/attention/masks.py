"""The attention mask of a layer that holds slots (kept tokens at logical positions, unused slots, ragged heads).

The model builds one mask for all full-attention layers, sized for the first one, while each layer may hold its own
slot count (pyramid / adakv budgets, per-row kept counts). So the stored slots' columns come from the layer's own
slot mask (every valid stored slot is a real past token the queries may see) and only the new tokens' columns from
the model's mask.
"""

from __future__ import annotations

import torch


def slot_mask(
    attention_mask: torch.Tensor | None, valid: torch.Tensor, q: int, kv: int, heads: int, device: torch.device
) -> torch.Tensor:
    """``[B, 1 or H_q, q, kv]`` mask over ``[stored slots, q new tokens]``.

    Args:
        attention_mask: the model's mask ``[B, 1 or H, q, >= q]`` (boolean, or additive in its dtype) or ``None``.
        valid: ``Bool [B, S']`` (one slot set per row) or ``[B, H_kv, S']`` (per head; each query head follows its
            KV head) over at least the ``kv - q`` stored slots.
        q, kv: new tokens and keys of the attention call; heads: query heads.
    """
    if valid.dim() == 2:
        valid = valid.unsqueeze(1)
    else:
        valid = valid.repeat_interleave(heads // valid.shape[1], dim=1)
    B, Hc = valid.shape[:2]
    S = kv - q
    past = valid[..., :S].unsqueeze(2).expand(B, Hc, q, S)
    if attention_mask is None:
        new = torch.ones(q, q, dtype=torch.bool, device=device).tril().expand(B, Hc, q, q)
    else:
        new = attention_mask[..., attention_mask.shape[-1] - q :]
        H = max(Hc, new.shape[1])
        past, new = past.expand(B, H, q, S), new.expand(B, H, q, q)
        if attention_mask.dtype != torch.bool:
            hidden = torch.full((), torch.finfo(attention_mask.dtype).min, dtype=attention_mask.dtype)
            past = torch.zeros((), dtype=attention_mask.dtype).to(device).where(past, hidden.to(device))
    return torch.cat([past, new], dim=-1)
