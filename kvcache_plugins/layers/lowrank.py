"""Low-rank (SVD) KV storage: the layers of ``LowRankCache`` and of a selecting ``CompressedCache``.

Per layer and KV head, the prompt's keys and values (ranks set separately, per layer) are stored as rank-``r``
factors ``left [T, r] @ right [r, D]`` from a truncated SVD in fp32 (:mod:`kvcache_plugins.quant.lowrank`).
Tokens stored after the prompt (generated tokens, later turns) go to a tail at model precision, or quantized
per token when a quantization spec says so; with a quantization spec the factors are quantized at the same width.
Prefill chunks (``generate(prefill_chunk_size=...)``) are folded into the factors of a ``LowRankCache``.

**Keys are factored before RoPE** (``keys="pre_rope"``, the default), as Palu and xKV do: the cache receives
post-RoPE keys ``k_p = R_p x_p``, undoes the rotation per slot (``x_p = R_p^-1 k_p``, with the model's own rotary
embedding), factors ``X``, and re-applies ``R_p`` to the reconstructed rows at every read. RoPE rotates each token by
its own angle, which spreads a low-rank set of keys over more directions; on the embedded Qwen2 model (head_dim 32,
512 / 2048 tokens) rank 16 leaves a 3.0% / 2.8% relative key error before RoPE against 18.3% / 23.5% after it, and
keeps exact-match retrieval where post-RoPE rank 16 (even 24) loses it (``python -m
kvcache_plugins.bench.lowrank_rope``; README). The rotation
uses slot positions (logical positions, left padding included): a constant shift per row is a fixed rotation of
the whole row block, which changes neither the rank nor, being re-applied exactly, the result.
``keys="post_rope"`` factors the keys as received (no rotary embedding needed, e.g. a cache built from a config).
Values carry no rotation and are always factored as received.

**Attention reconstructs.** Each forward, ``update`` returns the stored slots reconstructed (``left @ right``,
re-rotated for pre-RoPE keys, then the tail) followed by the new tokens, as ``[B, H, T + n, D]`` tensors written
into the cache's shared :class:`~kvcache_plugins.layers.base.Workspace`; the transient per call is one
``[B, H, T, D]`` matmul result in the model dtype, for pre-RoPE keys also ``cos``/``sin`` ``[B, T, D]`` in fp32 and
one rotated copy of the keys, plus the workspace buffers (:meth:`Workspace.nbytes`); none of it is cache bytes.
Using the factors directly (``q . k_t = (q . right^T) . left_t``, cheaper when ``r < D``) is not done: pre-RoPE
keys need the per-position rotation on every read, which the factored form cannot absorb.

With a selection (``CompressedCache(..., lowrank=32)`` or the spec ``q2c:0.5+svd:32``) the selected tokens are
factored: eviction happens first, so the result equals the masking oracle applied to the reconstructed keys and
values of the kept tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from .._compat import crop_count
from ..persist.state import (
    SCALE_DTYPES,
    ModelFacts,
    StateReader,
    empty_state,
    is_empty,
    register_layer,
)
from ..quant.lowrank import LayerRanks, LowRankStore
from ..quant.spec import LayerQuantSpec, TensorQuantSpec
from .accounting import CacheBytes, reference_bytes
from .base import RowEdits, StoredLayer, Workspace, _stored_bytes
from .lowrank_store import _key_space, _read_layout, extend_store, put_store, read_store, rerotate, store_prompt
from .rope import RopeRotation
from .slots import CompressedLayer

# ------------------------------------------------------------------------------------------------ RoPE








# ------------------------------------------------------------------------------------------------ storage helpers
































# ------------------------------------------------------------------------------------------------ standalone layer


@register_layer("lowrank")
class LowRankLayer(StoredLayer, RowEdits, DynamicLayer):
    """A ``DynamicLayer`` that stores the first forward's keys/values as rank-``r`` factors (see the module docs).

    ``update(k, v)`` takes ``[B, H, n, D]`` states and returns ``[B, H, T + n, D]``: the stored slots
    reconstructed, then the new states unchanged. The first call (the prompt) returns its own states, so the
    prompt attends to itself exactly; it is factored as it is stored. Further multi-token calls before any
    single-token one or a ``crop`` (prefill chunks) are folded into the factors: the stored rows, reconstructed, and
    the new rows are factored again at rank ``r``. Tokens after that (decoding, later turns, assisted decoding's
    verification forwards, which follow a crop and are never single tokens) go to the tail.
    """

    is_sliding = False
    is_croppable = True

    def __init__(
        self, ranks: LayerRanks, spec: LayerQuantSpec, scale_dtype: torch.dtype | None = None,
        workspace: Workspace | None = None, rope: RopeRotation | None = None,
    ) -> None:
        super().__init__()
        self.ranks = ranks
        self.rope = rope if ranks[0] is not None else None
        self.spec = spec
        self.scale_dtype = scale_dtype
        self.workspace = workspace
        self.key_store: LowRankStore | None = None
        self.value_store: LowRankStore | None = None
        self.folding = True  # multi-token calls are prefill chunks until a crop says otherwise

    def __repr__(self) -> str:
        keys = "pre-RoPE" if self.rope is not None else "post-RoPE"
        return f"LowRankLayer(k_rank={self.ranks[0]} {keys}, v_rank={self.ranks[1]}, {self.spec.describe()})"

    def _positions(self) -> torch.Tensor:
        return torch.arange(self.key_store.factored_tokens).view(1, 1, -1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self._accept(key_states, value_states)
        if self.key_store is None:
            keys = key_states
            if self.rope is not None:
                keys = self.rope.apply(key_states, torch.arange(keys.shape[-2]).view(1, 1, -1), inverse=True)
            self.key_store = store_prompt(keys, self.ranks[0], self.spec.key, self.scale_dtype)
            self.value_store = store_prompt(value_states, self.ranks[1], self.spec.value, self.scale_dtype)
            return key_states, value_states
        old_keys, old_values = self.key_store, self.value_store
        self.key_store, keys = extend_store(
            self.key_store, key_states, self.spec.key, self.scale_dtype, self.workspace, "key"
        )
        self.value_store, values = extend_store(
            self.value_store, value_states, self.spec.value, self.scale_dtype, self.workspace, "value"
        )
        keys = rerotate(keys, old_keys, self.rope, torch.arange(old_keys.factored_tokens).view(1, 1, -1))
        if key_states.shape[-2] > 1 and self.folding:  # a prefill chunk: fold it into the factors
            if self.rope is not None:
                T = old_keys.num_tokens
                key_states = self.rope.apply(key_states, torch.arange(T, T + key_states.shape[-2]).view(1, 1, -1), True)
            self.key_store = self._fold(self.key_store, old_keys, key_states, self.ranks[0], self.spec.key)
            self.value_store = self._fold(self.value_store, old_values, value_states, self.ranks[1], self.spec.value)
        return keys, values

    def _fold(
        self, extended: LowRankStore, old: LowRankStore, new: torch.Tensor, rank: int | None, spec: TensorQuantSpec
    ) -> LowRankStore:
        """``old`` (all factored) and ``new`` factored again as one block; ``extended`` when there is nothing to fold
        (an unfactored tensor, or decode tokens already in the tail). Factored keys are pre-RoPE on both sides."""
        if old.factors is None or old.tail is not None:
            return extended
        return store_prompt(torch.cat([old.dequantize(self.dtype), new], dim=-2), rank, spec, self.scale_dtype)

    def get_seq_length(self) -> int:
        return 0 if self.key_store is None else self.key_store.num_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def materialize(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Stored keys and values, reconstructed, as fresh ``[B, H, T, D]`` tensors."""
        if self.key_store is None:
            return None, None
        keys = rerotate(self.key_store.dequantize(self.dtype), self.key_store, self.rope, self._positions())
        return keys, self.value_store.dequantize(self.dtype)

    def _read(self, which: int) -> torch.Tensor | None:
        """The stored tokens, reconstructed from the factors (keys rotated back to their positions) and the tail,
        ``[B, H, T, D]`` (see :class:`~kvcache_plugins.layers.base.ReadOnlyStates`)."""
        return self.materialize()[which]

    def nbytes(self) -> CacheBytes:
        out = _stored_bytes(self.key_store) + _stored_bytes(self.value_store)
        if self.key_store is not None:
            B, H, T, D = self.key_store.shape
            out.reference = reference_bytes(B, H, T, D)
        return out

    def reset(self) -> None:
        self.key_store = self.value_store = None
        self.folding = True

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens as the installed ``DynamicLayer.crop`` does: ``-n`` removes ``n``; ``n >= 0`` is
        the length to keep on releases that take a length (5.4), refused (``n > 0``) or a no-op (``0``) on newer
        ones (5.23, 5.24); see :func:`kvcache_plugins._compat.crop_count`. The prompt is complete after a crop:
        later tokens go to the tail, so rejected candidates never reshape the factors of the accepted ones."""
        self.folding = self.key_store is None
        length = self.get_seq_length()
        keep = length - crop_count(length, tokens_to_remove)
        if self.key_store is None or keep == length:
            return
        if keep <= 0:
            self.reset()
            return
        self.key_store, self.value_store = self.key_store.keep_tokens(keep), self.value_store.keep_tokens(keep)

    def _map_rows(self, fn) -> None:
        if self.key_store is not None:
            self.key_store, self.value_store = self.key_store._map(fn), self.value_store._map(fn)

    # ------------------------------------------------------------------ state
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, metadata)``: ``key.left`` ``[B, H, F, r_k]``, ``key.right`` ``[B, H, r_k, D]``, ``key.tail``
        ``[B, H, n, D]`` (each plain or ``.codes/.scale/.zero``; only the parts that exist), the same for
        ``value``; metadata: dtypes, ``ranks`` ``[r_k, r_v]`` and the key space (see :mod:`.state`)."""
        if not self.is_initialized or self.key_store is None:
            return empty_state()
        tensors: dict[str, torch.Tensor] = {}
        put_store(tensors, "key", self.key_store)
        put_store(tensors, "value", self.value_store)
        meta = {
            "dtype": str(self.dtype), "scale_dtype": str(self.scale_dtype), "ranks": list(self.ranks),
            "keys": _key_space(self.rope),
        }
        return tensors, meta

    def load_state(self, state: StateReader, facts: ModelFacts) -> None:
        """Fill this empty layer: stores shaped as the layer's ranks and spec say, ``[B, H, ., D]`` with ``H`` and
        ``D`` the model's; keys and values hold the same rows and tokens, and the same factored tokens when both
        are factored (factors are made for the whole prompt at once, later tokens go to the tails)."""
        if is_empty(state):
            return
        state.fields(["dtype", "scale_dtype", "ranks", "keys"])
        _read_layout(state, self.ranks, self.rope)
        dtype, scale_dtype = state.model_dtype(facts), state.dtype("scale_dtype", SCALE_DTYPES)
        H, D = facts.num_kv_heads, facts.head_dim
        k = read_store(state, "key", self.ranks[0], self.spec.key, (dtype, scale_dtype), (None, H, None, None, D),
                       facts.device)
        B = k.shape[0]
        F = k.factored_tokens if k.factors is not None and self.ranks[1] is not None else None
        v = read_store(state, "value", self.ranks[1], self.spec.value, (dtype, scale_dtype), (B, H, F, None, D),
                       facts.device)
        state.require(k.num_tokens == v.num_tokens, f"keys hold {k.num_tokens} tokens, values {v.num_tokens}")
        self.dtype, self.device, self.scale_dtype = dtype, facts.device, scale_dtype
        self.key_store, self.value_store = k, v
        self.is_initialized = True




