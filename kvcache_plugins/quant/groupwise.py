"""Group-wise asymmetric min/max integer quantization of KV tensors.

For a group ``G`` of values (``g`` consecutive elements along the grouping axis) and ``b`` bits:

    zero  = round_down(min(G))                      stored in the metadata dtype
    scale = round_up((max(G) - zero) / (2**b - 1))  stored in the metadata dtype
    code  = clamp(round((x - zero) / scale), 0, 2**b - 1)
    x_hat = code * scale + zero

Everything is computed in fp32. ``zero`` is rounded towards -inf and ``scale`` towards +inf when they are
narrowed to the metadata dtype, and the codes are computed from the *stored* (narrowed) values, so every element
satisfies ``|x - x_hat| <= scale / 2`` (up to fp32 rounding) with the scale that is actually stored.

Two grouping axes, for tensors shaped ``[batch, kv_heads, tokens, head_dim]``:

* ``"token"`` (per-token): groups run along ``head_dim``; ``scale``/``zero`` are ``[B, H, T, head_dim / g]``.
  Every token is quantized on its own, so tokens can be appended one at a time.
* ``"channel"`` (per-channel, as KIVI does for keys): groups run along tokens; ``scale``/``zero`` are
  ``[B, H, T / g, head_dim]``. Only whole groups of ``g`` tokens can be quantized.

Storage per element is ``b`` bits of code plus ``2 * 16 / g`` bits of fp16/bf16 metadata, i.e. ``b + 32/g`` bits.

Extremes: for finite input every stored scale and zero is finite, and dequantized values are clamped into the
output dtype's finite range (outward rounding can carry ``zero + (2**b - 1) * scale`` just past 65504 in fp16).
A group whose range exceeds the fp32 range (bf16/fp32 values near +-3e38 of both signs) raises ``ValueError``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

from .. import compiler
from .._checks import nonfinite_error, nonfinite_found
from ..compiler import Kernel
from .packing import check_bits, code_planes, codes_per_unit, pack, packed_last_dim, unpack

Axis = Literal["token", "channel"]
AXES: tuple[str, ...] = ("token", "channel")
META_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def default_meta_dtype(dtype: torch.dtype) -> torch.dtype:
    """Metadata (scale/zero) dtype for KV tensors of ``dtype``: bf16 for bf16 models, fp16 otherwise."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def _ulp_step(narrowed: torch.Tensor, direction: int) -> torch.Tensor:
    """``torch.nextafter(narrowed, direction * inf)`` for fp16/bf16, written on the bit pattern (``int16``): one unit
    up the magnitude away from zero in ``direction``'s sign, one down towards it, the smallest subnormal from +-0.
    Inductor compiles it to the same bits (its ``nextafter`` on 16-bit floats rounds back to the input)."""
    bits = narrowed.view(torch.int16)
    is_zero = (bits & 0x7FFF) == 0
    away = (bits >= 0) == (direction > 0)
    moved = torch.where(away, bits + 1, bits - 1)
    return torch.where(is_zero, torch.full_like(bits, 1 if direction > 0 else -32767), moved).view(narrowed.dtype)


def _narrow(values: torch.Tensor, dtype: torch.dtype, direction: int) -> torch.Tensor:
    """Cast fp32 ``values`` to ``dtype`` so that the result is ``>= values`` (``direction=+1``) or ``<=`` (``-1``).

    Round to nearest, then step one ulp towards ``direction`` where that landed on the wrong side. Values that are
    representable (the min of an fp16/bf16 group) stay exact. Out-of-range values become infinite; :func:`quantize`
    checks the scale, which is infinite whenever the range or the zero is.
    """
    if dtype == torch.float32:
        return values
    narrowed = values.to(dtype)
    wrong = narrowed.float() < values if direction > 0 else narrowed.float() > values
    return torch.where(wrong, _ulp_step(narrowed, direction), narrowed)


