"""Low-rank (truncated SVD) storage of KV tensors: the third axis of the compression cube.

Per batch row and KV head, the ``[T, D]`` matrix ``X`` of a prompt's keys (or values) is factored in fp32 by a
truncated SVD and stored as two factors::

    X = U S Vh  (thin SVD),   left = U[:, :r]  [T, r],   right = diag(S[:r]) Vh[:r]  [r, D],   X_r = left @ right

``X_r`` is the best rank-``r`` approximation of ``X`` (Eckart-Young), so the reconstruction error
``||X - X_r||_F^2 = sum_{i > r} S_i^2`` never grows when ``r`` grows and is zero (up to rounding) at ``r = D``.
Attention could use the factors directly (``q . k_t = (q . right^T) . left_t``); this package reconstructs
``X_r`` into a ``[B, H, T, D]`` buffer before the model's attention runs, which is the transient it costs.

Stored elements per head: ``T r + r D`` instead of ``T D``, i.e. a fraction ``r / D + r / T`` of the dense bytes,
so ``r = D`` costs *more* than dense storage (it is the lossless end of the axis, not a setting to use).
Both factors can be quantized group-wise (:mod:`kvcache_plugins.quant.groupwise`): ``left`` per row with groups
along ``r``, ``right`` per row with groups along ``D``. ``left`` holds the orthonormal ``U`` (entries of similar
magnitude in a row) and ``right`` carries the singular values, so each group of either factor spans one scale.

Tokens that arrive after the factored prompt (generated tokens, follow-up turns) are not re-factored: a
:class:`LowRankStore` appends them to a ``tail`` at model precision or quantized, like the residual of the other
layers. Ranks are chosen per layer and separately for keys and values (:func:`resolve_ranks`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from .._checks import nonfinite_error, nonfinite_found

from .groupwise import QuantizedTensor, quantize
from .packing import codes_per_unit

Factor = Union[torch.Tensor, QuantizedTensor]
#: one layer's ranks: ``(key_rank, value_rank)``; ``None`` = that tensor is not factored
LayerRanks = tuple[Union[int, None], Union[int, None]]
RankSpec = Union[int, Mapping, Sequence, None]


def check_rank(rank: Any, head_dim: int | None, where: str = "rank") -> int:
    """``rank`` as an int, or ``ValueError`` naming the allowed range ``1..head_dim``."""
    allowed = f"1..{head_dim}" if head_dim is not None else "an int >= 1"
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{where} must be an int in {allowed} (head_dim), got {rank!r}")
    if rank < 1 or (head_dim is not None and rank > head_dim):
        raise ValueError(f"{where}={rank} is outside the allowed range {allowed} (1 to head_dim)")
    return rank


def _layer_entry(entry: Any, head_dim: int | None, where: str) -> LayerRanks:
    if entry is None:
        return (None, None)
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"key", "value"}
        if unknown or not entry:
            got = sorted(map(str, entry))
            raise ValueError(f"{where}: a per-layer rank dict takes the keys 'key' and 'value', got {got}")
        k, v = entry.get("key"), entry.get("value")
    elif isinstance(entry, (tuple, list)):
        if len(entry) != 2:
            raise ValueError(f"{where}: a per-layer rank pair is (key_rank, value_rank), got {entry!r}")
        k, v = entry
    else:
        k = v = entry
    return (
        None if k is None else check_rank(k, head_dim, f"{where} key rank"),
        None if v is None else check_rank(v, head_dim, f"{where} value rank"),
    )


def resolve_ranks(spec: RankSpec, num_layers: int, head_dim: int | None = None) -> list[LayerRanks]:
    """One ``(key_rank, value_rank)`` per layer from a rank spec.

    Forms (like bit widths): an ``int`` (keys and values of every layer), ``(key_rank, value_rank)`` or
    ``{"key": r, "value": r}`` for every layer, a dict ``{layer: entry, "default": entry}`` (default: not factored),
    or a list of one entry per layer. ``None`` anywhere means "not factored".
    """
    if isinstance(spec, Mapping) and not (set(spec) <= {"key", "value"} and spec):
        default = _layer_entry(spec.get("default"), head_dim, "ranks['default']")
        out = [default] * num_layers
        for k, entry in spec.items():
            if k == "default":
                continue
            if isinstance(k, bool) or not isinstance(k, int):
                raise TypeError(f"rank spec keys must be layer indices (int) or 'default', got {k!r}")
            if not 0 <= k < num_layers:
                raise ValueError(f"layer index {k} is beyond the model: valid layer indices are 0..{num_layers - 1}")
            out[k] = _layer_entry(entry, head_dim, f"ranks[{k}]")
        return out
    if isinstance(spec, list) or (isinstance(spec, tuple) and len(spec) != 2):
        if len(spec) != num_layers:
            raise ValueError(f"a per-layer rank list needs exactly {num_layers} entries, got {len(spec)}")
        return [_layer_entry(e, head_dim, f"ranks[{i}]") for i, e in enumerate(spec)]
    return [_layer_entry(spec, head_dim, "ranks")] * num_layers


def factor_group_size(rank: int, group_size: int, bits: int) -> int:
    """Group size for the ``[T, rank]`` left factor: the largest divisor of ``rank`` that is ``<= group_size`` and a
    multiple of the packing unit of ``bits``; ``ValueError`` when there is none."""
    unit = codes_per_unit(bits)
    for g in range(min(group_size, rank), 0, -1):
        if rank % g == 0 and g % unit == 0:
            return g
    raise ValueError(
        f"rank {rank} cannot be quantized at {bits} bits: {bits}-bit codes need a rank that is a multiple of {unit}"
    )


@dataclass
class LowRankTensor:
    """Rank-``r`` factors of a ``[B, H, T, D]`` tensor: ``x ~= left @ right``.

    Attributes:
        left: ``[B, H, T, r]`` (``U``), a tensor in the storage dtype or a per-token :class:`QuantizedTensor`.
        right: ``[B, H, r, D]`` (``diag(S) Vh``), likewise.
        rank: ``r``.
        head_dim: ``D``.
    """

    left: Factor
    right: Factor
    rank: int
    head_dim: int

    @property
    def num_tokens(self) -> int:
        return self.left.num_tokens if isinstance(self.left, QuantizedTensor) else self.left.shape[-2]

    def _dense(self, f: Factor, dtype: torch.dtype) -> torch.Tensor:
        return f.dequantize(dtype) if isinstance(f, QuantizedTensor) else f.to(dtype)

    def reconstruct(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """``left @ right`` as ``[B, H, T, D]`` in ``dtype`` (written into ``out`` when given)."""
        full = torch.matmul(self._dense(self.left, dtype), self._dense(self.right, dtype))
        if out is None:
            return full
        return out.copy_(full)

    def _map_left(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Factor:
        return self.left._map(fn) if isinstance(self.left, QuantizedTensor) else fn(self.left)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LowRankTensor:
        right = self.right._map(fn) if isinstance(self.right, QuantizedTensor) else fn(self.right)
        return LowRankTensor(self._map_left(fn), right, self.rank, self.head_dim)

    def keep_tokens(self, count: int) -> LowRankTensor:
        """The first ``count`` tokens (rows of ``left``; ``right`` is shared by all tokens)."""
        return LowRankTensor(self._map_left(lambda t: t[..., :count, :].clone()), self.right, self.rank, self.head_dim)

    def nbytes(self) -> tuple[int, int, int, int]:
        """Bytes held as ``(codes, scales, zeros, full_precision)``."""
        out = [0, 0, 0, 0]
        for f in (self.left, self.right):
            if isinstance(f, QuantizedTensor):
                c, s, z = f.nbytes()
                out[0] += c
                out[1] += s
                out[2] += z
            else:
                out[3] += f.numel() * f.element_size()
        return tuple(out)


def factorize(
    x: torch.Tensor,
    rank: int,
    *,
    dtype: torch.dtype | None = None,
    bits: int = 16,
    group_size: int = 32,
    meta_dtype: torch.dtype | None = None,
) -> LowRankTensor:
    """Truncated SVD of ``x`` ``[B, H, T, D]`` per row and head, in fp32 (see the module docstring).

    Args:
        x: keys or values.
        rank: ``r`` in ``1..D``. With fewer than ``r`` tokens the missing components are zero (shapes stay ``r``).
        dtype: storage dtype of unquantized factors (default ``x.dtype``).
        bits: 16 (factors in ``dtype``) or 2/3/4/8 (both factors quantized group-wise).
        group_size: quantization group along ``D`` for ``right``; ``left`` uses :func:`factor_group_size`.
        meta_dtype: scale/zero dtype of quantized factors.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a floating [batch, heads, tokens, head_dim] tensor, got {x.dtype} {tuple(x.shape)}")
    B, H, T, D = x.shape
    check_rank(rank, D)
    found = "" if bool(torch.isfinite(x).all()) else nonfinite_found(x)
    if found:
        raise nonfinite_error("states to factorise", found)
    U, S, Vh = torch.linalg.svd(x.float(), full_matrices=False)  # [B,H,T,k], [B,H,k], [B,H,k,D]; k = min(T, D)
    k = min(rank, S.shape[-1])
    left = x.new_zeros((B, H, T, rank), dtype=torch.float32)
    right = x.new_zeros((B, H, rank, D), dtype=torch.float32)
    left[..., :k] = U[..., :k]
    right[..., :k, :] = S[..., :k, None] * Vh[..., :k, :]
    store = dtype or x.dtype
    if bits == 16:
        return LowRankTensor(left.to(store), right.to(store), rank, D)
    gl = factor_group_size(rank, group_size, bits)
    ql = quantize(left, bits, gl, "token", meta_dtype)
    qr = quantize(right, bits, group_size, "token", meta_dtype)
    return LowRankTensor(ql, qr, rank, D)