# ------------------------------------------------------------------------------------------- with selection


@register_layer("lowrank_compressed")
class LowRankCompressedLayer(CompressedLayer):
    """A :class:`CompressedLayer` whose kept prompt tokens are stored as rank-``r`` factors.

    Selection gathers the kept tokens first (as in the parent); they are then factored per row and head, so every
    slot is ``left[slot] @ right``. Tokens appended later go to the tail. Decode-time eviction is not supported
    (the cache refuses ``decode_policy`` with ``lowrank``).
    """

    def __init__(
        self, key_spec: TensorQuantSpec, value_spec: TensorQuantSpec, ranks: LayerRanks,
        scale_dtype: torch.dtype | None = None, workspace: Workspace | None = None, track_attention: bool = False,
        rope: RopeRotation | None = None,
    ) -> None:
        self.ranks = ranks
        self.rope = rope if ranks[0] is not None else None
        super().__init__(key_spec, value_spec, scale_dtype, workspace, track_attention)

    def __repr__(self) -> str:
        keys = "pre-RoPE" if self.rope is not None else "post-RoPE"
        return (f"LowRankCompressedLayer(k_rank={self.ranks[0]} {keys}, v_rank={self.ranks[1]}, "
                f"k={self.key_spec.describe()}, v={self.value_spec.describe()})")

    def _factored_positions(self) -> torch.Tensor:
        return self.positions[..., : self.stored_keys.factored_tokens].clamp(min=0)

    def _store(self, t, spec):
        return t  # the parent's selection paths store the kept tokens dense; _after_selection factors them

    def _after_selection(self, k: torch.Tensor) -> None:
        keys = self.stored_keys
        if self.rope is not None:
            keys = self.rope.apply(keys, self.positions.clamp(min=0), inverse=True)
        self.stored_keys = store_prompt(keys, self.ranks[0], self.key_spec, self.scale_dtype)
        self.stored_values = store_prompt(self.stored_values, self.ranks[1], self.value_spec, self.scale_dtype)
        super()._after_selection(k)

    def _extend(self, stored, new, spec, role):
        stored, full = extend_store(stored, new, spec, self.scale_dtype, self.workspace, role)
        if role == "key":
            rerotate(full, stored, self.rope, self._factored_positions())
        return stored, full

    @staticmethod
    def _cut(t, keep: int):
        return t.keep_tokens(keep)

    def evict(self, keep: torch.Tensor) -> None:
        raise NotImplementedError("low-rank layers keep their factored slots: decode-time eviction is not supported")

    def materialize(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Stored slots reconstructed, ``[B, H, S, D]`` each (``None`` before the selection)."""
        if self.stored_keys is None:
            return None, None
        keys = self.stored_keys.dequantize(self.dtype)
        keys = rerotate(keys, self.stored_keys, self.rope, self._factored_positions())
        return keys, self.stored_values.dequantize(self.dtype)

    def _read(self, which: int) -> torch.Tensor | None:
        """``keys`` / ``values`` (see :class:`CompressedLayer`): the pending prompt, else the slots reconstructed."""
        if self.pending is not None:
            return self.pending[which]
        return self.materialize()[which]

    # ------------------------------------------------------------------ state
    _state_fields = (*CompressedLayer._state_fields, "ranks", "keys")

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, metadata)``: ``positions`` ``int32 [B, H_s, S]`` and the key/value stores as in
        :meth:`LowRankLayer.to_state` (factors of the ``S - tail`` selected slots, then ``tail`` later tokens);
        metadata: dtypes, ``logical``, ``tail``, ``ranks`` and the key space."""
        if self.pending is not None:
            raise ValueError("a layer still holds an unselected prompt: save the cache after its prefill")
        if not self.is_initialized or self.positions is None:
            return empty_state()
        tensors: dict[str, torch.Tensor] = {"positions": self.positions}
        put_store(tensors, "key", self.stored_keys)
        put_store(tensors, "value", self.stored_values)
        meta = {
            "dtype": str(self.dtype), "scale_dtype": str(self.scale_dtype), "logical": self.logical, "tail": self.tail,
            "ranks": list(self.ranks), "keys": _key_space(self.rope),
        }
        return tensors, meta

    def _read_stores(
        self, state: StateReader, facts: ModelFacts, shape: tuple[int, int, int, int], tail: int
    ) -> tuple[LowRankStore, LowRankStore]:
        """Key and value stores of ``S`` slots (``shape`` ``[B, H, S, D]``): a factored tensor holds the ``S - tail``
        selected slots as factors and the ``tail`` later tokens in its tail; an unfactored one all ``S`` slots in
        its tail (positions and lengths are checked by :meth:`CompressedLayer.load_state`)."""
        _read_layout(state, self.ranks, self.rope)
        B, H, S, D = shape
        state.require(S > tail, f"a low-rank layer holds {S} slots, {tail} of them after the selection: none selected")
        dtypes = (self.dtype, self.scale_dtype)
        stores = []
        for name, rank, spec in (("key", self.ranks[0], self.key_spec), ("value", self.ranks[1], self.value_spec)):
            split = (S - tail, tail) if rank is not None else (0, S)
            stores.append(read_store(state, name, rank, spec, dtypes, (B, H, *split, D), facts.device))
        return stores[0], stores[1]