@dataclass
class QuantizedTensor:
    """Packed codes plus per-group scale and zero for a ``[B, H, T, D]`` tensor.

    Attributes:
        codes: ``uint8 [B, H, T, packed_last_dim(D, bits)]``.
        scale: per-token ``[B, H, T, D // g]``; per-channel ``[B, H, T // g, D]``; metadata dtype.
        zero: same shape and dtype as ``scale``.
        bits: code width (2, 3, 4 or 8).
        group_size: ``g``.
        axis: ``"token"`` or ``"channel"``.
        head_dim: ``D`` (the codes may be padded to a packing unit).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    axis: Axis
    head_dim: int

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nbytes(self) -> tuple[int, int, int]:
        """Bytes held as ``(codes, scales, zeros)``."""
        return (
            self.codes.numel() * self.codes.element_size(),
            self.scale.numel() * self.scale.element_size(),
            self.zero.numel() * self.zero.element_size(),
        )

    @property
    def segment(self) -> int:
        """Packing segment: one group per segment on the token axis, the whole head_dim on the channel axis."""
        return self.group_size if self.axis == "token" else self.head_dim

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``codes * scale + zero`` as ``[B, H, T, D]`` in ``dtype`` (computed in fp32).

        If ``out`` is given (shape ``[B, H, T, D]``, possibly a strided view of a larger buffer) the result is
        written there and ``out`` is returned. Each code plane is multiplied by its scale straight into the
        output, then the zeros are added in place: two passes over the output, no intermediate codes tensor.
        """
        B, H, T, _ = self.codes.shape
        D, g = self.head_dim, self.group_size
        if out is None:
            out = torch.empty((B, H, T, D), dtype=dtype, device=self.codes.device)
        work = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
        planes = code_planes(self.codes, self.bits, D, self.segment)
        k = len(planes)
        scale, zero = self.scale.float(), self.zero.float()
        if self.axis == "token":
            # planes: [B, H, T, D/g, g/k]; plane p covers positions [p g/k, (p+1) g/k) of every group
            grouped = work.view(B, H, T, D // g, k, g // k)
            s = scale.unsqueeze(-1)
            for p, plane in enumerate(planes):
                torch.mul(plane, s, out=grouped[..., p, :])
            work.view(B, H, T, D // g, g).add_(zero.unsqueeze(-1))
        else:
            # planes: [B, H, T, D/k]; plane p covers head_dim columns [p D/k, (p+1) D/k)
            grouped = work.view(B, H, T // g, g, D)
            s = scale.unsqueeze(-2)
            m = D // k
            for p, plane in enumerate(planes):
                cols = slice(p * m, (p + 1) * m)
                torch.mul(plane.reshape(B, H, T // g, g, m), s[..., cols], out=grouped[..., cols])
            grouped.add_(zero.unsqueeze(-2))
        if not (out.dtype == torch.float32 and self.scale.dtype == torch.float16):
            # outward-rounded scales can carry the top of a group just past the dtype's largest finite value
            finfo = torch.finfo(out.dtype)
            work.clamp_(finfo.min, finfo.max)
        if work is not out:
            out.copy_(work)
        return out

    def unpacked_codes(self) -> torch.Tensor:
        """The integer codes as ``uint8 [B, H, T, D]`` (for inspection; dequantization does not need them)."""
        return unpack(self.codes, self.bits, self.head_dim, self.segment)

    def cat(self, other: QuantizedTensor) -> QuantizedTensor:
        """Concatenate along tokens (``self`` first)."""
        return QuantizedTensor(
            torch.cat([self.codes, other.codes], dim=-2),
            torch.cat([self.scale, other.scale], dim=-2),
            torch.cat([self.zero, other.zero], dim=-2),
            self.bits,
            self.group_size,
            self.axis,
            self.head_dim,
        )

    def _map(self, fn) -> QuantizedTensor:
        return QuantizedTensor(
            fn(self.codes), fn(self.scale), fn(self.zero), self.bits, self.group_size, self.axis, self.head_dim
        )

    def index_select(self, dim: int, index: torch.Tensor) -> QuantizedTensor:
        """Select along a leading dimension (0: batch, 1: heads) of every stored tensor."""
        if dim not in (0, 1):
            raise ValueError("QuantizedTensor.index_select selects along batch (0) or heads (1) only")
        return self._map(lambda t: t.index_select(dim, index.to(t.device)))

    def gather_tokens(self, index: torch.Tensor) -> QuantizedTensor:
        """Keep the tokens ``index`` ``LongTensor [B, H, K]`` (per row and head, in that order); token axis only."""
        if self.axis != "token":
            raise ValueError("only per-token quantized tensors can drop single tokens; channel groups span tokens")
        return self._map(lambda t: t.gather(2, index.unsqueeze(-1).expand(*index.shape, t.shape[-1])))

    def repeat_interleave(self, repeats: int) -> QuantizedTensor:
        """Repeat every batch row ``repeats`` times."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedTensor:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def keep_tokens(self, count: int) -> QuantizedTensor:
        """Keep the first ``count`` tokens (``count`` a multiple of ``group_size`` on the channel axis)."""
        if self.axis == "channel":
            if count % self.group_size:
                raise ValueError("channel-axis tensors can only be cut at group boundaries")
            meta = count // self.group_size
        else:
            meta = count
        return QuantizedTensor(
            self.codes[..., :count, :],
            self.scale[..., :meta, :],
            self.zero[..., :meta, :],
            self.bits,
            self.group_size,
            self.axis,
            self.head_dim,
        )


def check_group_size(group_size: int, head_dim: int | None = None, axis: str = "token", bits: int | None = None) -> None:
    """Raise ``ValueError`` unless ``group_size`` can group and pack ``head_dim``-wide heads.

    Token axis: ``group_size`` divides ``head_dim`` and is a multiple of the packing unit (2 codes for 4 bits, 4 for
    2 bits, 8 for 3 bits). Channel axis: ``head_dim`` is a multiple of the packing unit.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    unit = codes_per_unit(bits) if bits is not None else 1
    if axis == "token":
        if head_dim is not None and head_dim % group_size:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0 and d % unit == 0]
            raise ValueError(
                f"group_size={group_size} does not divide head_dim={head_dim}; per-token groups must be one of "
                f"{divisors}"
            )
        if group_size % unit:
            raise ValueError(f"{bits}-bit codes pack {unit} to a unit: per-token group_size must be a multiple of {unit}")
    elif head_dim is not None and head_dim % unit:
        raise ValueError(f"{bits}-bit codes pack {unit} to a unit: head_dim={head_dim} is not a multiple of {unit}")


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: Axis = "token",
    meta_dtype: torch.dtype | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` of shape ``[B, H, T, D]`` group-wise (see the module docstring for the formula).

    Args:
        x: floating point tensor ``[batch, kv_heads, tokens, head_dim]``.
        bits: 2, 3, 4 or 8.
        group_size: ``g``; must divide ``head_dim`` (token axis) or ``tokens`` (channel axis).
        axis: ``"token"`` (groups along head_dim) or ``"channel"`` (groups along tokens).
        meta_dtype: dtype of the stored scales and zeros; default bf16 for bf16 input, fp16 otherwise.

    Returns:
        A :class:`QuantizedTensor` whose :meth:`~QuantizedTensor.dequantize` is within ``scale / 2`` of ``x``.
    """
    check_bits(bits)
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    if x.dim() != 4:
        raise ValueError(f"expected a [batch, heads, tokens, head_dim] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"can only quantize floating point tensors, got {x.dtype}")
    B, H, T, D = x.shape
    check_group_size(group_size, D, axis, bits)
    if axis == "channel" and T % group_size:
        raise ValueError(f"channel-axis quantization needs whole groups: {T} tokens is not a multiple of {group_size}")
    meta_dtype = meta_dtype or default_meta_dtype(x.dtype)
    if meta_dtype not in META_DTYPES:
        raise ValueError(f"scale dtype must be one of {META_DTYPES}, got {meta_dtype}")

    packed, scale, zero, finite = quantize_math(
        x, bits=bits, group_size=group_size, axis=axis, meta_dtype=meta_dtype
    )
    # non-finite input makes a scale or zero non-finite; so does a wider dtype's range overflowing the scales
    if not bool(finite):
        found = nonfinite_found(x)
        if found:
            raise nonfinite_error("states to quantize", found)
        if x.dtype == torch.float32 and meta_dtype != torch.float32:
            raise ValueError(
                f"KV values exceed the range of the {meta_dtype} scales and zeros (largest finite "
                f"{torch.finfo(meta_dtype).max:g}); pass scale_dtype=torch.float32 to store them in fp32"
            )
        raise ValueError(
            f"KV values within one quantization group span more than the float32 range "
            f"({torch.finfo(torch.float32).max:g}); values this extreme cannot be quantized group-wise: keep this "
            "layer at model precision (16 bits)"
        )
    return QuantizedTensor(packed, scale, zero, bits, group_size, axis, D)


def quantize_math(
    x: torch.Tensor, *, bits: int, group_size: int, axis: str, meta_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arithmetic of :func:`quantize` on checked arguments, as plain tensor operations (the compiled
    quantize-and-append of the decode path traces this very function).

    Returns ``(packed codes, scale, zero, finite)``; ``finite`` is a 0-d bool tensor: every scale and zero finite.
    """
    B, H, T, D = x.shape
    xf = x.float()
    if axis == "token":
        grouped = xf.view(B, H, T, D // group_size, group_size)
        reduce_dim = -1
    else:
        grouped = xf.view(B, H, T // group_size, group_size, D)
        reduce_dim = -2
    lo, hi = grouped.amin(reduce_dim), grouped.amax(reduce_dim)
    qmax = (1 << bits) - 1
    # a group's min is one of its elements: exact in the metadata dtype when that is the input dtype
    zero = lo.to(meta_dtype) if meta_dtype == x.dtype else _narrow(lo, meta_dtype, -1)
    zero32 = zero.float()
    scale = _narrow((hi - zero32) / qmax, meta_dtype, +1)
    finite = torch.isfinite(scale).all() & torch.isfinite(zero).all()
    inv = torch.nan_to_num(scale.float().reciprocal(), posinf=0.0)
    codes = ((grouped - zero32.unsqueeze(reduce_dim)) * inv.unsqueeze(reduce_dim)).round().clamp(0, qmax)
    segment = group_size if axis == "token" else D
    return pack(codes.to(torch.uint8).view(B, H, T, D), bits, segment), scale, zero, finite


#: steps of at most this many new tokens quantize through the compiled kernel (:func:`quantize_step`)
STEP_TOKENS = 16


@functools.cache
def _quantize_kernel(bits: int, group_size: int, axis: str, meta_dtype: torch.dtype, shapes: tuple = ()) -> Kernel:
    """One kernel per layout and per input shape class (``shapes``: heads, head_dim, dtype, device)."""
    statics = dict(bits=bits, group_size=group_size, axis=axis, meta_dtype=meta_dtype)
    name = f"quantize_{bits}b_g{group_size}_{axis}_{str(meta_dtype).split('.')[-1]}"
    # batch dynamic; tokens too on the token axis (the channel axis quantizes whole groups: g tokens per flush)
    dynamic = [(0, 0), (0, 2)] if axis == "token" else [(0, 0)]
    # emulate_precision_casts: inductor would otherwise fold the fp32 -> fp16 -> fp32 round trip of the outward
    # rounding into a no-op; with it the compiled codes, scales and zeros are the eager ones, bit for bit
    return Kernel(quantize_math, name, statics, dynamic=dynamic, options={"emulate_precision_casts": True})


def quantize_step(
    x: torch.Tensor, bits: int, group_size: int, axis: Axis = "token", meta_dtype: torch.dtype | None = None
) -> QuantizedTensor:
    """:func:`quantize` for the few new tokens of a decode step (at most :data:`STEP_TOKENS`), through one compiled
    kernel instead of about twenty small eager operations: the same codes, scales and zeros, bit for bit. Where
    compiling is off (``KVCACHE_PLUGINS_COMPILE=0``) or fails, and for longer inputs, it is :func:`quantize`.
    """
    meta_dtype = meta_dtype or default_meta_dtype(x.dtype)
    if not compiler.COMPILE or x.dim() != 4 or x.shape[-2] > STEP_TOKENS or not x.is_floating_point():
        return quantize(x, bits, group_size, axis, meta_dtype)
    shapes = (x.shape[1], x.shape[3], x.dtype, x.device.type)
    variant = ("quantize", bits, group_size, axis, meta_dtype, *shapes, x.shape[0] == 1, x.shape[2] == 1)
    out = compiler.call_kernel(_quantize_kernel(bits, group_size, axis, meta_dtype, shapes), (x,), variant)
    if out is None or not bool(out[3]):
        return quantize(x, bits, group_size, axis, meta_dtype)  # no compiler; or the clear error of a bad range
    return QuantizedTensor(out[0], out[1], out[2], bits, group_size, axis, x.shape[-1])


def packed_nbytes(shape: tuple[int, int, int, int], bits: int, group_size: int, axis: Axis, meta_bytes: int = 2) -> int:
    """Closed-form bytes of a quantized ``[B, H, T, D]`` tensor: codes plus scale and zero per group."""
    B, H, T, D = shape
    groups = T * (D // group_size) if axis == "token" else (T // group_size) * D
    return B * H * (T * packed_last_dim(D, bits) + 2 * groups * meta_bytes)
