"""Low-rank (SVD) KV storage: ``LowRankCache`` and the low-rank layer of a selecting ``CompressedCache``.

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
into the cache's shared :class:`~kvcache_plugins.caches.layers.Workspace`; the transient per call is one
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
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .._checks import explain_nonfinite
from .._compat import crop_count
from .._model import head_dim, text_config
from ..quant.groupwise import META_DTYPES, QuantizedTensor, default_meta_dtype, quantize
from ..quant.lowrank import (
    LayerRanks, LowRankStore, LowRankTensor, RankSpec, factor_group_size, factorize, resolve_ranks,
)
from ..quant.spec import DEFAULT_GROUP_SIZE, LayerQuantSpec, Spec, TensorQuantSpec, resolve_layer_specs
from .accounting import CacheBytes, reference_bytes, tensor_bytes
from .compressed import CompressedLayer
from .layers import ReadOnlyStates, RowEdits, Workspace
from .mixed_precision import layers_nbytes
from .persist import PersistentCache
from .state import (
    SCALE_DTYPES,
    ModelFacts,
    StateReader,
    dynamic_length,
    empty_state,
    is_empty,
    layer_spec_state,
    put_stored,
    read_layer_spec,
    read_stored,
    register_cache,
    register_layer,
)

KEY_SPACES = ("pre_rope", "post_rope")


# ------------------------------------------------------------------------------------------------ RoPE


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class RopeRotation:
    """The model's rotary embedding as a rotation of cached keys at integer slot positions.

    Keys follow transformers' ``rotate_half`` convention on the first ``R`` channels (``R = cos.shape[-1]``: all of
    head_dim, or a part for partial rotary models): ``k = x cos + rotate_half(x) sin``. :meth:`apply` computes that;
    ``inverse=True`` computes ``x = (k cos - rotate_half(k) sin) / (cos^2 + sin^2)``, exact also when the rope type
    scales ``cos`` and ``sin`` (attention scaling). Everything in fp32.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        import inspect

        self.module = module
        self._layer_type = "layer_type" in inspect.signature(module.forward).parameters  # Gemma-3: one per type

    def __deepcopy__(self, memo: dict) -> RopeRotation:
        return self  # the model's module, shared by forks of a cache (it holds no cache state)

    @classmethod
    def of(cls, model: Any) -> RopeRotation | None:
        """The rotary embedding of a transformers model (``None`` if it has none or ``model`` is a config)."""
        if not isinstance(model, torch.nn.Module):
            return None
        inner = getattr(model, "model", model)
        module = getattr(inner, "rotary_emb", None)
        if module is None:
            module = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
        return None if module is None else cls(module)

    def _cos_sin(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        B, Hs, T = positions.shape
        dummy = torch.zeros((), dtype=torch.float32, device=device)
        pos = positions.reshape(B * Hs, T).to(device=device, dtype=torch.long)
        with torch.no_grad():
            args = (dummy, pos, "full_attention") if self._layer_type else (dummy, pos)
            cos, sin = self.module(*args)
        return cos.float().view(B, Hs, T, -1), sin.float().view(B, Hs, T, -1)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate ``x`` ``[B, H, T, D]`` by RoPE at ``positions`` ``[B, H_s, T]`` (``H_s`` 1 or ``H``); ``inverse``
        undoes it. Returns a new tensor in ``x.dtype``."""
        if x.shape[-2] == 0:
            return x.clone()
        cos, sin = self._cos_sin(positions, x.device)
        R = cos.shape[-1]
        xf = x.float()
        rot, rest = xf[..., :R], xf[..., R:]
        if inverse:
            rot = (rot * cos - _rotate_half(rot) * sin) / (cos * cos + sin * sin)
        else:
            rot = rot * cos + _rotate_half(rot) * sin
        return torch.cat([rot, rest], dim=-1).to(x.dtype)


def resolve_rope(keys: str, model_or_config: Any, ranks: list[LayerRanks]) -> RopeRotation | None:
    """The rotation ``keys="pre_rope"`` needs (``None`` for post-RoPE or when no key is factored)."""
    if keys not in KEY_SPACES:
        raise ValueError(f"keys must be one of {KEY_SPACES} (factor keys before or after RoPE), got {keys!r}")
    if keys == "post_rope" or all(k is None for k, _ in ranks):
        return None
    rope = RopeRotation.of(model_or_config)
    if rope is None:
        raise ValueError(
            "factoring keys before RoPE (keys='pre_rope', the default) needs the model's rotary embedding: pass the "
            "model, not its config, or choose keys='post_rope'"
        )
    return rope


# ------------------------------------------------------------------------------------------------ storage helpers


def _tail(t: torch.Tensor, spec: TensorQuantSpec, scale_dtype: torch.dtype) -> torch.Tensor | QuantizedTensor:
    return quantize(t, spec.bits, spec.group_size, "token", scale_dtype) if spec.quantized else t


def store_prompt(
    t: torch.Tensor, rank: int | None, spec: TensorQuantSpec, scale_dtype: torch.dtype
) -> LowRankStore:
    """``t`` ``[B, H, T, D]`` as a :class:`LowRankStore`: rank-``rank`` factors (quantized at ``spec.bits``), or
    stored like a tail when ``rank`` is ``None``."""
    D = t.shape[-1]
    if rank is None:
        return LowRankStore(None, _tail(t, spec, scale_dtype), D)
    bits = spec.bits if spec.quantized else 16
    return LowRankStore(factorize(t, rank, bits=bits, group_size=spec.group_size, meta_dtype=scale_dtype), None, D)


def extend_store(
    store: LowRankStore, new: torch.Tensor, spec: TensorQuantSpec, scale_dtype: torch.dtype,
    workspace: Workspace | None, role: str,
) -> tuple[LowRankStore, torch.Tensor]:
    """Append ``new`` ``[B, H, n, D]`` to the tail; return the new store and ``[stored (reconstructed), new]``."""
    S = store.num_tokens
    B, H, n, D = new.shape
    if workspace is not None:
        full = workspace.get(role, new, S + n)
    else:
        full = torch.empty((B, H, S + n, D), dtype=new.dtype, device=new.device)
    store.dequantize(new.dtype, out=full[..., :S, :])
    full[..., S:, :].copy_(new)
    return store.cat(_tail(new, spec, scale_dtype)), full


def rerotate(
    keys: torch.Tensor, store: LowRankStore, rope: RopeRotation | None, positions: torch.Tensor
) -> torch.Tensor:
    """Re-apply RoPE in place to the factored slots ``[0, F)`` of ``keys`` ``[B, H, >= F, D]`` (pre-RoPE keys);
    ``positions`` ``[B, H_s, F]``. Returns ``keys``."""
    F = store.factored_tokens
    if rope is not None and F:
        keys[..., :F, :].copy_(rope.apply(keys[..., :F, :], positions))
    return keys


def _store_bytes(store: LowRankStore | None) -> CacheBytes:
    if store is None:
        return CacheBytes()
    codes, scales, zeros, fp = store.nbytes()
    return CacheBytes(codes=codes, scales=scales, zeros=zeros, full_precision=fp)


def read_ranks(state: StateReader, key: str, num_layers: int, head_dim: int) -> list[LayerRanks]:
    """Saved per-layer ranks: a list of ``num_layers`` ``[key_rank, value_rank]`` pairs, each ``null`` (not
    factored) or an int in ``1..head_dim``; ``ValueError`` otherwise."""
    value = state.raw(key)

    def rank_ok(r: Any) -> bool:
        return r is None or (type(r) is int and 1 <= r <= head_dim)

    ok = isinstance(value, list) and len(value) == num_layers and all(
        isinstance(e, list) and len(e) == 2 and all(rank_ok(r) for r in e) for e in value
    )
    state.require(
        ok, f"{key} must be a list of {num_layers} [key_rank, value_rank] pairs, each null or an int in 1..{head_dim}"
    )
    return [tuple(e) for e in value]


def _factor_specs(rank: int, spec: TensorQuantSpec) -> tuple[TensorQuantSpec, TensorQuantSpec]:
    """How :func:`store_prompt` stores the ``[T, rank]`` left and ``[rank, D]`` right factors under ``spec``."""
    if not spec.quantized:
        return TensorQuantSpec(), TensorQuantSpec()
    left = TensorQuantSpec(spec.bits, "token", factor_group_size(rank, spec.group_size, spec.bits))
    return left, TensorQuantSpec(spec.bits, "token", spec.group_size)


def put_store(tensors: dict[str, torch.Tensor], name: str, store: LowRankStore) -> None:
    """Add ``store``'s tensors to ``tensors``: ``{name}.left`` ``[B, H, F, r]``, ``{name}.right`` ``[B, H, r, D]``
    (when factored) and ``{name}.tail`` ``[B, H, n, D]`` (when it holds tokens), each plain or as
    ``.codes/.scale/.zero`` (see :func:`~kvcache_plugins.caches.state.put_stored`)."""
    if store.factors is not None:
        put_stored(tensors, f"{name}.left", store.factors.left)
        put_stored(tensors, f"{name}.right", store.factors.right)
    put_stored(tensors, f"{name}.tail", store.tail)


def _rows(t: torch.Tensor | QuantizedTensor) -> int:
    return int((t.codes if isinstance(t, QuantizedTensor) else t).shape[0])


def _tokens(t: torch.Tensor | QuantizedTensor) -> int:
    return int((t.codes if isinstance(t, QuantizedTensor) else t).shape[2])


def read_store(
    state: StateReader, name: str, rank: int | None, spec: TensorQuantSpec, dtypes: tuple[torch.dtype, torch.dtype],
    shape: tuple[int | None, int, int | None, int | None, int], device: torch.device,
) -> LowRankStore:
    """What :func:`put_store` wrote, checked; ``ValueError`` naming the tensor for anything else.

    ``shape`` is ``(B, H, F, n, D)``: ``F`` factored tokens (when ``rank`` is given: left ``[B, H, F, rank]`` and
    right ``[B, H, rank, D]``, quantized as :func:`_factor_specs` says; at least one token) and ``n`` tail tokens
    (``[B, H, n, D]`` quantized as ``spec``; absent when ``n`` is 0). ``None`` entries are read off the tensors.
    ``dtypes`` is ``(model dtype, scale dtype)``; dtypes, shapes, finiteness and scales are checked by
    :func:`~kvcache_plugins.caches.state.read_stored`.
    """
    B, H, F, n, D = shape
    factors = None
    if rank is not None:
        left_spec, right_spec = _factor_specs(rank, spec)
        left = read_stored(state, f"{name}.left", left_spec, *dtypes, (B, H, F, rank), device)
        B, F = _rows(left), _tokens(left)
        state.require(B >= 1 and F >= 1, f"{name}.left of shape [{B}, {H}, {F}, {rank}] factors no token")
        right = read_stored(state, f"{name}.right", right_spec, *dtypes, (B, H, rank, D), device)
        factors = LowRankTensor(left, right, rank, D)
    tail = read_stored(state, f"{name}.tail", spec, *dtypes, (B, H, n, D), device, optional=not n)
    if tail is not None:
        state.require(_rows(tail) >= 1 and _tokens(tail) >= 1, f"{name}.tail holds no token")
    state.require(factors is not None or tail is not None, f"{name} holds no token")
    return LowRankStore(factors, tail, D)


def check_layers(ranks: list[LayerRanks], specs: list[LayerQuantSpec], what: str) -> None:
    """``ValueError`` for a layer whose quantization cannot store its factors (per-token only, packable ranks)."""
    for i, (spec, layer_ranks) in enumerate(zip(specs, ranks)):
        for t, rank in zip((spec.key, spec.value), layer_ranks):
            if t.quantized and rank is not None:
                try:
                    factor_group_size(rank, t.group_size, t.bits)
                except ValueError as err:
                    raise ValueError(f"layer {i}: {err}") from None
    _check_specs(specs, what)


def _key_space(rope: RopeRotation | None) -> str:
    return "pre_rope" if rope is not None else "post_rope"


def _read_layout(state: StateReader, ranks: LayerRanks, rope: RopeRotation | None) -> None:
    """The saved ranks and key space are the ones this layer was built with (the cache's arguments)."""
    saved = state.raw("ranks")
    exact = isinstance(saved, list) and all(r is None or type(r) is int for r in saved) and saved == list(ranks)
    state.require(exact, f"ranks {saved!r} differ from this layer's {list(ranks)} (key, value)")
    state.str("keys", [_key_space(rope)])


def _check_specs(specs: list[LayerQuantSpec], what: str) -> None:
    for i, spec in enumerate(specs):
        for t in (spec.key, spec.value):
            if t.quantized and t.axis != "token":
                raise ValueError(
                    f"layer {i}: {what} quantizes per token; use a per-token spec such as 'int4' or 'int8'"
                )
        if spec.quantized and (spec.residual_length or spec.sink_tokens):
            raise ValueError(f"layer {i}: {what} has no full-precision residual window or sinks")


# ------------------------------------------------------------------------------------------------ standalone layer


@register_layer("lowrank")
class LowRankLayer(ReadOnlyStates, RowEdits, DynamicLayer):
    """A ``DynamicLayer`` that stores the first forward's keys/values as rank-``r`` factors (see the module docs).

    ``update(k, v)`` takes ``[B, H, n, D]`` states and returns ``[B, H, T + n, D]``: the stored slots
    reconstructed, then the new states unchanged. The first call (the prompt) returns its own states, so the
    prompt attends to itself exactly; it is factored as it is stored. Further multi-token calls before any
    single-token one (prefill chunks) are folded into the factors: the stored rows, reconstructed, and the new rows
    are factored again at rank ``r``. Tokens after that (decoding, later turns) go to the tail.
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

    def __repr__(self) -> str:
        keys = "pre-RoPE" if self.rope is not None else "post-RoPE"
        return f"LowRankLayer(k_rank={self.ranks[0]} {keys}, v_rank={self.ranks[1]}, {self.spec.describe()})"

    def _positions(self) -> torch.Tensor:
        return torch.arange(self.key_store.factored_tokens).view(1, 1, -1)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dtype != value_states.dtype or not key_states.is_floating_point():
            raise TypeError(
                f"keys and values must share one floating dtype, got {key_states.dtype} and {value_states.dtype}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.scale_dtype = self.scale_dtype or default_meta_dtype(self.dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise TypeError(f"this layer stores {self.dtype} keys and values; got {key_states.dtype}")
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
        if key_states.shape[-2] > 1:  # a prefill chunk: fold it into the factors
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
        ``[B, H, T, D]`` (see :class:`~kvcache_plugins.caches.layers.ReadOnlyStates`)."""
        return self.materialize()[which]

    def nbytes(self) -> CacheBytes:
        out = _store_bytes(self.key_store) + _store_bytes(self.value_store)
        if self.key_store is not None:
            B, H, T, D = self.key_store.shape
            out.reference = reference_bytes(B, H, T, D)
        return out

    def reset(self) -> None:
        self.key_store = self.value_store = None

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens as the installed ``DynamicLayer.crop`` does: ``-n`` removes ``n``; ``n >= 0`` is
        the length to keep on releases that take a length (5.4), refused (``n > 0``) or a no-op (``0``) on newer
        ones (5.23, 5.24); see :func:`kvcache_plugins._compat.crop_count`."""
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


@register_cache("LowRankCache")
class LowRankCache(PersistentCache, DynamicCache):
    """A ``transformers.DynamicCache`` storing the prompt's keys and values as rank-``r`` SVD factors.

    ``model.generate(..., cache=LowRankCache(model, rank=16))`` (``past_key_values=`` before transformers 5.24; both
    are supported, see ``kvcache_plugins.cache_kwargs``); the spec ``svd:16`` (``svd:k16v32`` for separate key/value
    ranks, ``svd:16+int8`` for quantized factors) builds it through ``make_cache``.

    Args:
        model_or_config: the model (or its config) the cache serves.
        rank: ``r`` in ``1..head_dim`` for keys and values, ``(key_rank, value_rank)``, ``{"key": r, "value": r}``,
            a dict ``{layer: entry, "default": entry}`` or one entry per layer; ``None`` = not factored.
        quant: per-token quantization of the factors and of the tail (a ``MixedPrecisionCache`` spec such as
            ``"int8"``, ``"int4"``, ``"mixed_l0"``); default: factors and tail in the model dtype.
        keys: ``"pre_rope"`` (default; needs the model, not a config) or ``"post_rope"``: factor keys before or
            after the rotary embedding (see the module docstring).
        group_size, scale_dtype: quantization grouping and scale dtype, as in ``MixedPrecisionCache``.
    """


    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``DynamicCache.update``; NaN / Inf states are refused (before the SVD) naming the layer and tensor."""
        try:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        except ValueError:
            explain_nonfinite(key_states, value_states, layer_idx)
            raise
    def __init__(
        self,
        model_or_config: Any,
        rank: RankSpec = 32,
        *,
        quant: Spec | None = None,
        keys: str = "pre_rope",
        group_size: int = DEFAULT_GROUP_SIZE,
        scale_dtype: torch.dtype | None = None,
    ) -> None:
        cfg = text_config(model_or_config)
        if scale_dtype is not None and scale_dtype not in META_DTYPES:
            raise ValueError(f"scale_dtype must be one of {META_DTYPES}, got {scale_dtype!r}")
        n, D = cfg.num_hidden_layers, head_dim(cfg)
        ranks = resolve_ranks(rank, n, D)
        specs = resolve_layer_specs("full" if quant is None else quant, n, group_size=group_size, head_dim=D)
        check_layers(ranks, specs, "LowRankCache")
        rope = resolve_rope(keys, model_or_config, ranks)
        super().__init__(config=cfg)
        self.keys = keys
        self.model_config = cfg
        self.rank = rank
        self.layer_ranks = ranks
        self.layer_specs = specs
        self.workspace = Workspace()
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer and (ranks[i] != (None, None) or specs[i].quantized):
                self.layers[i] = LowRankLayer(ranks[i], specs[i], scale_dtype, self.workspace, rope)

    def memory_footprint(self) -> CacheBytes:
        """Bytes held now: factors (codes/scales/zeros when quantized, else full precision) plus tails."""
        return layers_nbytes(self.layers)

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        """Per-layer ranks, key space and quantization specs (the layers save themselves; see :mod:`.state`)."""
        return {
            "rank": [list(r) for r in self.layer_ranks], "keys": self.keys,
            "layer_specs": [layer_spec_state(s) for s in self.layer_specs],
        }

    @classmethod
    def from_state(cls, state: StateReader, model: Any, tokenizer: Any = None) -> LowRankCache:
        """An empty cache built from the saved ranks (each null or in ``1..head_dim``), key space and specs."""
        state.fields(["rank", "keys", "layer_specs"])
        cfg = text_config(model)
        n, D = int(cfg.num_hidden_layers), head_dim(cfg)
        specs = [read_layer_spec(s, D) for s in state.items("layer_specs", n)]
        ranks = read_ranks(state, "rank", n, D)
        keys = state.str("keys", KEY_SPACES)
        try:
            return cls(model, ranks, quant=specs, keys=keys)
        except (TypeError, ValueError) as err:  # e.g. a rank that cannot be packed at the saved bits
            raise state.error(f"arguments rejected: {err}") from None

    def finish_state(self, state: StateReader) -> None:
        """Every full-attention layer holds the same rows and tokens; sliding-window layers the same rows and
        the tokens their window keeps of them."""
        seen = set()
        for layer in self.layers:
            if isinstance(layer, LowRankLayer):
                store = layer.key_store
                seen.add((0, 0) if store is None else (store.shape[0], store.num_tokens))
            elif type(layer) is DynamicLayer:
                n = dynamic_length(layer)
                seen.add((0, 0) if n is None else (int(layer.keys.shape[0]), n))
        state.require(len(seen) <= 1, f"layers disagree on (rows, tokens): {sorted(seen)}")
        rows, tokens = seen.pop() if seen else (0, 0)
        for layer in self.layers:
            if getattr(layer, "is_sliding", False) and layer.is_initialized and layer.keys is not None:
                state.require(
                    rows > 0 and (layer.keys.shape[0], layer.get_seq_length()) == (rows, tokens),
                    f"a sliding-window layer has seen {layer.get_seq_length()} tokens of {layer.keys.shape[0]} rows, "
                    f"the other layers {tokens} of {rows}",
                )

    def describe(self) -> str:
        return "\n".join(f"layer {i:>3}: {layer!r}" for i, layer in enumerate(self.layers))


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

    def _map_rows(self, fn) -> None:
        if self.pending is not None:
            self.pending = (fn(self.pending[0]), fn(self.pending[1]))
        if self.stored_keys is not None:
            self.stored_keys, self.stored_values = self.stored_keys._map(fn), self.stored_values._map(fn)
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.acc is not None:
            self.acc = fn(self.acc)

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

    def nbytes(self) -> CacheBytes:
        out = _store_bytes(self.stored_keys) + _store_bytes(self.stored_values)
        out.indices = tensor_bytes(self.positions)
        if self.pending is not None:
            out.full_precision += tensor_bytes(self.pending[0]) + tensor_bytes(self.pending[1])
            B, H, _, D = self.pending[0].shape
        elif self.stored_keys is not None:
            B, H, _, D = self.stored_keys.shape
        else:
            return out
        out.reference = reference_bytes(B, H, self.logical, D)
        return out

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
