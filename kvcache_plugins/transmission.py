"""The transmission protocol: the context is stored compressed before the question is read.

The lab's scenario is KV transmission: a document is encoded once, its cache compressed and sent, and a question is
read against the compressed cache. A cache handed to ``generate`` with the whole prompt does something milder: the
prompt's forward pass attends to its own keys and values as computed, so the question (and the first answer token,
which that pass predicts) never sees the compression. :func:`prefill_context` runs the protocol for any cache that
compresses what it stores (quantized, low-rank, or a plain ``DynamicCache`` as the lossless control):

1. the context, everything before each row's question span, goes through the model into the cache (its tokens
   attend to each other exactly, as the sender encodes them), and the cache stores it as it stores anything;
2. ``generate(input_ids, ...)`` (or a forward over ``input_ids[:, cache.get_seq_length():]``) then reads the question
   against the stored context, so the question and every answer token attend to the compressed context.

For one row of ``n`` prompt tokens with question length ``q``: tokens ``[0, n - q)`` are prefilled, tokens
``[n - q, n)`` are left to ``generate``. Positions follow ``generate``'s rule (``cumsum(attention_mask) - 1``), so
``generate`` continues exactly. A batch whose rows share one question length (left padding allowed) is exactly the
rows run one by one. When question lengths differ, the prompt is prefilled in column chunks ending at each row's
boundary ``n - q_b``, so every row's question and answer still attend only to its stored context; the price is that
a row's context may span several chunks (its later context tokens are encoded against its stored earlier ones, as
if the document had been sent in pieces) and a longer question is read in pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._compat import cache_kwargs


def _question_lengths(question_len: Any, batch: int, n: int) -> list[int]:
    if question_len is None:
        raise ValueError(
            "the transmission protocol stores the context before the question is read: it needs question_len "
            "(question tokens at the end of each prompt, an int or one per row)"
        )
    if isinstance(question_len, bool):
        raise TypeError(f"question_len must be an int or a sequence of ints, got {question_len!r}")
    values = torch.as_tensor(question_len).flatten().tolist() if not isinstance(question_len, int) else [question_len]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise TypeError(f"question_len must be an int or a sequence of ints, got {question_len!r}")
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"question_len has {len(values)} entries but the batch has {batch} rows")
    if any(q < 1 or q >= n for q in values):
        raise ValueError(
            f"question_len must be in [1, {n - 1}] for prompts of {n} tokens (at least one question token is read "
            f"against the stored context, at least one context token is stored), got {values}"
        )
    return values


@torch.inference_mode()
def prefill_context(
    model: Any,
    cache: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    question_len: int | Sequence[int] | torch.Tensor | None = None,
):
    """Store each row's context (all but its last ``question_len`` tokens) in ``cache``; return the cache.

    Args:
        model: the causal LM the cache serves.
        cache: an empty cache (``MixedPrecisionCache``, a low-rank cache, ``DynamicCache``, ...).
        input_ids: ``LongTensor [B, n]`` the whole prompts, left-padded.
        attention_mask: ``[B, n]`` (1 = real token); ``None`` for an unpadded batch.
        question_len: question tokens at the end of each row: an int or one per row, each in ``[1, n - 1]``.

    Afterwards ``model.generate(input_ids, attention_mask=attention_mask, cache=cache, ...)`` reads the remaining
    prompt tokens (the questions) against the stored context and continues. Raises ``ValueError`` for a missing or
    out-of-range ``question_len`` or a cache that already holds tokens, before any forward pass.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise TypeError("input_ids must be a [batch, tokens] LongTensor")
    B, n = input_ids.shape
    questions = _question_lengths(question_len, B, n)
    if cache.get_seq_length() > 0:
        raise ValueError("prefill_context fills an empty cache; this one already holds tokens")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    bounds = sorted({n - q for q in questions})  # chunk ends: every row's context ends at one of them
    start = 0
    for end in bounds:
        model(
            input_ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
            use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache),
        )
        start = end
    return cache
