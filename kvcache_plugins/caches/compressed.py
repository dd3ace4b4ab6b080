"""``CompressedCache``: keep only the prompt tokens a selector scores highest, optionally quantized.

Lifecycle of one full-attention layer:

1. **Prompt** (the first forward on an empty cache). ``update`` returns the prompt's keys and values unchanged, so
   the prompt attends to itself in full, and holds them until the layer's selection is known.
2. **Selection.** With the model observed (:mod:`kvcache_plugins.attention.observer`), right after the layer's
   attention: the selector scores the prompt positions (using the observed queries where it needs them), the best
   ``ceil(r * |context|)`` context positions plus sinks and question are kept, the rest is dropped and its memory
   freed. So peak prefill memory is about the compressed layers plus one full layer. ``granularity="global"`` waits
   for the last layer and keeps one position set for all layers (mean of the per-layer scores). Without a model,
   query-free selectors (random, streaming, knorm) select inside ``update``.
3. **Generation.** New tokens are appended (quantized if ``quant`` says so). With ``max_tokens`` and a
   ``decode_policy``, once a layer holds ``max_tokens + evict_every`` tokens it is cut back to ``max_tokens`` after
   its attention: sinks, the question, and the newest ``recent_tokens`` stay; of the rest, the lowest accumulated
   attention (``"h2o"``) or the oldest (``"streaming"``) tokens go. Decode steps of layers with quantized kept
   tokens attend straight from the packed codes (``fused``, :mod:`kvcache_plugins.attention.fused`).

Prompts longer than memory: ``generate(..., prefill_chunk_size=N)`` and ``cache.prefill(model, ids, chunk_size=N)``
compress after every chunk, keeping the whole prompt's budget (:mod:`kvcache_plugins.caches.chunked`).

The cache is a container: storage is its layers' (:mod:`kvcache_plugins.layers.slots`, ``ragged``, ``lowrank``),
what to keep is the selection policy's (:mod:`kvcache_plugins.selection`: the selector, the plan, decode
eviction), argument checks are :mod:`~kvcache_plugins.caches.options`, save/load
:mod:`~kvcache_plugins.caches.compressed_state`; the cache routes the attention callbacks between them.

Eviction semantics (:mod:`kvcache_plugins.layers.slots`): evicting is exactly masking the evicted positions from
every later token; that identity is what the tests check.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from .._checks import check_finite_states
from ..attention import observer
from ..attention.masks import slot_mask
from ..layers.base import Workspace
from ..layers.lowrank import LowRankCompressedLayer
from ..layers.ragged import RaggedLayer
from ..layers.slots import CompressedLayer
from ..persist.state import register_cache
from ..quant.spec import DEFAULT_GROUP_SIZE, Spec
from ..selection import PromptLayout, ScoreContext, SelectionPlan, Selector, left_padding, slot_roles
from ..selection.budget import Budget
from ..selection.eviction import decode_attention, decode_keep
from ..selection.layout import prompt_layout
from .base import PluginCache
from .chunked import ChunkedPrefill, install_prefill_hook, prefill_in_chunks
from .compressed_state import CompressedState
from .options import check_options


@register_cache("CompressedCache")
class CompressedCache(CompressedState, PluginCache):
    """A ``transformers.DynamicCache`` that keeps only the prompt tokens a selector scores highest.

    ``model.generate(ids, cache=CompressedCache(model, selector="q2c", retention=0.5, question_len=q))``
    (``past_key_values=`` before transformers 5.24; both are supported, see ``kvcache_plugins.cache_kwargs``). See
    the module docstring for the lifecycle and the eviction semantics. ``cache.layers[i].keys`` / ``.values`` read
    a layer's stored slots (dequantized) as ``[B, H, S, D]``, in the order of ``kept_positions(i)``.

    Args:
        model: the model the cache serves; its attention is observed (queries, masks) while the cache is in use.
            May be omitted for query-free selectors (``random``, ``streaming``, ``knorm``) on unpadded inputs;
            then pass ``config``.
        selector: a name (``q2c``, ``snapkv``, ``h2o``, ``tova``, ``expected_attention``, ``random``, ``streaming``,
            ``knorm``, ``keydiff``, ``lagkv``) or a
            :class:`~kvcache_plugins.selection.Selector`; extra keyword arguments go to the selector's constructor
            (e.g. ``window=16`` for snapkv).
        retention: fraction ``r`` in ``(0, 1]`` of the context kept: ``ceil(r * |context|)`` tokens per row.
        max_tokens: token budget per row and layer (sinks and question included). At prefill it caps what is kept;
            with ``decode_policy`` it also bounds the cache during generation.
        question_len: question tokens at the end of the prompt (an int, or one per batch row). Required by q2c.
        question, tokenizer: alternatively, the question string; its token count (without special tokens) is used.
        sink_tokens: leading tokens always kept (default: the selector's, 4 for streaming, else 0).
        granularity: ``"layer"`` (each layer its own positions), ``"global"`` (one position set for every layer,
            from the mean over layers and heads) or ``"head"`` (each KV head its own positions).
        budget: how the budget is shared (:mod:`kvcache_plugins.selection.budget`): ``"uniform"`` (every layer and
            head keeps the same count), ``"pyramid"`` (layer budgets shrinking with depth, same total; granularity
            layer or head) or ``"adakv"`` (per layer, the heads' combined budget goes to the best scores across
            heads, with a floor per head; granularity head; heads are stored ragged, see
            :mod:`kvcache_plugins.layers.ragged`), or a :class:`~kvcache_plugins.selection.budget.Budget`.
        quant: a :class:`~kvcache_plugins.MixedPrecisionCache` spec for the kept and the new tokens (per-token
            groups; e.g. ``"int8"``, ``"int4"``, ``"mixed_l0"``, ``{0: 16, "default": 4}``).
        group_size, scale_dtype: quantization grouping and scale dtype, as in ``MixedPrecisionCache``.
        decode_policy: ``"h2o"`` (evict the lowest accumulated attention) or ``"streaming"`` (evict the oldest)
            once a layer holds ``max_tokens + evict_every`` tokens; needs ``max_tokens`` and the model.
        evict_every: generation steps between evictions.
        recent_tokens: newest tokens never evicted during generation (default ``evict_every``).
        seed: seed of the random selector.
        lowrank: store the kept prompt tokens as rank-``r`` SVD factors (an int in ``1..head_dim``, a
            ``(key_rank, value_rank)`` pair or a per-layer dict/list; see :mod:`kvcache_plugins.layers.lowrank`);
            with ``quant`` the factors are quantized too. Not with ``decode_policy``.
        lowrank_keys: ``"pre_rope"`` (default; needs the model) or ``"post_rope"``: factor keys before or after RoPE.
        fused: when the cache is built with the model, decode steps (at most ``FUSED_MAX_QUERIES`` new tokens) of
            layers whose kept tokens are quantized (keys and values) attend straight from the packed codes
            (:mod:`kvcache_plugins.attention.fused`): attention over ``[packed slots, new tokens at model
            precision]``, unused slots and left padding masked, without dequantizing the history. ``fused=False``
            opts out. With ``decode_policy="h2o"`` the kernel also returns the attention probabilities, which
            feed the accumulated attention (the reference path recomputes them from the dequantized keys). The
            prompt, 16-bit layers, ragged (``budget="adakv"``) and low-rank layers keep the reference path:
            dequantize, then the model's attention. ``cache.fused_steps`` counts the fused layer-steps.
        config: the model config, when no model is given.
    """

    #: queries per attention call during a chunked prefill (see ``attention_query_block``)
    chunk_query_block: int = 256

    def __init__(
        self,
        model: Any = None,
        *,
        selector: str | Selector = "q2c",
        retention: float | None = None,
        max_tokens: int | None = None,
        question_len: int | Sequence[int] | torch.Tensor | None = None,
        question: str | None = None,
        tokenizer: Any = None,
        sink_tokens: int | None = None,
        granularity: str = "layer",
        budget: str | Budget = "uniform",
        quant: Spec | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        scale_dtype: torch.dtype | None = None,
        decode_policy: str | None = None,
        evict_every: int = 16,
        recent_tokens: int | None = None,
        seed: int = 0,
        lowrank: Any = None,
        lowrank_keys: str = "pre_rope",
        config: Any = None,
        fused: bool = True,
        **selector_options: Any,
    ) -> None:
        o = check_options(model, config, selector, retention, max_tokens, question_len, question, tokenizer,
                          sink_tokens, granularity, budget, quant, group_size, scale_dtype, decode_policy, evict_every,
                          recent_tokens, seed, lowrank, lowrank_keys, fused, selector_options)
        super().__init__(config=o.config)
        self.model_config = o.config
        self.selector, self.budget, self.layer_specs = o.selector, o.budget, o.layer_specs
        self.retention, self.max_tokens, self.question_len = o.retention, o.max_tokens, o.question_len
        self.sink_tokens, self.granularity, self.seed = o.sink_tokens, o.granularity, o.seed
        self.decode_policy, self.evict_every, self.recent_tokens = o.decode_policy, o.evict_every, o.recent_tokens
        self.layer_ranks, self.lowrank_keys = o.layer_ranks, o.lowrank_keys
        self.workspace = Workspace()
        self.compressed_layers: list[int] = []
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer:
                self.layers[i] = self._make_layer(i, o)
                self.compressed_layers.append(i)
        if not self.compressed_layers:
            raise ValueError("this model has no full-attention layers for CompressedCache to compress")
        #: how scores become kept slots, the same for the prompt and for every chunk (a scout gives positions)
        self.plan = SelectionPlan(o.granularity, o.budget, self.compressed_layers)
        #: decode steps of quantized plain CompressedLayers attend from the packed codes (see ``fused`` above)
        self.fused = bool(
            fused and model is not None and any(self._fuses(self.layers[i]) for i in self.compressed_layers)
        )
        self.fused_steps = 0
        self._model_ref = weakref.ref(model) if model is not None else None
        if model is not None:
            self._observe(model)
            install_prefill_hook(model)
        self._chunks: ChunkedPrefill | None = None
        #: states handed over with their positions (``adopt_positions``) instead of selected
        self._adopt: tuple[torch.Tensor, int] | None = None
        self._clear_prompt_state()

    def _make_layer(self, i: int, o: Any) -> CompressedLayer:
        """The storage of compressed layer ``i``: low-rank, ragged (adakv) or plain slots."""
        spec = self.layer_specs[i]
        if o.layer_ranks is not None:
            return LowRankCompressedLayer(
                spec.key, spec.value, o.layer_ranks[i], o.scale_dtype, self.workspace, rope=o.rope
            )
        kind = RaggedLayer if o.budget.ragged else CompressedLayer
        return kind(spec.key, spec.value, o.scale_dtype, self.workspace, track_attention=o.decode_policy == "h2o")

    def _clear_prompt_state(self) -> None:
        self.peak_prefill_bytes = 0  # largest memory_footprint().total seen while the prompt was being selected
        self.layout: PromptLayout | None = None

    # ------------------------------------------------------------------- API
    @property
    def observed(self) -> bool:
        return self._model_ref is not None

    def serves(self, model: Any) -> bool:
        """Whether this cache was built with (and observes) ``model``."""
        return self._model_ref is not None and self._model_ref() is model

    @property
    def attention_query_block(self) -> int | None:
        """Queries per attention call of a chunk (the observer splits it): sdpa's float copy of the ``[chunk, held]``
        mask stays small next to the cache."""
        return self.chunk_query_block if self._chunks is not None else None

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not isinstance(layer, CompressedLayer):
            if self._chunks is not None:
                return self._chunks.update(layer, key_states, value_states, *args, **kwargs)
            return layer.update(key_states, value_states, *args, **kwargs)
        if self._adopt is not None or self._chunks is not None or (layer.logical == 0 and layer.pending is None):
            check_finite_states(key_states, value_states, layer_idx)  # prompts: held until scored, or adopted as is
        if self._adopt is not None:  # states handed over with their positions
            positions, logical = self._adopt
            layer.adopt(key_states, value_states, positions.to(key_states.device), logical)
            if self.observed:
                observer.announce(self, layer_idx)
            return key_states, value_states
        if self._chunks is not None:
            out = self._chunks.update(layer, key_states, value_states, *args, **kwargs)
            self.peak_prefill_bytes = max(self.peak_prefill_bytes, self.memory_footprint().total)
            observer.announce(self, layer_idx)
            return out
        prompt = layer.logical == 0 and layer.pending is None
        if self.fused and self._fuses(layer):
            self._require_attended(self.layers[i] for i in self.compressed_layers)
            out = layer.update(key_states, value_states, fused=True)
        else:
            out = layer.update(key_states, value_states)
        if prompt:
            # the prompt of this layer is held whole until its selection: the moment prefill memory peaks
            self.peak_prefill_bytes = max(self.peak_prefill_bytes, self.memory_footprint().total)
        if self.observed:
            observer.announce(self, layer_idx)
        elif prompt:
            k = layer.pending[0]
            if self.layout is None:
                self.layout = self._layout_for(k.shape[0], k.shape[2], torch.zeros(k.shape[0], dtype=torch.long), k)
            self._select(layer_idx, None, 1.0, None)
        return out

    @staticmethod
    def _fuses(layer: Any) -> bool:
        """Whether ``layer`` can decode through the fused kernel: a plain :class:`CompressedLayer` (not ragged, not
        low rank) storing quantized keys and values."""
        return type(layer) is CompressedLayer and layer.quantized and not layer.reference_decode

    def kept_positions(self, layer_idx: int | None = None) -> torch.Tensor | None:
        """``LongTensor [B, H_s, S]``: logical position of every stored slot of a layer (``-1`` = unused).

        ``layer_idx=None`` gives the first compressed layer's (with ``granularity="global"`` all layers agree).
        """
        idx = self.compressed_layers[0] if layer_idx is None else layer_idx
        layer = self.layers[idx]
        if not isinstance(layer, CompressedLayer):
            raise ValueError(f"layer {idx} is not compressed by this cache (sliding-window layers are kept whole)")
        return layer.kept_positions()

    def reset(self) -> None:
        super().reset()
        self._clear_prompt_state()

    # ------------------------------------------------------------- chunked prefill
    def begin_chunked_prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, chunk_size: int | None
    ) -> bool:
        """Called by ``generate`` before its prefill: whether it is handled in chunks (only one that starts on an empty
        cache and really comes in several chunks is; otherwise the first forward is the whole prompt)."""
        if chunk_size is None or input_ids is None or input_ids.ndim != 2 or input_ids.shape[1] <= chunk_size:
            return False
        if self.get_seq_length() > 0:
            return False
        self.start_chunks(input_ids, attention_mask)
        return True

    def end_chunked_prefill(self) -> None:
        self._chunks = None  # the chunks' object goes; the layers keep what it cut

    def start_chunks(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, finch: bool | None = None
    ) -> ChunkedPrefill:
        """Begin a chunked prefill of ``input_ids`` ``[B, n]``: the whole prompt's layout and budgets first (``finch``:
        see :meth:`ChunkedPrefill.begin`)."""
        if self.plan.given is None and not self.selector.scores_held():
            self.selector.score_held(None)  # raises: this selector has no chunked form
        if self._model_ref is None:
            raise ValueError("chunked prefill compresses after each chunk's attention: build the cache with the model")
        B, n = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; the prompt has {tuple(input_ids.shape)}"
            )
        self._clear_prompt_state()
        self.layout = self._layout_for(B, n, left_padding(attention_mask, B, n), input_ids, start_plan=False)
        selector = None if self.plan.given is not None else self.selector
        self._chunks = ChunkedPrefill.begin(
            self.layers, self.compressed_layers, self.plan, selector, self.layout, self.seed, finch,
            self.retention, self.max_tokens,
        )
        return self._chunks

    def prefill(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, chunk_size: int
    ) -> None:
        """Prefill all prompt tokens but the last in chunks of ``chunk_size``; ``generate`` then continues.

        Afterwards call ``model.generate(input_ids, attention_mask=attention_mask, cache=cache, ...)`` with the same
        prompt (no beam search or ``num_return_sequences``: they would re-expand a cache that already holds the
        prompt). With ``q2c`` every chunk is scored by the question's queries (Finch, see
        :mod:`kvcache_plugins.caches.chunked`), so all rows need the same ``question_len`` (at least 1); other
        selectors compress each chunk as ``generate(prefill_chunk_size=...)`` does. With ``question_len=0`` the
        held-back last token is a context token that is always kept: one context slot is reserved for it.

        Args:
            model: the model this cache was built with.
            input_ids: ``LongTensor [B, n]``, left-padded if ``B > 1``; ``attention_mask``: ``[B, n]`` or ``None``.
            chunk_size: context tokens per forward pass.
        """
        prefill_in_chunks(self, model, input_ids, attention_mask, chunk_size)

    def adopt_positions(self, positions: torch.Tensor | None, logical: int = 0) -> None:
        """While set, a forward's states are taken as the layers' content at ``positions`` ``[B, 1, S]`` (``-1``
        unused) standing for ``logical`` prompt tokens, instead of being selected (``None`` ends it)."""
        self._adopt = None if positions is None else (positions, logical)

    # -------------------------------------------------------- prompt layout
    def _layout_for(
        self, batch: int, n: int, pad: torch.Tensor, rows: torch.Tensor | None = None, start_plan: bool = True
    ) -> PromptLayout:
        """The prompt's layout (and, unless told not to, the plan's budgets); ``rows`` (the prompt's keys or ids,
        batch first) tells generate()'s repeated rows."""
        if self.plan.given is not None:
            self.plan.given.check_prompt(n, pad, rows)
        qlen = 0 if self.question_len is None else self.question_len
        recent = None if self.decode_policy is None else (self.recent_tokens, self.max_tokens)
        layout = prompt_layout(batch, n, pad, qlen, self.sink_tokens, rows, recent)
        if self.plan.given is not None:
            self.plan.given.bind(layout)
        if start_plan:
            self.plan.start(layout, self.retention, self.max_tokens)
        return layout

    # ------------------------------------------------------------ selection
    def _select(self, layer_idx: int, query: torch.Tensor | None, scaling: float, softcap: float | None) -> None:
        """Select the pending prompt of ``layer_idx`` (right after its attention, or in ``update`` without a model)."""
        layer = self.layers[layer_idx]
        keys = layer.pending[0]
        B, H, n = keys.shape[:3]
        positions = torch.arange(n, device=keys.device).expand(B, n)
        if self.plan.given is not None:
            cut = self.plan.given_cut(layer_idx, positions, n)
        elif self.plan.keeps_everything(layer_idx, self.layout):
            layer.keep_all()
            return
        else:
            layout = self.layout.to(keys.device)
            ctx = ScoreContext(
                layer_idx, keys, query if self.selector.needs_queries else None, scaling, softcap, layout, self.seed,
                layer.pending[1],
            )
            scores = self.selector.score(ctx).float().expand(B, -1, n)
            protected, candidates = slot_roles(positions, layout)
            cut = self.plan.cut(layer_idx, scores, H, candidates, protected)
        if cut is None:
            return
        if cut.ragged is not None:
            layer.compress_ragged(cut.ragged)
            return
        if not self.observed and bool((cut.slots < 0).any()):
            raise ValueError(
                "the rows of this batch keep different numbers of tokens (different question lengths); a cache "
                "without the model cannot mask the unused slots: build it with the model"
            )
        for idx in cut.layers:
            self.layers[idx].compress(cut.slots)

    # ----------------------------------------------------- observer protocol
    def adjust_attention_mask(self, layer_idx, module, attention_mask, query, key):
        if id(module) not in self._module_ids:
            return attention_mask
        layer = self.layers[layer_idx]
        if layer.pending is not None:
            if self.layout is None:
                n = layer.pending[0].shape[2]
                pad = left_padding(attention_mask, query.shape[0], n)
                self.layout = self._layout_for(query.shape[0], n, pad, layer.pending[0])
            mask = attention_mask
        else:
            # a fused step hands the attention only the new tokens; the mask still covers [stored slots, new]
            step = getattr(layer, "pending_step", None)
            kv = key.shape[2] if step is None else step.body_len + key.shape[2]
            valid = layer.valid_slots()
            if valid is None and attention_mask is not None and attention_mask.shape[-1] != kv:
                positions = layer.kept_positions()[:, 0, :]  # every slot holds a token; left padding stays hidden
                valid = positions >= self.layout.pad.to(positions.device).view(-1, 1)
            mask = attention_mask if valid is None else slot_mask(
                attention_mask, valid, query.shape[2], kv, query.shape[1], key.device
            )
        given = self.plan.given
        if given is not None and given.hides:
            held = None if layer.pending is not None else layer.kept_positions()[:, 0, :]
            number = self.compressed_layers.index(layer_idx)
            mask = given.construction_mask(number, mask, query, key, held, layer.logical, self._chunks is not None)
        return mask

    def attend(self, layer_idx, module, query, key, value, attention_mask, original, **kwargs):
        """The layer's attention: from the packed slots for a fused decode step (:meth:`CompressedLayer.update`
        with ``fused=True``), else ``original`` (in blocks of ``attention_query_block`` queries during a chunked
        prefill). ``query [B, Hq, n, D]``, ``key``/``value`` what ``update`` returned, ``attention_mask`` the one
        :meth:`adjust_attention_mask` made (over ``[stored slots, new]``). Returns ``(output [B, n, Hq, D], None)``.
        """
        layer = self.layers[layer_idx]
        step = getattr(layer, "pending_step", None)
        if step is None:
            block = self.attention_query_block
            if block and attention_mask is not None and query.shape[2] > block:
                return observer._in_query_blocks(original, block, module, query, key, value, attention_mask, **kwargs)
            return original(module, query, key, value, attention_mask, **kwargs)
        layer.pending_step = None
        out, probs = self.attend_step(
            layer, step, module, query, attention_mask, original, kwargs, weights=layer.acc is not None
        )
        if probs is not None:  # h2o: the kernel's probabilities, summed over the query heads of each KV head
            B, Hq, n, L = probs.shape
            layer.acc += probs.view(B, layer.acc.shape[1], -1, L).sum(2)
            layer.step_accumulated = True
        return out

    def observe_attention(self, layer_idx, module, query, key, attention_mask, scaling, softcap) -> None:
        if id(module) not in self._module_ids:
            return
        if self._chunks is not None:
            self._chunks.observe(layer_idx, query, key, scaling, softcap)
            return
        layer = self.layers[layer_idx]
        if layer.pending is not None:
            self._select(layer_idx, query, scaling, softcap)
            return
        if layer.acc is not None and not layer.step_accumulated:
            layer.acc += decode_attention(query, key, layer.valid_slots(), scaling, softcap)
        layer.step_accumulated = False
        if self.decode_policy is not None and layer.stored >= self.max_tokens + self.evict_every:
            self._evict(layer)

    def _evict(self, layer: CompressedLayer) -> None:
        """Cut ``layer`` back to ``max_tokens`` slots per row (:mod:`kvcache_plugins.selection.eviction`)."""
        keep = decode_keep(
            self.decode_policy, self.granularity == "head", layer.positions.long(), layer.acc, self.layout,
            self.max_tokens, self.recent_tokens,
        )
        layer.evict(keep)
