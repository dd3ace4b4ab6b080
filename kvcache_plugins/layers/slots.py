"""Slot storage of one selecting layer: :class:`CompressedLayer` (the layer kind ``"compressed"``).

A layer holds the slots a selection kept, each with the logical position it stands for::

    keys, values   [B, H, S, D]   plain tensors or per-token QuantizedTensor (in buffers that grow in place)
    positions      int32 [B, H_s, S]   H_s = 1 (one slot set per row) or H (per head); -1 marks an unused slot
    acc            float32 [B, H, S]   attention accumulated during generation (h2o decode eviction only)

Lifecycle: the prompt (first forward on an empty layer) is held whole as ``pending`` until the cache applies a
selection (:meth:`CompressedLayer.compress`, :meth:`~CompressedLayer.keep_all` or
:meth:`~CompressedLayer.adopt`); later tokens are appended (:meth:`~CompressedLayer.update`) and may be evicted
(:meth:`~CompressedLayer.evict`). The layer never decides what to keep: the cache asks it, with positions the
selection policy (:mod:`kvcache_plugins.selection`) chose. Kept keys keep their RoPE rotation and new tokens their
original positions, so ``get_seq_length()`` is the logical length while masks cover only the stored slots
(``get_mask_sizes`` reports ``kv_offset = logical - stored``). Rows of a batch that keep fewer tokens than others
(left padding, per-row question lengths) hold unused slots at the front of the row, masked in every attention call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from .._compat import crop_count
from ..attention.fused import FUSED_MAX_QUERIES, FusedStep, Layout, chunk_tokens
from ..persist.state import (
    SCALE_DTYPES,
    ModelFacts,
    StateReader,
    empty_state,
    is_empty,
    put_stored,
    read_stored,
    register_layer,
)
from ..quant.groupwise import QuantizedTensor, quantize, quantize_step
from ..quant.growable import GrowableQuantized
from ..quant.spec import TensorQuantSpec
from .accounting import CacheBytes, reference_bytes, tensor_bytes
from .base import (
    GrowingRows, RowEdits, Stored, StoredLayer, Workspace, _rows_heads_dim, _slots, _stored_bytes, append_slots, assemble,
)


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

    def __set__(self, layer: Any, value: Stored | GrowableQuantized | None) -> None:
        grow = isinstance(value, QuantizedTensor) and value.num_tokens
        layer.__dict__[self.slot] = GrowableQuantized(value) if grow else value


@register_layer("compressed")
class CompressedLayer(StoredLayer, RowEdits, DynamicLayer):
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
    positions = GrowingRows("_positions")
    acc = GrowingRows("_acc")

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
        full = assemble(
            self.workspace, role, new, stored.num_tokens, lambda out: stored.dequantize(new.dtype, out=out)
        )
        grown = self.__dict__["_key_store" if role == "key" else "_value_store"]
        if not isinstance(grown, GrowableQuantized):  # no slot kept
            return stored.cat(self._store(new, spec)), full
        grown.append(self._store(new, spec))  # in place: the packed slots are never concatenated
        return grown, full

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
        self._accept(key_states, value_states)
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
        append_slots(self, "_positions", new_pos.expand(B, Hs, n))
        if self.acc is not None:
            append_slots(self, "_acc", self.acc.new_zeros(*self.acc.shape[:2], n))
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
        :class:`~kvcache_plugins.layers.base.ReadOnlyStates`)."""
        if self.pending is not None:
            return self.pending[which]
        stored = self.stored_values if which else self.stored_keys
        if isinstance(stored, QuantizedTensor):
            return stored.dequantize(self.dtype)
        return stored


    def reserved_nbytes(self) -> int:
        """Bytes allocated beyond the stored slots: growth room of the quantized slots' buffers."""
        stores = (self.__dict__.get("_key_store"), self.__dict__.get("_value_store"))
        return sum(store.reserved_nbytes() for store in stores if isinstance(store, GrowableQuantized))

    def nbytes(self) -> CacheBytes:
        out = _stored_bytes(self.stored_keys) + _stored_bytes(self.stored_values)
        out.indices = tensor_bytes(self.positions)
        if self.pending is not None:
            out.full_precision += tensor_bytes(self.pending[0]) + tensor_bytes(self.pending[1])
        ref = self.pending[0] if self.pending is not None else self.stored_keys
        if ref is not None:
            B, H, D = _rows_heads_dim(ref)
            out.reference = reference_bytes(B, H, self.logical, D)
        return out

    # ----------------------------------------------------------------- state
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors ``keys``, ``values`` (plain or ``.codes/.scale/.zero``), ``positions``, ``acc``; lengths and
        dtypes as metadata (see :mod:`kvcache_plugins.persist.state`)."""
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
            if hasattr(t, "_map"):  # packed or low-rank stores map every tensor they hold
                setattr(self, name, t._map(fn))
            elif t is not None:
                setattr(self, name, fn(t))
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.acc is not None:
            self.acc = fn(self.acc)

