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

Eviction semantics: kept keys keep their RoPE rotation and new tokens keep their original positions, so
``get_seq_length()`` is the logical length while masks cover only the stored slots (``get_mask_sizes`` reports
``kv_offset = logical - stored``). Rows of a batch that keep fewer tokens than others (left padding, per-row
question lengths) hold unused slots at the front of the row; the observer masks them in every attention call.
Evicting is exactly masking the evicted positions from every later token: that identity is what the tests check.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .._checks import check_choice, check_fraction, check_int, check_row_counts
from .._compat import crop_count
from .._model import head_dim, text_config
from ..attention import observer, paths
from ..attention.fused import FUSED_MAX_QUERIES, FusedStep, Layout, chunk_tokens
from ..quant.groupwise import META_DTYPES, QuantizedTensor, default_meta_dtype, quantize, quantize_step
from ..quant.growable import GRANULE, GrowableQuantized, next_capacity
from ..quant.spec import DEFAULT_GROUP_SIZE, LayerQuantSpec, Spec, TensorQuantSpec, resolve_layer_specs
from ..selection import PromptLayout, ScoreContext, Selector, context_budget, make_selector, select, select_slots
from ..selection.attention_scores import attention_probability_sums
from ..selection.budget import Budget, budget_state, make_budget, read_budget
from .accounting import CacheBytes, reference_bytes, tensor_bytes
from .chunked import ChunkedPrefill, install_prefill_hook
from .layers import ReadOnlyStates, RowEdits, Workspace
from .mixed_precision import layers_nbytes
from .persist import PersistentCache
from .state import (
    SCALE_DTYPES,
    ModelFacts,
    StateReader,
    empty_state,
    is_empty,
    layer_spec_state,
    put_stored,
    read_layer_spec,
    read_stored,
    register_cache,
    register_layer,
)
from .warmup import warm_up

GRANULARITIES = ("layer", "global", "head")
DECODE_POLICIES = ("h2o", "streaming")

Stored = torch.Tensor | QuantizedTensor


def _stored_bytes(t: Stored | None) -> CacheBytes:
    if t is None:
        return CacheBytes()
    if isinstance(t, QuantizedTensor):
        codes, scales, zeros = t.nbytes()
        return CacheBytes(codes=codes, scales=scales, zeros=zeros)
    return CacheBytes(full_precision=tensor_bytes(t))


def _slots(t: Stored | None) -> int:
    if t is None:
        return 0
    return t.num_tokens if isinstance(t, QuantizedTensor) else t.shape[-2]


class _GrowingStore:
    """A layer's stored slots (keys or values). Quantized slots live in buffers that grow in place (a decode step
    writes its token into spare capacity instead of copying the whole store with ``cat``), kept in the attribute
    ``slot``; reading gives them as a ``QuantizedTensor`` of views, and assigning any store replaces them."""

    def __init__(self, slot: str) -> None:
        self.slot = slot

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        store = layer.__dict__.get(self.slot)
        return store.view() if isinstance(store, GrowableQuantized) else store

    def __set__(self, layer: Any, value: Stored | None) -> None:
        grow = isinstance(value, QuantizedTensor) and value.num_tokens
        layer.__dict__[self.slot] = GrowableQuantized(value) if grow else value


class _GrowingRows:
    """A layer's ``[B, H, S]`` per-slot tensor (positions, h2o accumulators) in a buffer with spare capacity along
    the slots (``quant.growable.next_capacity``), kept in the attribute ``slot`` as ``[buffer, used]``: a decode
    step writes its slots in place (:func:`_append_slots`) instead of copying all of them with ``cat``. Reading gives
    the used part (a view); assigning any tensor replaces the buffer, except the view itself (``acc += x``)."""

    def __init__(self, slot: str) -> None:
        self.slot = slot

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        held = layer.__dict__.get(self.slot)
        return None if held is None else held[0][..., : held[1]]

    def __set__(self, layer: Any, value: torch.Tensor | None) -> None:
        held = layer.__dict__.get(self.slot)
        if held is not None and value is not None and value.data_ptr() == held[0].data_ptr() and (
            value.shape == (*held[0].shape[:-1], held[1]) and value.stride() == held[0].stride()
        ):
            return  # the in-place result of an augmented assignment on the view
        layer.__dict__[self.slot] = None if value is None else [value, value.shape[-1]]


def _append_slots(layer: Any, slot: str, new: torch.Tensor) -> None:
    """Write ``new`` ``[B, H, n]`` after the used slots of ``layer``'s :class:`_GrowingRows` attribute ``slot``."""
    held = layer.__dict__[slot]
    buffer, used = held
    n = new.shape[-1]
    if used + n > buffer.shape[-1] or not buffer.is_contiguous() or (
        buffer.is_inference() and not torch.is_inference_mode_enabled()
    ):
        grown = buffer.new_empty((*buffer.shape[:-1], next_capacity(buffer.shape[-1], used + n, GRANULE)))
        grown[..., :used].copy_(buffer[..., :used])
        held[0] = buffer = grown
    buffer[..., used : used + n].copy_(new)
    held[1] = used + n


