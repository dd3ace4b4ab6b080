"""The selector contract, the prompt layout every selector sees, and top-k selection under a budget.

Prompt layout (one row of a left-padded batch of length ``n``)::

    [ padding (pad_b) | sinks (s_b) | context | question (q_b) ]

Selection applies to the context span only; sinks and the question are always kept and padding never is.
A selector returns a score per (row, KV head, position); :func:`select` keeps the highest-scoring context positions.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._checks import check_int


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


@dataclass
class ScoreContext:
    """Everything a selector may use to score one layer's prompt positions.

    Attributes:
        layer_idx: the layer.
        keys: ``[B, H_kv, n, D]`` prompt keys as the model stored them (after k-norm and RoPE).
        queries: ``[B, H_q, n, D]`` prompt queries as the model used them (after q-norm and RoPE), or ``None``
            when the cache does not observe the model.
        scaling: the model's attention scaling (``1/sqrt(D)`` for most models).
        softcap: attention logit soft-capping (Gemma-2), or ``None``.
        layout: the prompt layout.
        seed: seed for randomized selectors (combined with the layer index where scores are per layer).
        values: ``[B, H_kv, n, D]`` prompt values, or ``None`` where the caller has none (value-aware scorers
            such as lagkv and expected_attention need them).
    """

    layer_idx: int
    keys: torch.Tensor
    queries: torch.Tensor | None
    scaling: float
    softcap: float | None
    layout: PromptLayout
    seed: int = 0
    values: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[1]


class Selector(ABC):
    """Scores prompt positions; higher is kept. Subclasses set ``name`` and implement :meth:`score`.

    ``needs_queries`` selectors require the cache to observe the model (``CompressedCache(model, ...)``).
    ``default_sinks`` is the number of leading tokens the cache protects when the user does not say.
    """

    name: ClassVar[str]
    needs_queries: ClassVar[bool] = True
    default_sinks: ClassVar[int] = 0

    @abstractmethod
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """Return ``float32 [B, H_kv or 1, n]`` scores; only context columns are used."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


_REGISTRY: dict[str, type[Selector]] = {}


def register(cls: type[Selector]) -> type[Selector]:
    """Class decorator: make a selector available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def selector_names() -> list[str]:
    return sorted(_REGISTRY)


def make_selector(selector: str | Selector, **options) -> Selector:
    """A selector instance from a name (with constructor options) or an instance (returned as is)."""
    if isinstance(selector, Selector):
        if options:
            raise ValueError("selector options are given to the selector's constructor, not alongside an instance")
        return selector
    if not isinstance(selector, str) or selector not in _REGISTRY:
        raise ValueError(f"unknown selector {selector!r}; choose one of {selector_names()} or pass a Selector instance")
    cls = _REGISTRY[selector]
    for key, value in options.items():
        default = getattr(cls, key, None)
        if isinstance(default, int) and not isinstance(default, bool):  # sizes: windows, kernels, chunks
            check_int(f"{selector} option {key}", value, 1)
    return cls(**options)


def context_budget(layout: PromptLayout, retention: float | None, max_tokens: int | None) -> torch.Tensor:
    """``LongTensor [B]``: context tokens each row keeps.

    ``retention`` r keeps ``ceil(r * |context|)``; ``max_tokens`` M keeps ``M - |sinks| - |question|`` (and never
    more than the context). With both, the smaller applies.
    """
    ctx = layout.context_len
    keep = ctx.clone()
    if retention is not None:
        keep = torch.minimum(keep, torch.ceil(ctx.double() * retention - 1e-9).long())
    if max_tokens is not None:
        protected = layout.sinks + layout.question_len
        if bool((protected > max_tokens).any()):
            worst = int(protected.max())
            raise ValueError(
                f"max_tokens={max_tokens} is smaller than the tokens that are always kept ({worst} = sinks + question "
                "span); raise max_tokens or shorten the protected spans"
            )
        keep = torch.minimum(keep, max_tokens - protected)
    return keep.clamp(min=0)


def select_slots(
    scores: torch.Tensor, candidates: torch.Tensor, protected: torch.Tensor, budget: torch.Tensor
) -> torch.Tensor:
    """Keep ``protected`` slots plus the ``budget[b]`` best-scoring ``candidates`` of each row (and head).

    Args:
        scores: ``[B, H_s, n]`` (``H_s`` = 1 for one slot set per row, ``H_kv`` for one per head).
        candidates: ``Bool [B, n]`` slots that may be kept if they score well.
        protected: ``Bool [B, n]`` slots always kept (disjoint from ``candidates``).
        budget: ``LongTensor [B]`` candidates to keep per row.

    Returns:
        ``LongTensor [B, H_s, S]`` with ``S = max_b(kept_b)``: each row's kept slot indices in increasing order,
        right-aligned, preceded by ``-1`` for the ``S - kept_b`` unused slots. Every head of a row keeps the same
        number of slots. Ties are broken towards earlier slots.
    """
    B, Hs, n = scores.shape
    device = scores.device
    cand = candidates.to(device).unsqueeze(1)
    masked = scores.float().masked_fill(~cand, float("-inf"))
    order = masked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=device).expand(B, Hs, n))
    keep = ((rank < budget.to(device).view(B, 1, 1)) & cand) | protected.to(device).unsqueeze(1)
    kept = keep.sum(-1)
    S = int(kept.max()) if kept.numel() else 0
    key = torch.where(keep, torch.arange(n, device=device), torch.full((), -1, device=device))
    return key.sort(dim=-1).values[..., n - S :]


def select(scores: torch.Tensor, layout: PromptLayout, budget: torch.Tensor) -> torch.Tensor:
    """Kept prompt positions: the ``budget[b]`` best context positions of each row plus its sinks and question.

    ``scores`` is ``[B, H_s, n]``; the result is ``LongTensor [B, H_s, S]`` as described in :func:`select_slots`.
    """
    device = scores.device
    return select_slots(scores, layout.context_mask(device), layout.protected_mask(device), budget)


def ceil_retention_count(context: int, retention: float) -> int:
    """``ceil(r * context)``, robust to float noise (0.3 * 10 keeps 3, not 4)."""
    return min(context, math.ceil(context * retention - 1e-9))
