"""Storing, extending, saving and reading low-rank stores (:class:`~kvcache_plugins.quant.lowrank.LowRankStore`)
for the low-rank layers (:mod:`kvcache_plugins.layers.lowrank`)."""

from __future__ import annotations

from typing import Any

import torch

from ..persist.state import StateReader, put_stored, read_stored
from ..quant.groupwise import QuantizedTensor, quantize
from ..quant.lowrank import LayerRanks, LowRankStore, LowRankTensor, factor_group_size, factorize
from ..quant.spec import LayerQuantSpec, TensorQuantSpec
from .base import Workspace, assemble
from .rope import RopeRotation


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
    full = assemble(workspace, role, new, store.num_tokens, lambda out: store.dequantize(new.dtype, out=out))
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
    ``.codes/.scale/.zero`` (see :func:`~kvcache_plugins.persist.state.put_stored`)."""
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
    :func:`~kvcache_plugins.persist.state.read_stored`.
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