Stored = Union[torch.Tensor, QuantizedTensor]


@dataclass
class LowRankStore:
    """One of K or V of one layer: factored prompt tokens followed by a tail of later tokens.

    Slots ``[0, F)`` are the factored tokens (``factors``, ``F = factors.num_tokens``; ``None`` when this tensor is
    not factored), slots ``[F, F + tail)`` the tokens stored after them (``[B, H, n, D]`` tensor or per-token
    :class:`QuantizedTensor`; ``None`` when empty).
    """

    factors: LowRankTensor | None
    tail: Stored | None
    head_dim: int

    @staticmethod
    def _len(t: Stored | None) -> int:
        if t is None:
            return 0
        return t.num_tokens if isinstance(t, QuantizedTensor) else t.shape[-2]

    @property
    def factored_tokens(self) -> int:
        return 0 if self.factors is None else self.factors.num_tokens

    @property
    def num_tokens(self) -> int:
        return self.factored_tokens + self._len(self.tail)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """All slots as ``[B, H, T, D]`` in ``dtype``: ``left @ right`` for the factored ones, then the tail."""
        F = self.factored_tokens
        if out is None:
            ref = self._any()
            out = torch.empty((*ref.shape[:2], self.num_tokens, self.head_dim), dtype=dtype, device=ref.device)
        if self.factors is not None:
            self.factors.reconstruct(dtype, out=out[..., :F, :])
        if isinstance(self.tail, QuantizedTensor):
            self.tail.dequantize(dtype, out=out[..., F:, :])
        elif self.tail is not None:
            out[..., F:, :].copy_(self.tail)
        return out

    def _any(self) -> torch.Tensor:
        if self.factors is not None:
            f = self.factors.left
        else:
            f = self.tail
        return f.codes if isinstance(f, QuantizedTensor) else f

    @property
    def shape(self) -> tuple[int, int, int, int]:
        ref = self._any()
        return (ref.shape[0], ref.shape[1], self.num_tokens, self.head_dim)

    def cat(self, new: Stored) -> LowRankStore:
        """Append ``new`` (same kind as the tail) after the stored slots."""
        if self.tail is None:
            tail = new
        elif isinstance(self.tail, QuantizedTensor):
            tail = self.tail.cat(new)
        else:
            tail = torch.cat([self.tail, new], dim=-2)
        return LowRankStore(self.factors, tail, self.head_dim)

    def keep_tokens(self, count: int) -> LowRankStore:
        """The first ``count`` slots."""
        F = self.factored_tokens
        if count <= F:
            factors = self.factors.keep_tokens(count) if self.factors is not None else None  # 0 tokens keep the shape
            return LowRankStore(factors, None, self.head_dim)
        keep = count - F
        if isinstance(self.tail, QuantizedTensor):
            tail = self.tail.keep_tokens(keep)
        else:
            tail = self.tail[..., :keep, :].clone()
        return LowRankStore(self.factors, tail, self.head_dim)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LowRankStore:
        factors = None if self.factors is None else self.factors._map(fn)
        if isinstance(self.tail, QuantizedTensor):
            tail = self.tail._map(fn)
        else:
            tail = None if self.tail is None else fn(self.tail)
        return LowRankStore(factors, tail, self.head_dim)

    def nbytes(self) -> tuple[int, int, int, int]:
        """Bytes held as ``(codes, scales, zeros, full_precision)``: factors (and their quantization) plus tail."""
        out = list(self.factors.nbytes()) if self.factors is not None else [0, 0, 0, 0]
        if isinstance(self.tail, QuantizedTensor):
            c, s, z = self.tail.nbytes()
            out[0], out[1], out[2] = out[0] + c, out[1] + s, out[2] + z
        elif self.tail is not None:
            out[3] += self.tail.numel() * self.tail.element_size()
        return tuple(out)


def relative_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """``||x - x_hat||_F / ||x||_F`` in fp32."""
    x = x.float()
    return float((x - x_hat.float()).norm() / x.norm().clamp_min(1e-30))
