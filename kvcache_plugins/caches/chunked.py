"""Chunked prefill for :class:`~kvcache_plugins.CompressedCache`: read a prompt longer than memory.

The cache owns one :class:`ChunkedPrefill` while a prefill is in chunks.

Two ways in, both with peak KV memory of about the budget plus one chunk per layer:

* ``model.generate(ids, cache=cache, prefill_chunk_size=N)``. Building the cache with the model wraps that model's
  ``generate`` prefill step (transformers' ``_prefill``) so the cache learns the whole prompt (its length and, from
  the attention mask, its left padding) before the first chunk. Every forward of that prefill is then a prompt chunk.
* ``cache.prefill(model, input_ids, attention_mask=None, chunk_size=N)``, then ``model.generate(input_ids,
  attention_mask=..., cache=cache)``: runs all prompt tokens but the last (``generate`` processes that one, as after
  ``ScoutMaskedCache.sparse_prefill``). For ``q2c`` it follows Finch (Corallo & Papotti, 2024): the question is
  appended to every context chunk at its true positions, its queries score the held tokens, then its keys and
  values are dropped; after the last chunk the question (minus its last token) is stored normally.

The budget and the question span refer to the whole prompt: a row keeps its sinks, its question (the last
``question_len`` tokens of the whole prompt) and ``budget = ceil(r * |context|)`` context tokens (or what
``max_tokens`` allows). After each chunk's attention, a layer holding more than ``budget`` context tokens (its kept
tokens plus the chunk) is cut back to ``budget``; earlier, nothing is evicted. So the final state has exactly the
unchunked cache's counts. Every chunk attends to the kept past and to itself; kept keys keep their RoPE rotation and
positions stay logical, as for eviction during generation.

No chunked prefill reproduces an unchunked prefill's *states*: each chunk attends only to what earlier chunks kept
(that is what bounds the memory), so the result equals a full prefill in which every token is hidden from the
positions evicted before its chunk (the masking oracle the tests use). What a chunk's compression scores, for the
held slots ``j`` (kept tokens and the chunk) with the chunk's queries ``i`` (``G`` query heads per KV head, softmax
over the held keys query ``i`` can see):

What a chunk's cut scores is each selector's own held form (:meth:`~kvcache_plugins.selection.Selector.score_held`,
in the selector's file, with its exactness stated there): position-only scores (``random``, ``streaming``) are exact;
``knorm`` and ``keydiff`` apply their rule to the held keys; ``snapkv``, ``h2o``, ``tova`` and ``q2c`` under
``generate`` approximate with the chunk's queries; ``q2c`` under ``cache.prefill`` follows Finch. How many slots each
layer and head keeps comes from the cache's selection plan (:mod:`kvcache_plugins.selection.plan`), the same as
unchunked: ``pyramid`` budgets per layer; ``adakv`` keeps the uniform per-head budget at every chunk but the last,
whose cut allocates the layer's budget across heads (ragged), so every layer keeps its unchunked count.

``granularity="global"`` averages the scores over heads and layers and compresses all layers at the last one;
``"head"`` keeps positions per KV head. With ``quant``, kept tokens are stored quantized as soon as they arrive, so
later chunks attend to the quantized kept past.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from .._compat import cache_kwargs
from ..selection import HeldContext, PromptLayout, SelectionPlan, Selector, slot_roles

_HOOKED = "_kvcache_plugins_prefill_hook"


# ---------------------------------------------------------------------------------------------- generate() hook
def _prefill_hook(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
    """``generate``'s prefill step: tells a chunk-aware cache the whole prompt first (see the module docstring)."""
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    begin = getattr(cache, "begin_chunked_prefill", None)
    started = bool(begin) and begin(
        input_ids, model_kwargs.get("attention_mask"), getattr(generation_config, "prefill_chunk_size", None)
    )
    try:
        return type(self)._prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs)
    finally:
        if started:
            cache.end_chunked_prefill()


def install_prefill_hook(model: Any) -> None:
    """Route ``model.generate``'s prefill through :func:`_prefill_hook` (idempotent; models without ``_prefill``,
    i.e. other transformers lines, are left alone). A bound method, so ``copy.deepcopy(model)`` rebinds it."""
    if getattr(model, _HOOKED, False) or not callable(getattr(type(model), "_prefill", None)):
        return
    model._prefill = types.MethodType(_prefill_hook, model)
    setattr(model, _HOOKED, True)


