"""Where padding, sinks, context and question sit in a prompt, and which held slots are protected or candidates.

One row of a left-padded batch of length ``n``::

    [ padding (pad_b) | sinks (s_b) | context | question (q_b) ]

Selection applies to the context span only; sinks and the question are always kept and padding never is. Every
cut of a cache (the prompt's selection, each chunk of a chunked prefill, eviction during generation) classifies the
slots it holds with :func:`slot_roles`, so the rule is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass

import torch


@dataclass
class PromptLayout:
    """Where padding, sinks, context and question sit in each row of a prompt of ``length`` tokens.

    Attributes:
        length: padded prompt length ``n``.
        pad: ``LongTensor [B]`` left-padding tokens per row.
        question_len: ``LongTensor [B]`` question tokens at the end of each row.
        sinks: ``LongTensor [B]`` leading (after padding) tokens always kept.
    """

    length: int
    pad: torch.Tensor
    question_len: torch.Tensor
    sinks: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.pad.shape[0])

    @property
    def real_len(self) -> torch.Tensor:
        return self.length - self.pad

    @property
    def context_len(self) -> torch.Tensor:
        """``LongTensor [B]``: tokens eligible for eviction per row."""
        return (self.real_len - self.sinks - self.question_len).clamp(min=0)

    def positions(self, device: torch.device | None = None) -> torch.Tensor:
        return torch.arange(self.length, device=device).unsqueeze(0)

    def real_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """``Bool [B, n]``: not padding."""
        return self.positions(device) >= self.pad.to(device).unsqueeze(1)

    def context_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """``Bool [B, n]``: the context span (after padding and sinks, before the question)."""
        pos = self.positions(device)
        start = (self.pad + self.sinks).to(device).unsqueeze(1)
        end = (self.length - self.question_len).to(device).unsqueeze(1)
        return (pos >= start) & (pos < end)

    def protected_mask(self, device: torch.device | None = None) -> torch.Tensor:
        """``Bool [B, n]``: sinks and question, always kept."""
        return self.real_mask(device) & ~self.context_mask(device)

    def to(self, device: torch.device) -> PromptLayout:
        return PromptLayout(self.length, self.pad.to(device), self.question_len.to(device), self.sinks.to(device))



def left_padding(mask: torch.Tensor | None, batch: int, n: int) -> torch.Tensor:
    """``LongTensor [batch]`` (on the CPU): left-padding tokens per row of an ``n``-token prompt.

    ``mask`` is ``generate``'s ``[B, n]`` 0/1 attention mask, or the model's 4-D mask ``[B, 1, q, kv]`` (boolean, or
    additive with the dtype's minimum for hidden keys; its last query sees every real key of the last ``n``
    columns), or ``None`` (no padding).
    """
    if mask is None:
        return torch.zeros(batch, dtype=torch.long)
    if mask.dim() == 2:
        if mask.shape[-1] != n:
            raise ValueError(f"attention_mask has {mask.shape[-1]} columns; the prompt has {n} tokens")
        visible = mask != 0
    else:
        last = mask[:, 0, -1, -n:]
        visible = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return (n - visible.sum(-1)).long().expand(batch).cpu()


def per_row(
    value: int | Sequence[int] | torch.Tensor, batch: int, name: str, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """``LongTensor [batch]``: one entry per row of the batch.

    A single int applies to every row; a sequence needs one entry per row. The one exception is generate()'s
    ``num_beams``/``num_return_sequences``, which repeats every prompt row ``k`` times before the prefill: a sequence
    of ``batch / k`` entries is repeated likewise, but only when ``rows`` (any tensor with the batch first, e.g. the
    prompt's keys) shows that each group of ``k`` consecutive rows really is one prompt repeated.
    """
    if isinstance(value, int) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return torch.full((batch,), int(value), dtype=torch.long)
    t = torch.as_tensor(value, dtype=torch.long).flatten()
    if t.numel() == batch:
        return t
    n = t.numel()
    if n and batch % n == 0 and rows is not None and rows.shape[0] == batch:
        k = batch // n
        groups = rows.reshape(n, k, -1)
        if bool((groups == groups[:, :1]).all()):
            return t.repeat_interleave(k)
    raise ValueError(
        f"{name} has {n} {'row' if n == 1 else 'rows'} but the batch has {batch}: give one entry per row of the batch "
        "(or one int for all rows)"
    )


def slot_roles(
    positions: torch.Tensor, layout: PromptLayout, recent: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(protected, candidates)``, ``Bool [B, S]`` each, for held slots at logical ``positions`` ``[B, S]``.

    A slot is valid when it holds a real token (``positions >= pad``: not ``-1``, not left padding). Valid slots
    are protected when they are a sink (``pad <= p < pad + sinks``), in the question span
    (``n - q <= p < n``) or among the newest ``recent`` slots; the other valid slots are candidates.
    """
    B, S = positions.shape
    layout = layout.to(positions.device)
    pad = layout.pad.view(B, 1)
    valid = positions >= pad
    sink = positions < pad + layout.sinks.view(B, 1)
    question = (positions >= layout.length - layout.question_len.view(B, 1)) & (positions < layout.length)
    protected = sink | question
    if recent:
        protected = protected | (torch.arange(S, device=positions.device).view(1, S) >= S - recent)
    protected = protected & valid
    return protected, valid & ~protected


def prompt_layout(
    batch: int, n: int, pad: torch.Tensor, question_len: int | Sequence[int], sink_tokens: int,
    rows: torch.Tensor | None = None, decode: tuple[int, int] | None = None,
) -> PromptLayout:
    """The layout of a ``batch x n`` prompt with left padding ``pad`` ``[B]``, checked: every row's question span
    plus sinks fits its real tokens, and (``decode = (recent_tokens, max_tokens)``, a decode budget) the tokens
    generation always keeps fit ``max_tokens``. ``rows``: see :func:`per_row`."""
    qlen = per_row(question_len, batch, "question_len", rows)
    sinks = torch.full((batch,), sink_tokens, dtype=torch.long)
    layout = PromptLayout(n, pad.cpu().long(), qlen, sinks)
    too_long = (qlen + sinks) > layout.real_len
    if bool(too_long.any()):
        b = int(too_long.nonzero()[0])
        raise ValueError(
            f"row {b}: question span ({int(qlen[b])} tokens) plus sinks ({sink_tokens}) is longer than the "
            f"prompt ({int(layout.real_len[b])} tokens)"
        )
    if decode is not None:
        recent, max_tokens = decode
        protected = int((qlen + sinks).max()) + recent
        if protected > max_tokens:
            raise ValueError(
                f"max_tokens={max_tokens} cannot hold the tokens generation always keeps: sinks + question + "
                f"recent_tokens = {protected}"
            )
    return layout


def question_length(tokenizer: Any, prompt: str | Sequence[int], question: str) -> int:
    """Tokens from the last occurrence of ``question`` in ``prompt`` to the end of the prompt.

    Use it as ``question_len`` when something follows the question (a chat template's assistant header): the whole
    tail stays protected. Raises ``ValueError`` if the question's tokens do not occur in the prompt's tokens.
    """
    ids = list(prompt) if not isinstance(prompt, str) else tokenizer(prompt).input_ids
    q = tokenizer(question, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(q), -1, -1):
        if ids[start : start + len(q)] == q:
            return len(ids) - start
    raise ValueError(
        "the question's tokens do not occur in the prompt's tokens (tokenization at its boundary may differ); "
        "count question_len yourself"
    )

