"""The selector contract and top-k selection under a budget.

A selector scores positions, higher kept, in two forms behind one class:

* :meth:`Selector.score` over a whole prompt (:class:`ScoreContext`: the prompt's keys, queries, values);
* :meth:`Selector.score_held` over the slots a cache holds during a chunked prefill (:class:`HeldContext`: the
  tokens earlier chunks kept plus the chunk in flight, at their logical positions), with :meth:`Selector.observe_held`
  for scorers that accumulate across chunks (h2o). A selector without a held form cannot prefill in chunks, and the
  cache says so before any work.

:func:`select` / :func:`select_slots` keep the highest-scoring candidates (see
:mod:`~kvcache_plugins.selection.layout` for which slots are candidates).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._checks import check_int
from .attention_scores import attention_probability_sums, last_queries
from .layout import PromptLayout




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


@dataclass
class HeldContext:
    """Everything a selector may use to score the slots a layer holds after a prefill chunk's attention.

    Held slots ``j`` (``T`` of them, in position order) are the tokens earlier chunks kept, then the chunk.

    Attributes:
        layer_idx: the layer.
        keys: ``[B, H_kv, T + probe, D]`` the keys the chunk's attention read: held slots, then the probe's.
        queries: ``[B, H_q, c + probe, D]`` the chunk's ``c`` queries, then the probe's.
        positions: ``LongTensor [B, H_s, T]`` logical position of every held slot (``H_s`` 1 or ``H_kv``).
        valid: ``Bool [B, T]`` held slots holding real tokens (not left padding).
        start: logical position of the chunk's first token.
        probe: question tokens appended to the chunk (Finch, :attr:`Selector.question_probe`): scored with, never
            stored; at logical positions ``total - probe .. total - 1``.
        total: length of the whole (padded) prompt.
        scaling, softcap, layout, seed: as in :class:`ScoreContext`.
        state: tensors ``[B, H_kv, T]`` aligned with the held slots that the selector keeps across chunks (h2o's
            accumulated attention); the cache cuts them with the slots.
    """

    layer_idx: int
    keys: torch.Tensor
    queries: torch.Tensor | None
    positions: torch.Tensor
    valid: torch.Tensor
    start: int
    probe: int
    total: int
    scaling: float
    softcap: float | None
    layout: PromptLayout
    seed: int = 0
    state: dict[str, torch.Tensor] | None = None

    @property
    def held(self) -> int:
        """``T``: held slots."""
        return self.positions.shape[-1]

    @property
    def chunk(self) -> int:
        """``c``: tokens of the chunk in flight."""
        return self.queries.shape[2] - self.probe

    @property
    def query_heads_per_kv(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def real_queries(self) -> torch.Tensor:
        """``Bool [B, c]``: the chunk's queries that are real tokens (not left padding)."""
        qpos = torch.arange(self.start, self.start + self.chunk, device=self.queries.device)
        return qpos.view(1, -1) >= self.layout.pad.to(self.queries.device).view(-1, 1)

    def attention(self, offsets: torch.Tensor, weight: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """``float32 [B, H_kv, T]``: ``sum_i w_i p(i, j)`` over the held slots (summed over the ``G`` query heads of
        each KV head) for the chunk's queries at ``offsets`` ``[m]`` (into the chunk) with weights ``[B, m]`` (see
        :func:`~kvcache_plugins.selection.attention_scores.attention_probability_sums`)."""
        return attention_probability_sums(
            self.queries[:, :, offsets], self.keys[:, :, : self.held], self.start + offsets, weight, self.valid,
            self.scaling, self.softcap, chunk, key_positions=self.positions,
        )

    def last_real_queries(self, span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offsets [m], weights [B, m])`` of the last ``min(span[b], real chunk tokens of row b)`` queries."""
        span = torch.minimum(self.real_queries().sum(-1), span.to(self.queries.device))
        return last_queries(self.chunk, span, self.queries.device)


class Selector(ABC):
    """Scores prompt positions; higher is kept. Subclasses set ``name`` and implement :meth:`score` (and, to
    prefill in chunks, :meth:`score_held`).

    ``needs_queries`` selectors require the cache to observe the model (``CompressedCache(model, ...)``).
    ``needs_question`` selectors score by the question's attention: the cache requires ``question_len``.
    ``question_probe`` selectors score every chunk of ``cache.prefill`` with the question appended (Finch).
    ``default_sinks`` is the number of leading tokens the cache protects when the user does not say.
    """

    name: ClassVar[str]
    needs_queries: ClassVar[bool] = True
    needs_question: ClassVar[bool] = False
    question_probe: ClassVar[bool] = False
    default_sinks: ClassVar[int] = 0

    @abstractmethod
    def score(self, ctx: ScoreContext) -> torch.Tensor:
        """Return ``float32 [B, H_kv or 1, n]`` scores; only context columns are used."""

    def score_held(self, held: HeldContext) -> torch.Tensor:
        """Return ``float32 [B, H_kv or 1, T]`` scores of the held slots; only candidate slots are used."""
        raise ValueError(
            f"selector {self.name!r} has no chunked form (score_held); prefill without prefill_chunk_size, or "
            f"choose one of {chunked_selector_names()}"
        )

    def observe_held(self, held: HeldContext) -> None:
        """Called after every chunk's attention, before any cut (accumulating scorers update ``held.state``)."""

    @classmethod
    def scores_held(cls) -> bool:
        """Whether this selector can score held slots (prefill in chunks)."""
        return cls.score_held is not Selector.score_held

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


def chunked_selector_names() -> list[str]:
    """The registered selectors with a chunked form."""
    return sorted(name for name, cls in _REGISTRY.items() if cls.scores_held())


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
