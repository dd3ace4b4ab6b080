"""Chunked prefill for :class:`~kvcache_plugins.CompressedCache`: read a prompt longer than memory.

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

* ``random``: the unchunked draw at position ``j``; ``streaming``: ``j``. These scores depend on the position only,
  and the top-k of a union is the top-k of (top-k of one part) and the rest, so they are **exact**: they keep the
  positions the unchunked cache keeps.
* ``knorm``: ``-||k_j||``. Exact in the first layer; deeper keys of later chunks come from hidden states that saw
  only the kept past, so there it is the same per-chunk rule on slightly different keys.
* ``snapkv``: the unchunked formula with the chunk's last ``window`` queries as observation window, average-pooled
  along the held slots in position order; the chunk's window scores above every pooled value (so the last chunk's
  window, the prompt's, is always kept). **Approximation** (earlier chunks are judged by their own window); the
  documented reference is that per-chunk compression applied by hand. With one chunk it is unchunked SnapKV.
* ``h2o``: attention every held key received from all real queries so far, summed over chunks, divided by ``G``
  times the queries at or after it. **Approximation** (evicted keys leave the softmax). One chunk: unchunked H2O.
* ``q2c`` under ``generate``: the question comes last, so each chunk's last ``question_len`` queries stand in for it
  (the final chunk, if it holds the question, scores with the real one). **Approximation**; ``cache.prefill`` is
  the question-aware way: Finch scores every chunk with the real question. With one chunk it is unchunked Q2C.

``granularity="global"`` averages the scores over heads and layers and compresses all layers at the last one;
``"head"`` keeps positions per KV head. With ``quant``, kept tokens are stored quantized as soon as they arrive, so
later chunks attend to the quantized kept past.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .._compat import cache_kwargs
from ..attention import observer
from ..selection import select_slots
from ..selection.attention_scores import last_queries

CHUNKED_SELECTORS = ("q2c", "snapkv", "h2o", "random", "streaming", "knorm")
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


# ------------------------------------------------------------------------------------------------------ state
@dataclass
class ChunkState:
    """One chunked prefill in progress.

    Attributes:
        total: length of the whole (padded) prompt.
        probe: question tokens appended to the chunk in flight (Finch); scored with, never stored.
        acc: ``float32 [B, H, S]`` per layer: attention the held slots received so far (h2o).
        global_sum, global_count: per-layer scores summed for ``granularity="global"``.
    """

    total: int
    probe: int = 0
    acc: dict[int, torch.Tensor] = field(default_factory=dict)
    global_sum: torch.Tensor | None = None
    global_count: int = 0


def held_attention_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    query_pos: torch.Tensor,
    weight: torch.Tensor,
    scaling: float,
    softcap: float | None,
    chunk: int = 256,
) -> torch.Tensor:
    """``sum_i w_i p(i, j)`` per KV head over held slots (summed over the query heads sharing it).

    ``p(i, j) = softmax_j(q_i . k_j * scaling)`` (soft-capped if the model does) over the slots ``j`` with
    ``key_valid[j]`` and ``key_pos[j] <= query_pos[i]``.

    Args:
        queries: ``[B, H_q, m, D]``; keys: ``[B, H_kv, T, D]``.
        key_pos: ``[B, H_s, T]`` logical position of each slot (``H_s`` is 1 or ``H_kv``).
        key_valid: ``Bool [B, T]``; query_pos: ``LongTensor [m]``; weight: ``[B, m]`` (0 drops a query).

    Returns:
        ``float32 [B, H_kv, T]``.
    """
    B, Hq, m, D = queries.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    k_t = keys.float().transpose(-1, -2)
    out = torch.zeros(B, Hkv, T, dtype=torch.float32, device=keys.device)
    pos = key_pos.to(keys.device).view(B, key_pos.shape[1], 1, 1, T)
    invalid = ~key_valid.to(keys.device).view(B, 1, 1, 1, T)
    for start in range(0, m, chunk):
        stop = min(start + chunk, m)
        c = stop - start
        q = queries[:, :, start:stop].float().reshape(B, Hkv, G * c, D)
        logits = torch.matmul(q, k_t).mul_(scaling).view(B, Hkv, G, c, T)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        hidden = (pos > query_pos[start:stop].to(keys.device).view(1, 1, 1, c, 1)) | invalid
        logits.masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        w = weight[:, start:stop].float().to(keys.device).view(B, 1, 1, c, 1)
        out += (probs * w).nan_to_num_(0.0).sum(dim=(2, 3))
    return out


# ------------------------------------------------------------------------------------------------------ mixin
class ChunkedPrefill:
    """The chunked-prefill half of :class:`~kvcache_plugins.CompressedCache` (see the module docstring)."""

    _chunk: ChunkState | None = None
    #: queries per attention call during a chunked prefill (see ``attention_query_block``)
    chunk_query_block: int = 256

    @property
    def attention_query_block(self) -> int | None:
        """Asks the observer to run a chunk's attention this many queries at a time: the mask-sized working
        memory (sdpa turns the boolean ``[chunk, held]`` mask into a float copy) stays small next to the cache."""
        return self.chunk_query_block if self._chunk is not None else None

    # ------------------------------------------------------------------ entry points
    def begin_chunked_prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, chunk_size: int | None
    ) -> bool:
        """Called by ``generate`` before its prefill. Returns whether this prefill is handled in chunks.

        Only a prefill that starts on an empty cache and really comes in several chunks is; otherwise the first
        forward is the whole prompt, as without chunking.
        """
        if chunk_size is None or input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] <= chunk_size:
            return False
        if self.get_seq_length() > 0:
            return False
        self._start_chunks(input_ids, attention_mask)
        return True

    def end_chunked_prefill(self) -> None:
        self._chunk = None

    def _check_chunk_selector(self) -> None:
        if self.selector.name not in CHUNKED_SELECTORS:
            raise ValueError(
                f"chunked prefill scores chunks with the built-in selectors {CHUNKED_SELECTORS}; selector "
                f"{self.selector!r} is not one of them (prefill without prefill_chunk_size)"
            )

    def _start_chunks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        self._check_chunk_selector()
        if self._model_ref is None:
            raise ValueError("chunked prefill compresses after each chunk's attention: build the cache with the model")
        B, n = input_ids.shape
        if attention_mask is None:
            pad = torch.zeros(B, dtype=torch.long)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; the prompt has {tuple(input_ids.shape)}"
                )
            pad = (n - attention_mask.long().sum(-1)).cpu()
        self._clear_prompt_state()
        self.layout = self._layout_for(B, n, pad, input_ids)
        self._chunk = ChunkState(total=n)

    @torch.inference_mode()
    def prefill(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, chunk_size: int
    ) -> None:
        """Prefill all prompt tokens but the last in chunks of ``chunk_size``; ``generate`` then continues.

        Afterwards call ``model.generate(input_ids, attention_mask=attention_mask, cache=cache, ...)`` with the same
        prompt (no beam search or ``num_return_sequences``: they would re-expand a cache that already holds the
        prompt). With ``q2c`` every chunk is scored by the question's queries (Finch, see the module docstring), so
        all rows need the same ``question_len`` (at least 1); other selectors compress each chunk as
        ``generate(prefill_chunk_size=...)`` does. With ``question_len=0`` the held-back last token is a context
        token that is always kept: one context slot is reserved for it.

        Args:
            model: the model this cache was built with.
            input_ids: ``LongTensor [B, n]``, left-padded if ``B > 1``; ``attention_mask``: ``[B, n]`` or ``None``.
            chunk_size: context tokens per forward pass.
        """
        if self._model_ref is None or self._model_ref() is not model:
            raise ValueError("prefill runs the model this cache was built with: CompressedCache(model, ...)")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
            raise TypeError("input_ids must be a LongTensor [batch, tokens]")
        B, n = input_ids.shape
        if n < 2:
            raise ValueError("prefill needs at least 2 prompt tokens (generate processes the last one)")
        if self.get_seq_length() > 0:
            raise ValueError("prefill fills an empty cache (call reset() first)")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device).long()
        self._start_chunks(input_ids, mask)
        try:
            q = self.layout.question_len
            finch = self.selector.name == "q2c"
            if finch and (bool((q != q[0]).any()) or int(q[0]) < 1):
                raise ValueError(
                    f"Finch-style q2c prefill appends one question block to every chunk: all rows need the same "
                    f"question_len >= 1, got {q.tolist()}"
                )
            if not finch:
                self._budget = (self._budget - (q == 0).long()).clamp(min=0)
            qn = int(q[0]) if finch else 0
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            kw = cache_kwargs(model, self)
            end = n - qn if finch else n - 1
            for t0 in range(0, end, chunk_size):
                t1 = min(t0 + chunk_size, end)
                ids, am, pid = input_ids[:, t0:t1], mask[:, :t1], positions[:, t0:t1]
                if finch:
                    ids = torch.cat([ids, input_ids[:, n - qn :]], dim=1)
                    am = torch.cat([am, mask[:, n - qn :]], dim=1)
                    pid = torch.cat([pid, positions[:, n - qn :]], dim=1)
                    self._chunk.probe = qn
                model(ids, attention_mask=am, position_ids=pid, use_cache=True, logits_to_keep=1, **kw)
        finally:
            self.end_chunked_prefill()
        if qn > 1:  # the question itself, stored as usual (generate processes its last token)
            model(
                input_ids[:, n - qn : n - 1], attention_mask=mask[:, : n - 1],
                position_ids=positions[:, n - qn : n - 1], use_cache=True, logits_to_keep=1, **kw,
            )

    # ------------------------------------------------------------------ per forward
    def _chunk_update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store a chunk (never the Finch question probe) and return what the chunk's attention sees."""
        layer = self.layers[layer_idx]
        probe = self._chunk.probe
        c = key_states.shape[-2] - probe
        keys, values = layer.update(key_states[..., :c, :], value_states[..., :c, :], *args, **kwargs)
        if probe:
            keys = torch.cat([keys, key_states[..., c:, :]], dim=-2)
            values = torch.cat([values, value_states[..., c:, :]], dim=-2)
        if layer_idx in self.compressed_layers:
            self.peak_prefill_bytes = max(self.peak_prefill_bytes, self.memory_footprint().total)
            observer.announce(self, layer_idx)
        return keys, values

    def _chunk_observe(self, layer_idx, query, key, scaling, softcap) -> None:
        """After a chunk's attention in ``layer_idx``: score the held slots, cut back to the budget."""
        state = self._chunk
        layer = self.layers[layer_idx]
        if layer.pending is not None:
            layer.keep_all()  # the first chunk: its tokens become slots 0..c-1
        pos = layer.positions.long()  # [B, H_s, T]
        B, _, T = pos.shape
        device = pos.device
        layout = self.layout.to(device)
        first = pos[:, 0, :]
        valid = first >= layout.pad.view(B, 1)
        sink = first < (layout.pad + layout.sinks).view(B, 1)
        question = first >= (state.total - layout.question_len).view(B, 1)
        protected = valid & (sink | question)
        candidates = valid & ~protected
        budget = self._budget.to(device)
        over = bool((candidates.sum(-1) > budget).any())
        name = self.selector.name
        if name == "h2o":
            self._accumulate_h2o(layer_idx, layer, query, key, pos, valid, scaling, softcap)
        if self.granularity == "global":
            if over:
                scores = self._chunk_scores(layer_idx, layer, query, key, pos, valid, scaling, softcap)
                mean = scores.mean(1, keepdim=True)
                state.global_sum = mean if state.global_sum is None else state.global_sum + mean
                state.global_count += 1
            if layer_idx != self.compressed_layers[-1] or not over:
                return
            keep = select_slots(state.global_sum / state.global_count, candidates, protected, budget)
            state.global_sum, state.global_count = None, 0
            for idx in self.compressed_layers:
                self._evict_slots(idx, keep)
            return
        if not over:
            return
        scores = self._chunk_scores(layer_idx, layer, query, key, pos, valid, scaling, softcap)
        if self.granularity == "head":
            scores = scores.expand(B, key.shape[1], T)
        else:
            scores = scores.mean(1, keepdim=True)
        self._evict_slots(layer_idx, select_slots(scores, candidates, protected, budget))

    def _evict_slots(self, layer_idx: int, keep: torch.Tensor) -> None:
        self.layers[layer_idx].evict(keep)
        acc = self._chunk.acc.get(layer_idx)
        if acc is not None:
            slot = keep.clamp(min=0)
            self._chunk.acc[layer_idx] = acc.gather(2, slot.expand(acc.shape[0], acc.shape[1], slot.shape[-1]))

    # ------------------------------------------------------------------ scores
    def _chunk_queries(self, layer, query: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        """``(t0, c, real)``: first logical position and length of the chunk in flight, and ``Bool [B, c]`` real
        (non-padding) chunk queries."""
        c = query.shape[2] - self._chunk.probe
        t0 = layer.logical - c
        qpos = torch.arange(t0, t0 + c, device=query.device)
        real = qpos.view(1, c) >= self.layout.pad.to(query.device).view(-1, 1)
        return t0, c, real

    def _accumulate_h2o(self, layer_idx, layer, query, key, pos, valid, scaling, softcap) -> None:
        t0, c, real = self._chunk_queries(layer, query)
        T = pos.shape[-1]
        sums = held_attention_sums(
            query[:, :, :c], key[:, :, :T], pos, valid, torch.arange(t0, t0 + c, device=query.device), real.float(),
            scaling, softcap, getattr(self.selector, "chunk", 256),
        )
        acc = self._chunk.acc.get(layer_idx)
        if acc is not None:
            sums[..., : acc.shape[-1]] += acc
        self._chunk.acc[layer_idx] = sums

    def _chunk_scores(self, layer_idx, layer, query, key, pos, valid, scaling, softcap) -> torch.Tensor:
        """``float32 [B, H_kv or 1, T]``: scores of the held slots (see the module docstring)."""
        name = self.selector.name
        B, _, T = pos.shape
        H = key.shape[1]
        G = query.shape[1] // H
        device = key.device
        if name == "knorm":
            return -key[:, :, :T].float().norm(dim=-1)
        if name == "streaming":
            return pos.float()
        if name == "random":
            g = torch.Generator().manual_seed(self.seed * 100_003 + layer_idx)
            draw = torch.rand(B, H, self._chunk.total, generator=g).to(device)
            return draw.gather(2, pos.clamp(min=0).expand(B, H, T))
        if name == "h2o":
            seen = (layer.logical - pos).clamp(min=1).float()  # real queries at or after each held key
            return self._chunk.acc[layer_idx] / (seen * G)
        t0, c, real = self._chunk_queries(layer, query)
        probe = self._chunk.probe
        if name == "q2c" and probe:  # Finch: the question's queries at their true positions
            n = self._chunk.total
            qpos = torch.arange(n - probe, n, device=device)
            key_pos = torch.cat([pos, qpos.view(1, 1, probe).expand(B, pos.shape[1], probe)], dim=-1)
            key_valid = torch.cat([valid, valid.new_ones(B, probe)], dim=-1)
            weight = torch.full((B, probe), 1.0 / probe, device=device)
            sums = held_attention_sums(
                query[:, :, c:], key, key_pos, key_valid, qpos, weight, scaling, softcap, self.selector.chunk
            )
            return sums[..., :T] / G
        span = real.sum(-1)  # the chunk's real tokens per row
        if name == "snapkv":
            span = span.clamp(max=self.selector.window)
        else:  # q2c under generate: the chunk's last question_len queries stand in for the question
            span = torch.minimum(span, self.layout.question_len.to(device))
        offsets, weight = last_queries(c, span, device)
        sums = held_attention_sums(
            query[:, :, offsets], key[:, :, :T], pos, valid, t0 + offsets, weight, scaling, softcap,
            self.selector.chunk,
        ) / G
        if name != "snapkv":
            return sums
        k = self.selector.kernel
        if k > 1:
            sums = F.avg_pool1d(sums.view(B * H, 1, T), k, stride=1, padding=k // 2, count_include_pad=False)
            sums = sums.view(B, H, T)
        # the chunk's observation window is kept, as unchunked SnapKV keeps the prompt's: 2 + j / n, newest highest
        start = (t0 + c - span).view(B, 1, 1)
        in_window = (pos >= start) & (pos < t0 + c)
        return torch.where(in_window, 2.0 + pos.float() / self._chunk.total, sums)