# ------------------------------------------------------------------------------------------------ one prefill
class ChunkedPrefill:
    """One chunked prefill in progress: stores each chunk and cuts the held slots back to the plan's budget.

    Args:
        layers: the cache's layer list; compressed: indices of its compressed layers.
        plan: the cache's :class:`~kvcache_plugins.selection.SelectionPlan` (started for this prompt).
        selector: scores the held slots (``None`` when the plan gives the positions, e.g. a scout's).
        layout: the whole prompt's layout; seed: the selector's seed.
        end: logical length the chunks cover (the prompt, or all of it but what ``generate`` processes after).
    """

    def __init__(
        self, layers: list[Any], compressed: list[int], plan: SelectionPlan, selector: Selector | None,
        layout: PromptLayout, seed: int, end: int,
    ) -> None:
        self.layers, self.compressed, self.plan, self.selector = layers, compressed, plan, selector
        self.layout, self.seed, self.end = layout, seed, end
        #: question tokens appended to the chunk in flight (Finch): scored with, never stored
        self.probe = 0
        #: per layer: the selector's tensors aligned with the held slots (cut with them)
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def begin(
        cls, layers: list[Any], compressed: list[int], plan: SelectionPlan, selector: Selector | None,
        layout: PromptLayout, seed: int, finch: bool | None, retention: float | None, max_tokens: int | None,
    ) -> ChunkedPrefill:
        """Start the plan's budgets for ``layout`` and the prefill. ``finch=None``: ``generate``'s chunks cover the
        whole prompt; ``True`` / ``False``: ``cache.prefill``'s stop before the question (appended to each chunk as
        a probe) / before the last token (which ``generate`` processes; with ``question_len=0`` it is a context
        token, so one context slot is reserved)."""
        q, n = layout.question_len, layout.length
        if finch and (bool((q != q[0]).any()) or int(q[0]) < 1):
            raise ValueError(
                f"Finch-style q2c prefill appends one question block to every chunk: all rows need the same "
                f"question_len >= 1, got {q.tolist()}"
            )
        plan.start(layout, retention, max_tokens, (q == 0).long() if finch is False else None)
        end = n if finch is None else (n - int(q[0]) if finch else n - 1)
        return cls(layers, compressed, plan, selector, layout, seed, end)

    def update(self, layer: Any, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store a chunk (never the question probe) and return what the chunk's attention sees."""
        c = key_states.shape[-2] - self.probe
        keys, values = layer.update(key_states[..., :c, :], value_states[..., :c, :], *args, **kwargs)
        if self.probe:
            keys = torch.cat([keys, key_states[..., c:, :]], dim=-2)
            values = torch.cat([values, value_states[..., c:, :]], dim=-2)
        return keys, values

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float, softcap) -> None:
        """After a chunk's attention in ``layer_idx``: score the held slots, cut back to the budget."""
        layer = self.layers[layer_idx]
        if layer.pending is not None:
            layer.keep_all()  # the first chunk: its tokens become slots 0..c-1
        pos = layer.positions.long()  # [B, H_s, T]
        first = pos[:, 0, :]
        protected, candidates = slot_roles(first, self.layout)
        final = layer.logical >= self.end
        if self.selector is None:  # given positions
            self._apply(self.plan.given_cut(layer_idx, first, layer.logical, chunked=True))
            return
        held = HeldContext(
            layer_idx, key, query, pos, first >= self.layout.pad.to(pos.device).view(-1, 1),
            layer.logical - (query.shape[2] - self.probe), self.probe, self.layout.length, scaling, softcap,
            self.layout, self.seed, self.state.setdefault(layer_idx, {}),
        )
        self.selector.observe_held(held)
        if not bool((candidates.sum(-1) > self.plan.budget_of(layer_idx).to(pos.device)).any()):
            return
        scores = self.selector.score_held(held).float()
        self._apply(self.plan.cut(layer_idx, scores, key.shape[1], candidates, protected, final))

    def _apply(self, cut) -> None:
        if cut is None:
            return
        for idx in cut.layers:
            if cut.ragged is not None:
                self.layers[idx].compress_ragged(cut.ragged)
                self.state.pop(idx, None)
                continue
            self.layers[idx].evict(cut.slots)
            state = self.state.get(idx, {})
            slot = cut.slots.clamp(min=0)
            for name, t in state.items():
                state[name] = t.gather(2, slot.to(t.device).expand(t.shape[0], t.shape[1], slot.shape[-1]))


# ------------------------------------------------------------------------------------------------ cache.prefill
@torch.inference_mode()
def prefill_in_chunks(cache: Any, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      chunk_size: int) -> None:
    """``cache.prefill``: all prompt tokens but the last through ``model`` in chunks (see
    :meth:`~kvcache_plugins.CompressedCache.prefill`)."""
    if not cache.serves(model):
        raise ValueError("prefill runs the model this cache was built with: CompressedCache(model, ...)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
        raise TypeError("input_ids must be a LongTensor [batch, tokens]")
    B, n = input_ids.shape
    if n < 2:
        raise ValueError("prefill needs at least 2 prompt tokens (generate processes the last one)")
    if cache.get_seq_length() > 0:
        raise ValueError("prefill fills an empty cache (call reset() first)")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device).long()
    finch = cache.selector.question_probe
    chunks = cache.start_chunks(input_ids, mask, finch=finch)
    try:
        q = cache.layout.question_len
        qn = int(q[0]) if finch else 0
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        kw = cache_kwargs(model, cache)
        end = n - qn if finch else n - 1
        for t0 in range(0, end, chunk_size):
            t1 = min(t0 + chunk_size, end)
            ids, am, pid = input_ids[:, t0:t1], mask[:, :t1], positions[:, t0:t1]
            if finch:
                ids = torch.cat([ids, input_ids[:, n - qn :]], dim=1)
                am = torch.cat([am, mask[:, n - qn :]], dim=1)
                pid = torch.cat([pid, positions[:, n - qn :]], dim=1)
                chunks.probe = qn
            model(ids, attention_mask=am, position_ids=pid, use_cache=True, logits_to_keep=1, **kw)
    finally:
        cache.end_chunked_prefill()
    if qn > 1:  # the question itself, stored as usual (generate processes its last token)
        model(
            input_ids[:, n - qn : n - 1], attention_mask=mask[:, : n - 1],
            position_ids=positions[:, n - qn : n - 1], use_cache=True, logits_to_keep=1, **kw,
        )