@register_layer("compressed")
class CompressedLayer(ReadOnlyStates, RowEdits, DynamicLayer):
    """Storage of one full-attention layer of a :class:`CompressedCache` (see the module docstring).

    Attributes:
        logical: tokens this layer has seen (positions keep counting through evictions).
        pending: the prompt's ``(keys, values)`` ``[B, H, n, D]`` until its selection is applied.
        keys, values: the stored slots, ``[B, H, S, D]`` tensors or per-token :class:`QuantizedTensor`.
        positions: ``int32 [B, H_s, S]`` logical position of every slot (``H_s`` = 1, or ``H`` for per-head
            selection); ``-1`` marks an unused slot.
        acc: ``float32 [B, H, S]`` attention accumulated during generation (``decode_policy="h2o"`` only).
        tail: tokens appended since the last selection; only these can be cropped.
    """

    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        key_spec: TensorQuantSpec,
        value_spec: TensorQuantSpec,
        scale_dtype: torch.dtype | None = None,
        workspace: Workspace | None = None,
        track_attention: bool = False,
    ) -> None:
        super().__init__()
        self.key_spec, self.value_spec = key_spec, value_spec
        self.scale_dtype = scale_dtype
        self.workspace = workspace
        self.track_attention = track_attention
        self._clear()

    def _clear(self) -> None:
        self.logical = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.stored_keys: Stored | None = None
        self.stored_values: Stored | None = None
        self.positions: torch.Tensor | None = None
        self.acc: torch.Tensor | None = None
        self.tail = 0
        #: the step captured by the last fused ``update``, until the attention function takes it
        self.pending_step: FusedStep | None = None
        #: this step's attention was added to ``acc`` from the fused kernel's probabilities (``h2o``)
        self.step_accumulated = False
        #: decode steps are faster on the reference path here (set by :func:`kvcache_plugins.attention.paths.route`)
        self.reference_decode = False

    def __repr__(self) -> str:
        return f"CompressedLayer(k={self.key_spec.describe()}, v={self.value_spec.describe()})"

    stored_keys = _GrowingStore("_key_store")
    stored_values = _GrowingStore("_value_store")
    positions = _GrowingRows("_positions")
    acc = _GrowingRows("_acc")

    # ------------------------------------------------------------------ state
    @property
    def stored(self) -> int:
        """Slots the layer holds now (the whole prompt while its selection is pending)."""
        if self.pending is not None:
            return self.pending[0].shape[-2]
        return _slots(self.stored_keys)

    def valid_slots(self) -> torch.Tensor | None:
        """``Bool [B, S]``: slots holding a token, or ``None`` when every slot does."""
        if self.positions is None:
            return None
        valid = self.positions[:, 0, :] >= 0
        return None if bool(valid.all()) else valid

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dtype != value_states.dtype or not key_states.is_floating_point():
            raise TypeError(
                f"keys and values must share one floating dtype, got {key_states.dtype} and {value_states.dtype}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.scale_dtype = self.scale_dtype or default_meta_dtype(self.dtype)
        self.is_initialized = True

    # ----------------------------------------------------------------- writes
    def _store(self, t: torch.Tensor, spec: TensorQuantSpec) -> Stored:
        if not spec.quantized:
            return t
        return quantize(t, spec.bits, spec.group_size, "token", self.scale_dtype)

    def _extend(self, stored: Stored, new: torch.Tensor, spec: TensorQuantSpec, role: str) -> tuple[Stored, torch.Tensor]:
        """Append ``new`` to ``stored``; return the new storage and ``[stored (dequantized), new]``."""
        if not spec.quantized:
            full = torch.cat([stored, new], dim=-2)
            return full, full
        S = stored.num_tokens
        B, H, n, D = new.shape
        if self.workspace is not None:
            full = self.workspace.get(role, new, S + n)
        else:
            full = torch.empty((B, H, S + n, D), dtype=new.dtype, device=new.device)
        stored.dequantize(new.dtype, out=full[..., :S, :])
        full[..., S:, :].copy_(new)
        return stored.cat(self._store(new, spec)), full

    @property
    def quantized(self) -> bool:
        """Keys and values are both stored as per-token :class:`QuantizedTensor` (what the fused kernel reads)."""
        return self.key_spec.quantized and self.value_spec.quantized

    def _capture(self, key_states: torch.Tensor, value_states: torch.Tensor) -> FusedStep:
        """The stored slots ``[B, H, S, *]`` (packed) and the new tokens ``[B, H, n, D]`` as a :class:`FusedStep`.

        The kernel reads whole buffers: the growable stores hold at least two chunks (``C`` = :func:`chunk_tokens`),
        a multiple of ``C`` slots, the same capacity for keys and values; slots past ``S`` are masked by the step.
        Nothing is copied and the history is never dequantized.
        """
        stores = (self._key_store, self._value_store)
        chunk = math.lcm(*(chunk_tokens(Layout(g.bits, g.group_size, g.axis, g.head_dim)) for g in stores))
        S, n = stores[0].tokens, key_states.shape[-2]
        for g in stores:  # room for this step's tokens too: storing them then writes in place
            g.reserve(max(2 * chunk, S + n), chunk)
        capacity = max(g.capacity for g in stores)
        for g in stores:
            g.resize(capacity)
        return FusedStep(stores[0].buffers(), stores[1].buffers(), S, None, None, (key_states, value_states))

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, fused: bool = False, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states``/``value_states`` ``[B, H, n, D]``; return what this step attends to.

        That is ``[stored slots (dequantized), new]`` ``[B, H, S + n, D]``; with ``fused=True`` (set by a
        :class:`CompressedCache` that routes this layer's attention, for decode steps of ``n <= FUSED_MAX_QUERIES``
        tokens over quantized slots) only the new tokens: the step over the packed slots is kept in
        :attr:`pending_step` for the cache's ``attend``, and nothing is dequantized.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise TypeError(f"this layer stores {self.dtype} keys and values; got {key_states.dtype}")
        n = key_states.shape[-2]
        if self.logical == 0 and self.pending is None and self.stored_keys is None:
            self.pending = (key_states, value_states)
            self.logical = n
            return key_states, value_states
        if self.pending is not None:
            raise RuntimeError(
                "the prompt held by this CompressedCache layer was never scored: the cache did not observe the model's "
                "attention. Build it as CompressedCache(model, ...) and use it with that model."
            )
        growing = isinstance(self._key_store, GrowableQuantized) and isinstance(self._value_store, GrowableQuantized)
        if fused and n <= FUSED_MAX_QUERIES and self.quantized and growing:
            self.pending_step = self._capture(key_states, value_states)
            for store, new, spec in ((self._key_store, key_states, self.key_spec),
                                     (self._value_store, value_states, self.value_spec)):
                store.append(quantize_step(new, spec.bits, spec.group_size, "token", self.scale_dtype))
            keys, values = key_states, value_states
        else:
            self.stored_keys, keys = self._extend(self.stored_keys, key_states, self.key_spec, "key")
            self.stored_values, values = self._extend(self.stored_values, value_states, self.value_spec, "value")
        B, Hs = self.positions.shape[:2]
        new_pos = torch.arange(self.logical, self.logical + n, device=self.positions.device, dtype=torch.int32)
        _append_slots(self, "_positions", new_pos.expand(B, Hs, n))
        if self.acc is not None:
            _append_slots(self, "_acc", self.acc.new_zeros(*self.acc.shape[:2], n))
        self.logical += n
        self.tail += n
        return keys, values

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, logical: int) -> None:
        """Take already selected states as the layer's content: ``positions`` ``[B, 1, S]`` (``-1`` unused),
        ``logical`` the prompt length they stand for."""
        self.stored_keys, self.stored_values = self._store(keys, self.key_spec), self._store(values, self.value_spec)
        self.positions = positions.to(torch.int32).contiguous()
        self.logical = logical
        self._after_selection(keys)

    def keep_all(self) -> None:
        """Store the pending prompt as it is (nothing evicted)."""
        k, v = self.pending
        B, _, n, _ = k.shape
        self.stored_keys, self.stored_values = self._store(k, self.key_spec), self._store(v, self.value_spec)
        self.positions = torch.arange(n, device=k.device, dtype=torch.int32).expand(B, 1, n).contiguous()
        self._after_selection(k)

    def compress(self, keep: torch.Tensor) -> None:
        """Keep the pending prompt positions ``keep`` ``LongTensor [B, H_s, S]`` (``-1`` = unused slot)."""
        k, v = self.pending
        B, H, _, D = k.shape
        if keep.shape[1] == 1 and (B == 1 or bool((keep == keep[:1]).all())):
            shared = keep[0, 0].clamp(min=0)  # one position list for every row and head: a plain index_select
            kept_k, kept_v = k.index_select(2, shared), v.index_select(2, shared)
        else:
            index = keep.clamp(min=0).expand(B, H, keep.shape[-1]).unsqueeze(-1).expand(B, H, keep.shape[-1], D)
            kept_k, kept_v = k.gather(2, index), v.gather(2, index)
        self.stored_keys = self._store(kept_k, self.key_spec)
        self.stored_values = self._store(kept_v, self.value_spec)
        self.positions = keep.to(torch.int32).contiguous()
        self._after_selection(k)

    def _after_selection(self, k: torch.Tensor) -> None:
        self.pending = None
        self.tail = 0
        if self.track_attention:
            self.acc = torch.zeros(k.shape[0], k.shape[1], self.stored, dtype=torch.float32, device=k.device)

    def evict(self, keep: torch.Tensor) -> None:
        """Keep the stored slots ``keep`` ``LongTensor [B, H_s, K]`` (``-1`` = unused slot)."""
        B = keep.shape[0]
        H = self.stored_keys.shape[1] if isinstance(self.stored_keys, torch.Tensor) else self.stored_keys.codes.shape[1]
        slot = keep.clamp(min=0)
        per_head = slot.expand(B, H, slot.shape[-1])
        self.stored_keys = self._gather(self.stored_keys, per_head)
        self.stored_values = self._gather(self.stored_values, per_head)
        positions = self.positions.expand(B, max(keep.shape[1], self.positions.shape[1]), -1)
        positions = positions.gather(2, slot.expand(B, positions.shape[1], slot.shape[-1]))
        self.positions = positions.masked_fill(keep < 0, -1).contiguous()
        if self.acc is not None:
            self.acc = self.acc.gather(2, per_head)
        self.tail = 0

    @staticmethod
    def _gather(t: Stored, index: torch.Tensor) -> Stored:
        if isinstance(t, QuantizedTensor):
            return t.gather_tokens(index)
        return t.gather(2, index.unsqueeze(-1).expand(*index.shape, t.shape[-1]))

    def accumulate(
        self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor | None, scaling: float, softcap: float | None
    ) -> None:
        """Add the attention the new queries paid to every stored slot (``h2o`` decode policy)."""
        B, Hq, q, D = query.shape
        S = key.shape[2]
        real = torch.ones(B, S, dtype=torch.bool, device=key.device) if valid is None else valid
        positions = torch.arange(S - q, S, device=key.device)
        weights = torch.ones(B, q, device=key.device)
        self.acc += attention_probability_sums(query, key, positions, weights, real, scaling, softcap)

    # ----------------------------------------------------------------- reads
    def get_seq_length(self) -> int:
        return self.logical

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored
        return stored + query_length, self.logical - stored

    def kept_positions(self) -> torch.Tensor | None:
        """``LongTensor [B, H_s, S]``: the logical position held by each slot (``-1`` = unused slot)."""
        return None if self.positions is None else self.positions.long()

    def _read(self, which: int) -> torch.Tensor | None:
        """The stored slots ``[B, H, S, D]`` (dequantized; the whole prompt while its selection is pending), slot
        ``s`` holding logical position ``kept_positions()[..., s]`` (see
        :class:`~kvcache_plugins.caches.layers.ReadOnlyStates`)."""
        if self.pending is not None:
            return self.pending[which]
        stored = self.stored_values if which else self.stored_keys
        if isinstance(stored, QuantizedTensor):
            return stored.dequantize(self.dtype)
        return stored


    def nbytes(self) -> CacheBytes:
        out = _stored_bytes(self.stored_keys) + _stored_bytes(self.stored_values)
        out.indices = tensor_bytes(self.positions)
        if self.pending is not None:
            out.full_precision += tensor_bytes(self.pending[0]) + tensor_bytes(self.pending[1])
        ref = self.pending[0] if self.pending is not None else self.stored_keys
        if ref is not None:
            shape = ref.codes.shape if isinstance(ref, QuantizedTensor) else ref.shape
            hd = ref.head_dim if isinstance(ref, QuantizedTensor) else shape[-1]
            out.reference = reference_bytes(shape[0], shape[1], self.logical, hd)
        return out

    # ----------------------------------------------------------------- state
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors ``keys``, ``values`` (plain or ``.codes/.scale/.zero``), ``positions``, ``acc``; lengths and
        dtypes as metadata (see :mod:`kvcache_plugins.caches.state`)."""
        if self.pending is not None:
            raise ValueError("a layer still holds an unselected prompt: save the cache after its prefill")
        if not self.is_initialized or self.positions is None:
            return empty_state()
        tensors: dict[str, torch.Tensor] = {"positions": self.positions.contiguous()}
        put_stored(tensors, "keys", self.stored_keys)
        put_stored(tensors, "values", self.stored_values)
        if self.acc is not None:
            tensors["acc"] = self.acc.contiguous()
        meta = {"dtype": str(self.dtype), "scale_dtype": str(self.scale_dtype), "logical": self.logical, "tail": self.tail}
        return tensors, meta

    #: metadata fields of a saved layer that holds tokens
    _state_fields = ("dtype", "scale_dtype", "logical", "tail")

    def _read_stores(
        self, state: StateReader, facts: ModelFacts, shape: tuple[int, int, int, int], tail: int
    ) -> tuple[Stored, Stored]:
        """Keys and values ``[B, H, S, D]`` (``shape``), plain or quantized as the layer's specs say."""
        dtypes = self.dtype, self.scale_dtype
        keys = read_stored(state, "keys", self.key_spec, *dtypes, shape, facts.device)
        return keys, read_stored(state, "values", self.value_spec, *dtypes, shape, facts.device)

    def load_state(self, state: StateReader, facts: ModelFacts) -> None:
        """Fill this empty layer. Positions ``[B, 1 or H, S]``: per row and head ``-1`` (unused) first, then
        strictly increasing positions below ``logical``; the last ``tail`` slots hold the newest positions."""
        if is_empty(state):
            return
        state.fields(self._state_fields)
        self.dtype, self.device = state.model_dtype(facts), facts.device
        self.scale_dtype = state.dtype("scale_dtype", SCALE_DTYPES)
        H, D = facts.num_kv_heads, facts.head_dim
        positions = state.tensor("positions", torch.int32, (None, None, None))
        B, Hs, S = positions.shape
        state.require(B >= 1 and Hs in (1, H), f"positions must be [B >= 1, 1 or {H}, S], got {list(positions.shape)}")
        logical = state.int("logical", 1)
        tail = state.int("tail", 0, S)
        p = positions.long()
        used = p >= 0
        state.require(bool((p >= -1).all() & (p < logical).all()), f"positions must lie in [-1, logical={logical})")
        state.require(bool((used[..., 1:] >= used[..., :-1]).all()), "unused slots (-1) must precede the used ones")
        step = p[..., 1:] - p[..., :-1]
        state.require(bool(((step > 0) | ~used[..., :-1]).all()), "kept positions must increase strictly")
        if tail:
            newest = torch.arange(logical - tail, logical, dtype=torch.long)
            newest_kept = bool((p[..., S - tail :] == newest).all())
            state.require(newest_kept, f"the last {tail} slots must hold the newest positions")
        self.stored_keys, self.stored_values = self._read_stores(state, facts, (B, H, S, D), tail)
        acc = state.tensor("acc", torch.float32, (B, H, S), optional=not self.track_attention)
        state.require(self.track_attention or acc is None, "acc is saved only with decode_policy='h2o'")
        state.finite("acc", acc)
        self.positions = positions.to(facts.device)
        self.acc = None if acc is None else acc.to(facts.device)
        self.logical, self.tail = logical, tail
        self.is_initialized = True

    # ----------------------------------------------------------------- edits
    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens as the installed ``DynamicLayer.crop`` does: ``-n`` removes ``n``; ``n >= 0`` is
        the length to keep on releases that take a length (5.4), refused (``n > 0``) or a no-op (``0``) on newer
        ones (5.23, 5.24).

        Cropping is exact when the newest ``n`` logical positions are all still stored (tokens appended after the
        selection, or the always-kept question span at the end of the prompt, where assisted generation's first
        candidates sit); anything else raises, since positions would no longer line up.
        """
        remove = crop_count(self.logical, tokens_to_remove)
        if remove == 0:
            return
        if self.pending is not None:
            k, v = self.pending
            self.pending = (k[..., : k.shape[-2] - remove, :], v[..., : v.shape[-2] - remove, :])
            self.logical -= remove
            return
        newest = torch.arange(self.logical - remove, self.logical, device=self.positions.device, dtype=torch.int32)
        if remove > self.stored or not bool((self.positions[..., self.stored - remove :] == newest).all()):
            raise ValueError(
                f"cannot crop {remove} tokens: the newest {remove} positions are not all stored (some were evicted); "
                "a CompressedCache can only drop tokens appended after its selection or inside the kept question span"
            )
        keep = self.stored - remove
        self.stored_keys = self._cut(self.stored_keys, keep)
        self.stored_values = self._cut(self.stored_values, keep)
        self.positions = self.positions[..., :keep].contiguous()
        if self.acc is not None:
            self.acc = self.acc[..., :keep].contiguous()
        self.logical -= remove
        self.tail = max(0, self.tail - remove)

    @staticmethod
    def _cut(t: Stored, keep: int) -> Stored:
        if isinstance(t, QuantizedTensor):
            return t.keep_tokens(keep)
        return t[..., :keep, :].clone()

    def _map_rows(self, fn) -> None:
        if self.pending is not None:
            self.pending = (fn(self.pending[0]), fn(self.pending[1]))
        for name in ("stored_keys", "stored_values"):
            t = getattr(self, name)
            if isinstance(t, QuantizedTensor):
                setattr(self, name, t._map(fn))
            elif t is not None:
                setattr(self, name, fn(t))
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.acc is not None:
            self.acc = fn(self.acc)



def _padding_from_mask(mask: torch.Tensor | None, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Left padding per row, read off the prompt's attention mask (its last query sees every real key)."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    last = mask[:, 0, -1, -n:]
    visible = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return (n - visible.sum(-1)).long().expand(batch).to(device)


def _per_row(
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


@register_cache("CompressedCache")
class CompressedCache(ChunkedPrefill, PersistentCache, DynamicCache):
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
            :mod:`kvcache_plugins.caches.ragged`), or a :class:`~kvcache_plugins.selection.budget.Budget`.
        quant: a :class:`~kvcache_plugins.MixedPrecisionCache` spec for the kept and the new tokens (per-token
            groups; e.g. ``"int8"``, ``"int4"``, ``"mixed_l0"``, ``{0: 16, "default": 4}``).
        group_size, scale_dtype: quantization grouping and scale dtype, as in ``MixedPrecisionCache``.
        decode_policy: ``"h2o"`` (evict the lowest accumulated attention) or ``"streaming"`` (evict the oldest)
            once a layer holds ``max_tokens + evict_every`` tokens; needs ``max_tokens`` and the model.
        evict_every: generation steps between evictions.
        recent_tokens: newest tokens never evicted during generation (default ``evict_every``).
        seed: seed of the random selector.
        lowrank: store the kept prompt tokens as rank-``r`` SVD factors (an int in ``1..head_dim``, a
            ``(key_rank, value_rank)`` pair or a per-layer dict/list; see :mod:`kvcache_plugins.caches.lowrank`);
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
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        if model is None and config is None:
            raise TypeError("CompressedCache needs the model it will serve (or, for query-free selectors, its config)")
        cfg = text_config(model if model is not None else config)
        self.selector = make_selector(selector, **selector_options)
        if retention is None and max_tokens is None:
            raise ValueError("give a budget: retention (a fraction of the context in (0, 1]) and/or max_tokens")
        retention = None if retention is None else check_fraction("retention", retention)
        max_tokens = None if max_tokens is None else check_int("max_tokens", max_tokens, 1)
        check_choice("granularity", granularity, GRANULARITIES)
        self.budget = make_budget(budget)
        if granularity not in self.budget.granularities:
            raise ValueError(
                f"budget {self.budget.name!r} works with granularity "
                f"{' or '.join(map(repr, self.budget.granularities))}, got {granularity!r}"
            )
        if self.budget.ragged and (model is None or decode_policy is not None):
            raise ValueError(
                f"budget {self.budget.name!r} keeps different counts per head: it needs the model (to mask each head's "
                "unused slots) and no decode_policy"
            )
        if question is not None:
            if question_len is not None:
                raise ValueError("give either question_len or question, not both")
            if tokenizer is None:
                raise ValueError("question= needs the tokenizer (tokenizer=...) to count its tokens")
            question_len = len(tokenizer(question, add_special_tokens=False).input_ids)
        if getattr(self.selector, "needs_question", self.selector.name == "q2c") and question_len is None:
            raise ValueError(
                f"selector {self.selector.name!r} scores the context by the question's attention: give question_len "
                "(tokens of the question at the end of the prompt) or question= with tokenizer="
            )
        question_len = None if question_len is None else check_row_counts("question_len", question_len)
        if self.selector.needs_queries and model is None:
            raise ValueError(
                f"selector {self.selector.name!r} needs the model's queries: build the cache as "
                "CompressedCache(model, ...)"
            )
        check_choice("decode_policy", decode_policy, (*DECODE_POLICIES, None))
        if decode_policy is not None:
            if max_tokens is None:
                raise ValueError("decode_policy bounds the cache during generation: it needs max_tokens")
            if model is None:
                raise ValueError("decode_policy evicts right after each layer's attention: it needs the model")
        evict_every = check_int("evict_every", evict_every, 1)
        recent_tokens = evict_every if recent_tokens is None else check_int("recent_tokens", recent_tokens, 0)
        seed = check_int("seed", seed)
        check_choice("lowrank_keys", lowrank_keys, ("pre_rope", "post_rope"))
        if lowrank is not None and decode_policy is not None:
            raise ValueError("lowrank storage keeps its factored slots: it cannot be combined with a decode_policy")
        if scale_dtype is not None and scale_dtype not in META_DTYPES:
            raise ValueError(f"scale_dtype must be one of {META_DTYPES}, got {scale_dtype!r}")
        sinks = check_int("sink_tokens", self.selector.default_sinks if sink_tokens is None else sink_tokens, 0)

        super().__init__(config=cfg)
        self.model_config = cfg
        self.layer_specs = self._quant_specs(quant, cfg, group_size)
        self.retention = retention
        self.max_tokens = max_tokens
        self.question_len = question_len
        self.sink_tokens = sinks
        self.granularity = granularity
        self.decode_policy = decode_policy
        self.evict_every = evict_every
        self.recent_tokens = recent_tokens
        self.seed = seed
        self.workspace = Workspace()
        self.compressed_layers: list[int] = []
        from .ragged import RaggedLayer  # imports this module

        layer_class = RaggedLayer if self.budget.ragged else CompressedLayer
        self.layer_ranks = None
        if lowrank is not None:
            if self.budget.ragged:
                raise ValueError(
                    f"budget={self.budget.name!r} stores each head's tokens ragged; low-rank storage (lowrank=) works "
                    "with the 'uniform' and 'pyramid' budgets"
                )
            from ..quant.lowrank import resolve_ranks
            from .lowrank import LowRankCompressedLayer, check_layers, resolve_rope

            self.layer_ranks = resolve_ranks(lowrank, cfg.num_hidden_layers, head_dim(cfg))
            check_layers(self.layer_ranks, self.layer_specs, "CompressedCache")
            rope = resolve_rope(lowrank_keys, model, self.layer_ranks)
        self.lowrank_keys = lowrank_keys
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer:
                spec = self.layer_specs[i]
                if self.layer_ranks is not None:
                    self.layers[i] = LowRankCompressedLayer(
                        spec.key, spec.value, self.layer_ranks[i], scale_dtype, self.workspace, rope=rope
                    )
                else:
                    self.layers[i] = layer_class(
                        spec.key, spec.value, scale_dtype, self.workspace, track_attention=decode_policy == "h2o"
                    )
                self.compressed_layers.append(i)
        if not self.compressed_layers:
            raise ValueError("this model has no full-attention layers for CompressedCache to compress")
        #: decode steps of quantized plain CompressedLayers attend from the packed codes (see ``fused`` above)
        self.fused = bool(
            fused and model is not None
            and any(self._fuses(self.layers[i]) for i in self.compressed_layers)
        )
        #: layer-steps attended by the fused kernel so far (for tests and benchmarks)
        self.fused_steps = 0
        #: the decode path taken and why (:class:`~kvcache_plugins.attention.paths.DecodePath`; set by ``warmup()``
        #: or the first decode step)
        self.decode_path: paths.DecodePath | None = None
        self._model_ref = weakref.ref(model) if model is not None else None
        self._module_ids: frozenset[int] = frozenset()
        if model is not None:
            observer.attach(model)
            self._module_ids = frozenset(id(m) for m in observer.attention_modules(model))
            install_prefill_hook(model)
        self._clear_prompt_state()

    @staticmethod
    def _quant_specs(quant: Spec | None, cfg: Any, group_size: int) -> list[LayerQuantSpec]:
        specs = resolve_layer_specs(
            "full" if quant is None else quant, cfg.num_hidden_layers, group_size=group_size, head_dim=head_dim(cfg)
        )
        for i, spec in enumerate(specs):
            for t in (spec.key, spec.value):
                if t.quantized and t.axis != "token":
                    raise ValueError(
                        f"layer {i}: CompressedCache quantizes per token (evicting single tokens would break "
                        "per-channel groups); use a per-token spec such as 'int4' or 'mixed_l0'"
                    )
            if spec.quantized and (spec.residual_length or spec.sink_tokens):
                raise ValueError(
                    f"layer {i}: CompressedCache stores kept tokens quantized as a whole; residual windows and "
                    "full-precision sinks are MixedPrecisionCache options (use sink_tokens= to protect tokens)"
                )
        return specs

    def _clear_prompt_state(self) -> None:
        self.peak_prefill_bytes = 0  # largest memory_footprint().total seen while the prompt was being selected
        self.layout: PromptLayout | None = None
        self._budget: torch.Tensor | None = None
        self._layer_budgets: torch.Tensor | None = None  # [L, B] per compressed layer (the budget allocator's)
        self._global_sum: torch.Tensor | None = None
        self._global_count = 0

    # ------------------------------------------------------------------- API
    @property
    def observed(self) -> bool:
        return self._model_ref is not None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._chunk is not None:  # a chunked prefill (see caches/chunked.py)
            return self._chunk_update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if not isinstance(layer, CompressedLayer):
            return layer.update(key_states, value_states, *args, **kwargs)
        prompt = layer.logical == 0 and layer.pending is None
        if self.fused and self._fuses(layer):
            for idx in self.compressed_layers:
                other = self.layers[idx]
                if getattr(other, "pending_step", None) is not None:
                    other.pending_step = None
                    raise RuntimeError(
                        "a fused decode step of this CompressedCache was never attended: the model's attention did "
                        "not run through kvcache_plugins' attention function. Use the cache with the model it was "
                        "built with, or build it with fused=False."
                    )
            out = layer.update(key_states, value_states, fused=True)
        else:
            out = layer.update(key_states, value_states)
        if prompt:
            # the prompt of this layer is held whole until its selection: the moment prefill memory peaks
            self.peak_prefill_bytes = max(self.peak_prefill_bytes, self.memory_footprint().total)
        if self.observed:
            observer.announce(self, layer_idx)
        elif prompt:
            self._select_without_model(layer_idx)
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

    def warmup(self, model: Any, batch_size: int = 1) -> float:
        """Compile the fused decode kernels now rather than inside the first ``generate`` (a few seconds per kernel,
        more on a cold compiler cache); returns the seconds spent. Call it on the unused cache, with the model it was
        built for, and the batch size you will generate with (1, or any larger: larger batches share one kernel).
        See :func:`kvcache_plugins.caches.warmup.warm_up`."""
        return warm_up(self, model, batch_size)

    def memory_footprint(self) -> CacheBytes:
        """Bytes held now: stored K/V (codes, scales, zeros or full precision) plus kept-position indices.
        Quantized slots grow in place with spare capacity: :meth:`memory_reserved` reports that room apart."""
        return layers_nbytes(self.layers)

    def memory_reserved(self) -> int:
        """Bytes allocated beyond the stored slots: growth room of the quantized slots' buffers."""
        return sum(
            store.reserved_nbytes()
            for layer in self.layers
            for store in (getattr(layer, "_key_store", None), getattr(layer, "_value_store", None))
            if isinstance(store, GrowableQuantized)
        )

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        """Constructor arguments, per-layer specs and the prompt layout (layers save themselves)."""
        lay = self.layout
        layout = None if lay is None else {
            "length": lay.length, "pad": lay.pad.tolist(), "question_len": lay.question_len.tolist(),
            "sinks": lay.sinks.tolist(),
        }
        specs = [layer_spec_state(s) for s in self.layer_specs]
        return {"args": self._state_args(), "layer_specs": specs, "layout": layout}

    def _state_args(self) -> dict[str, Any]:
        options = {k: v for k, v in vars(self.selector).items() if not k.startswith("_")}
        return {
            "selector": self.selector.name, "selector_options": options, "retention": self.retention,
            "max_tokens": self.max_tokens, "question_len": self.question_len, "sink_tokens": self.sink_tokens,
            "granularity": self.granularity, "decode_policy": self.decode_policy, "evict_every": self.evict_every,
            "recent_tokens": self.recent_tokens, "seed": self.seed, "budget": budget_state(self.budget),
            **self._lowrank_state(),
        }

    def _lowrank_state(self) -> dict[str, Any]:
        """``lowrank`` (one ``[key_rank, value_rank]`` per layer) and ``lowrank_keys``, only when low rank is used."""
        if self.layer_ranks is None:
            return {}
        return {"lowrank": [list(r) for r in self.layer_ranks], "lowrank_keys": self.lowrank_keys}

    @staticmethod
    def _read_lowrank(a: StateReader, model: Any) -> dict[str, Any]:
        """The constructor's ``lowrank``/``lowrank_keys`` from :meth:`_lowrank_state` (both present or neither)."""
        if not a.has("lowrank") and not a.has("lowrank_keys"):
            return {}
        from .lowrank import KEY_SPACES, read_ranks

        cfg = text_config(model)
        ranks = read_ranks(a, "lowrank", int(cfg.num_hidden_layers), head_dim(cfg))
        return {"lowrank": ranks, "lowrank_keys": a.str("lowrank_keys", KEY_SPACES)}

    @classmethod
    def from_state(cls, state: StateReader, model: Any, tokenizer: Any = None) -> CompressedCache:
        """An empty cache built from saved arguments, each checked for type and range."""
        state.fields(["args", "layer_specs", "layout"])
        cfg = text_config(model)
        specs = [read_layer_spec(s, head_dim(cfg)) for s in state.items("layer_specs", int(cfg.num_hidden_layers))]
        return cls._from_state_args(state.sub("args"), model, specs, tokenizer)

    @classmethod
    def _from_state_args(cls, a: StateReader, model: Any, specs: list, tokenizer: Any) -> CompressedCache:
        a.fields(
            ["selector", "selector_options", "retention", "max_tokens", "question_len", "sink_tokens", "granularity",
             "decode_policy", "evict_every", "recent_tokens", "seed", "budget"],
            ["lowrank", "lowrank_keys"],
        )
        from ..selection import selector_names

        options = a.raw("selector_options")
        a.require(
            isinstance(options, dict)
            and all(isinstance(v, (int, float, str, bool)) or v is None for v in options.values()),
            "selector_options must map names to plain values",
        )
        qlen = a.raw("question_len")
        if qlen is not None and not isinstance(qlen, int):
            qlen = a.int_list("question_len")
        kwargs = dict(
            selector=a.str("selector", selector_names()), retention=a.float("retention", 1e-12, 1.0, optional=True),
            max_tokens=a.int("max_tokens", 1, optional=True), question_len=qlen, sink_tokens=a.int("sink_tokens"),
            granularity=a.str("granularity", GRANULARITIES), quant=specs,
            decode_policy=a.str("decode_policy", DECODE_POLICIES, optional=True), evict_every=a.int("evict_every", 1),
            recent_tokens=a.int("recent_tokens"), seed=a.int("seed", -(2**63), 2**63 - 1),
            budget=read_budget(a.sub("budget")), **cls._read_lowrank(a, model),
        )
        try:
            return cls(model, **kwargs, **options)
        except (TypeError, ValueError) as err:  # the constructor's own checks of what the fields did not pin down
            raise a.error(f"arguments rejected: {err}") from None

    def finish_state(self, state: StateReader) -> None:
        """The layout fits the arguments and every layer: rows, lengths, and no kept position in the padding."""
        layers = [self.layers[i] for i in self.compressed_layers]
        held = {id(layer): layer.kept_positions() for layer in layers}  # [B, 1 or H, S] (-1 unused), or None
        filled = [layer for layer in layers if held[id(layer)] is not None]
        if state.raw("layout") is None:
            state.require(not filled, "a cache holding tokens needs its prompt layout")
            return
        lay = state.sub("layout")
        lay.fields(["length", "pad", "question_len", "sinks"])
        length = lay.int("length", 1)
        pad = lay.int_list("pad", None, 0, length - 1)
        B = len(pad)
        lay.require(B >= 1, "the layout has no row")
        question = lay.int_list("question_len", B, 0, length)
        sinks = lay.int_list("sinks", B, self.sink_tokens, self.sink_tokens)
        given = 0 if self.question_len is None else self.question_len
        if isinstance(given, list):
            lay.require(B % len(given) == 0, f"{B} rows cannot come from question_len {given}")
            given = [q for q in given for _ in range(B // len(given))]
        else:
            given = [given] * B
        lay.require(question == given, f"question spans {question} differ from question_len {self.question_len}")
        lay.require(
            all(p + q + s <= length for p, q, s in zip(pad, question, sinks)),
            "padding, sinks and question exceed the prompt",
        )
        lay.require(len(filled) == len(layers), "some compressed layers are empty, others are not")
        if self.decode_policy is not None:
            protected = max(q + s for q, s in zip(question, sinks)) + self.recent_tokens
            lay.require(
                protected <= self.max_tokens, f"max_tokens={self.max_tokens} cannot hold the {protected} protected tokens"
            )
            most = self.max_tokens + self.evict_every - 1
            lay.require(all(layer.stored <= most for layer in filled), f"a layer holds more than the {most} slots allowed")
        for layer in filled:
            p = held[id(layer)].cpu()
            lay.require(p.shape[0] == B, f"a layer holds {p.shape[0]} rows, the layout {B}")
            lay.require(layer.logical == filled[0].logical, "compressed layers disagree on the tokens seen")
            lay.require(layer.logical >= length, f"a layer has seen {layer.logical} tokens, fewer than the prompt")
            ragged = getattr(layer, "ragged", False)
            lay.require(
                not ragged or layer.logical - layer.generated == length,
                f"a ragged layer's prompt part covers {layer.logical - layer.generated if ragged else 0} positions, "
                f"the prompt {length}",
            )
            start = torch.tensor(pad).view(B, 1, 1)
            lay.require(bool(((p < 0) | (p >= start)).all()), "a kept position lies in a row's left padding")
            for b in range(B):  # sinks and the question span are always kept, by every head
                protected = [*range(pad[b], pad[b] + sinks[b]), *range(length - question[b], length)]
                if protected:
                    kept = (p[b].unsqueeze(-1) == torch.tensor(protected)).any(1)
                    lay.require(bool(kept.all()), f"row {b} does not keep its sinks and question span")
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                continue
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                lay.require(layer.keys.shape[0] == B, f"a layer holds {layer.keys.shape[0]} rows, the layout {B}")
                lay.require(layer.get_seq_length() == filled[0].logical, "layers disagree on the tokens seen")
        self.layout = PromptLayout(length, torch.tensor(pad), torch.tensor(question), torch.tensor(sinks))

    def reset(self) -> None:
        super().reset()
        self._clear_prompt_state()

    # -------------------------------------------------------- prompt layout
    def _layout_for(self, batch: int, n: int, pad: torch.Tensor, rows: torch.Tensor | None = None) -> PromptLayout:
        """The prompt's layout; ``rows`` (the prompt's keys or ids, batch first) tells generate()'s repeated rows."""
        qlen = _per_row(0 if self.question_len is None else self.question_len, batch, "question_len", rows)
        sinks = torch.full((batch,), self.sink_tokens, dtype=torch.long)
        layout = PromptLayout(n, pad.cpu().long(), qlen, sinks)
        real = layout.real_len
        too_long = (qlen + sinks) > real
        if bool(too_long.any()):
            b = int(too_long.nonzero()[0])
            raise ValueError(
                f"row {b}: question span ({int(qlen[b])} tokens) plus sinks ({self.sink_tokens}) is longer than the "
                f"prompt ({int(real[b])} tokens)"
            )
        if self.decode_policy is not None:
            protected = int((qlen + sinks).max()) + self.recent_tokens
            if protected > self.max_tokens:
                raise ValueError(
                    f"max_tokens={self.max_tokens} cannot hold the tokens generation always keeps: sinks + question + "
                    f"recent_tokens = {protected}"
                )
        self._budget = context_budget(layout, self.retention, self.max_tokens)
        self._layer_budgets = self.budget.layer_budgets(self._budget, layout.context_len, len(self.compressed_layers))
        return layout

    # ------------------------------------------------------------ selection
    def _score(self, layer_idx: int, query: torch.Tensor | None, scaling: float, softcap: float | None) -> torch.Tensor:
        layer = self.layers[layer_idx]
        keys = layer.pending[0]
        ctx = ScoreContext(
            layer_idx, keys, query if self.selector.needs_queries else None, scaling, softcap,
            self.layout.to(keys.device), self.seed, layer.pending[1],
        )
        scores = self.selector.score(ctx).float()
        return scores.expand(keys.shape[0], scores.shape[1], keys.shape[2])

    def _apply_selection(self, layer_idx: int, query, scaling, softcap) -> None:
        layer = self.layers[layer_idx]
        budget = self._layer_budgets[self.compressed_layers.index(layer_idx)]
        if bool((budget >= self.layout.context_len).all()):
            layer.keep_all()
            return
        scores = self._score(layer_idx, query, scaling, softcap)
        layout = self.layout.to(scores.device)
        if self.granularity == "global":
            mean = scores.mean(1, keepdim=True)
            self._global_sum = mean if self._global_sum is None else self._global_sum + mean
            self._global_count += 1
            if layer_idx != self.compressed_layers[-1]:
                return
            keep = select(self._global_sum / self._global_count, layout, budget)
            self._global_sum, self._global_count = None, 0
            self._commit(self.compressed_layers, keep)
            return
        if self.granularity == "head":
            H = layer.pending[0].shape[1]
            scores = scores.expand(scores.shape[0], H, scores.shape[2])
            if self.budget.ragged:
                device = scores.device
                layer.compress_ragged(
                    self.budget.keep(scores, layout.context_mask(device), layout.protected_mask(device), budget)
                )
                return
            keep = select(scores, layout, budget)
        else:
            keep = select(scores.mean(1, keepdim=True), layout, budget)
        self._commit([layer_idx], keep)

    def _commit(self, layer_indices: list[int], keep: torch.Tensor) -> None:
        """Apply ``keep`` (``[B, H_s, S]`` positions, ``-1`` unused) to the given layers."""
        if not self.observed and bool((keep < 0).any()):
            raise ValueError(
                "the rows of this batch keep different numbers of tokens (different question lengths); a cache "
                "without the model cannot mask the unused slots: build it with the model"
            )
        for idx in layer_indices:
            self.layers[idx].compress(keep)

    def _select_without_model(self, layer_idx: int) -> None:
        layer = self.layers[layer_idx]
        k = layer.pending[0]
        if self.layout is None:
            self.layout = self._layout_for(k.shape[0], k.shape[2], torch.zeros(k.shape[0], dtype=torch.long), k)
        self._apply_selection(layer_idx, None, 1.0, None)

    # ----------------------------------------------------- observer protocol
    def adjust_attention_mask(self, layer_idx, module, attention_mask, query, key):
        if id(module) not in self._module_ids:
            return attention_mask
        layer = self.layers[layer_idx]
        if layer.pending is not None:
            if self.layout is None:
                n = layer.pending[0].shape[2]
                pad = _padding_from_mask(attention_mask, query.shape[0], n, query.device)
                self.layout = self._layout_for(query.shape[0], n, pad, layer.pending[0])
            return attention_mask
        # a fused step hands the attention only the new tokens; the mask still covers [stored slots, new]
        step = getattr(layer, "pending_step", None)
        kv = key.shape[2] if step is None else step.body_len + key.shape[2]
        valid = layer.valid_slots()
        if valid is None:
            if attention_mask is None or attention_mask.shape[-1] == kv:
                return attention_mask
            positions = layer.kept_positions()[:, 0, :]  # every slot holds a token; left padding must stay hidden
            valid = positions >= self.layout.pad.to(positions.device).view(-1, 1)
        # The model builds one mask for all full-attention layers, sized for the first one; layers may hold other
        # slot counts (pyramid / adakv budgets). So the stored slots' columns come from this layer's own slot mask
        # (every stored slot is a real past token), and only the new tokens' columns from the model's mask.
        q = query.shape[2]
        if valid.dim() == 2:  # [B, S]: one slot set per row
            valid = valid.unsqueeze(1)
        else:  # [B, H_kv, S]: per head (ragged layers); each query head follows its KV head
            valid = valid.repeat_interleave(query.shape[1] // valid.shape[1], dim=1)
        B, Hc = valid.shape[:2]
        S = kv - q  # slots before the new tokens (``valid`` also covers the new tokens, just stored)
        past = valid[..., :S].unsqueeze(2).expand(B, Hc, q, S)  # [B, 1 or H_q, q, S]
        if attention_mask is None:
            new = torch.ones(q, q, dtype=torch.bool, device=key.device).tril().expand(B, Hc, q, q)
        else:
            new = attention_mask[..., attention_mask.shape[-1] - q :]
            H = max(Hc, new.shape[1])
            past, new = past.expand(B, H, q, S), new.expand(B, H, q, q)
            if attention_mask.dtype != torch.bool:
                hidden = torch.full((), torch.finfo(attention_mask.dtype).min, dtype=attention_mask.dtype)
                past = torch.zeros((), dtype=attention_mask.dtype).to(key.device).where(past, hidden.to(key.device))
        return torch.cat([past, new], dim=-1)

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
        out = None
        if (
            id(module) in self._module_ids
            and kwargs.get("s_aux") is None
            and not kwargs.get("sliding_window")
            and (attention_mask is None or attention_mask.shape[1] == 1)
        ):
            scaling = kwargs.get("scaling")
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            weights = layer.acc is not None
            name = paths.route(self, layer, step, query, scaling, kwargs.get("softcap"), weights)
            if name != "reference":
                out = step.attend(query, attention_mask, scaling, kwargs.get("softcap"), weights=weights, path=name)
        if out is None:  # another model's module, attention sinks as logits, a window, or no compiler
            key, value = step.dense()
            return original(module, query, key, value, attention_mask, **kwargs)
        if layer.acc is not None:  # h2o: the kernel's probabilities, summed over the query heads of each KV head
            B, Hq, n, L = out[1].shape
            layer.acc += out[1].view(B, layer.acc.shape[1], -1, L).sum(2)
            layer.step_accumulated = True
        self.fused_steps += 1
        return out[0], None

    def observe_attention(self, layer_idx, module, query, key, attention_mask, scaling, softcap) -> None:
        if id(module) not in self._module_ids:
            return
        if self._chunk is not None:
            self._chunk_observe(layer_idx, query, key, scaling, softcap)
            return
        layer = self.layers[layer_idx]
        if layer.pending is not None:
            self._apply_selection(layer_idx, query, scaling, softcap)
            return
        if layer.acc is not None and not layer.step_accumulated:
            layer.accumulate(query, key, layer.valid_slots(), scaling, softcap)
        layer.step_accumulated = False
        if self.decode_policy is not None and layer.stored >= self.max_tokens + self.evict_every:
            self._evict(layer)

    def _evict(self, layer: CompressedLayer) -> None:
        """Cut ``layer`` back to ``max_tokens`` slots per row (see the module docstring for what stays).

        Every head of a row holds the same number of slots, with sinks first, question and decoded tokens last,
        so the protected slots can be read off the first head's positions even when heads keep different tokens.
        """
        pos = layer.positions.long()
        B, _, S = pos.shape
        layout = self.layout.to(pos.device)
        first = pos[:, 0, :]
        valid = first >= 0
        start = layout.pad.view(B, 1)
        sink = (first >= start) & (first < start + layout.sinks.view(B, 1))
        question = (first >= layout.length - layout.question_len.view(B, 1)) & (first < layout.length)
        recent = torch.arange(S, device=pos.device).view(1, S) >= S - self.recent_tokens
        protected = valid & (sink | question | recent)
        candidates = valid & ~protected
        budget = (self.max_tokens - protected.sum(-1)).clamp(min=0)
        if self.decode_policy == "h2o":
            scores = layer.acc if self.granularity == "head" else layer.acc.mean(1, keepdim=True)
        else:
            scores = pos.float() if self.granularity == "head" else first.float().unsqueeze(1)
        layer.evict(select_slots(scores, candidates, protected, budget))

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

