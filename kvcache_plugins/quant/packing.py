"""Dense bit packing of integer codes into ``uint8`` storage.

The last dimension of ``n`` codes is cut into segments of ``s`` codes (``s`` divides ``n``; by default ``s = n``)
and every segment is packed *planar*: with ``k`` codes per packing unit and ``m = s / k`` units per segment,
unit ``j`` holds codes ``j, j + m, ..., j + (k-1) m`` of its segment. Unpacking yields ``k`` code *planes* of
shape ``[..., n / s, m]``; plane ``p`` holds segment positions ``[p m, (p+1) m)``. Quantizers use one segment per
group, so every plane lines up with its group's scale and dequantization needs no shuffling.

* 8 bits: one code per byte (``k = 1``);
* 4 bits: ``byte_j = c[j] | c[j + m] << 4``;
* 2 bits: ``byte_j = c[j] | c[j + m] << 2 | c[j + 2m] << 4 | c[j + 3m] << 6``;
* 3 bits: eight codes in three bytes, ``v_j = sum_p c[j + p m] << 3p``, stored as three byte planes
  ``[v_j & 0xFF]_j, [(v_j >> 8) & 0xFF]_j, [v_j >> 16]_j`` per segment.

Every byte is real storage; :func:`packed_last_dim` gives the count.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)

# codes per packing unit, bytes per packing unit
_UNIT: dict[int, tuple[int, int]] = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (8, 3)}


def check_bits(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is a packable code width."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in _UNIT:
        raise ValueError(f"bits={bits!r} cannot be packed; supported code widths are {SUPPORTED_BITS}")


def codes_per_unit(bits: int) -> int:
    """``k``: codes in one packing unit (1, 2, 4 or 8); segments must be a multiple of it."""
    check_bits(bits)
    return _UNIT[bits][0]


def packed_last_dim(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy: ``n * bits / 8`` (``n`` a multiple of the unit)."""
    check_bits(bits)
    k, u = _UNIT[bits]
    if n % k:
        raise ValueError(f"{bits}-bit codes pack in units of {k}; {n} codes is not a multiple of {k}")
    return (n // k) * u


def _check_segment(n: int, bits: int, segment: int | None) -> int:
    k = codes_per_unit(bits)
    segment = n if segment is None else segment
    if segment <= 0 or n % segment or segment % k:
        raise ValueError(
            f"cannot pack {n} codes of {bits} bits in segments of {segment}: the segment must divide {n} and be a "
            f"multiple of {k}"
        )
    return segment


def pack(codes: torch.Tensor, bits: int, segment: int | None = None) -> torch.Tensor:
    """Pack codes ``uint8 [..., n]`` (values in ``[0, 2**bits)``) into ``uint8 [..., n * bits / 8]``."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8, got {codes.dtype}")
    n = codes.shape[-1]
    segment = _check_segment(n, bits, segment)
    if bits == 8:
        return codes.contiguous()
    k = codes_per_unit(bits)
    m = segment // k
    seg = codes.reshape(*codes.shape[:-1], n // segment, k, m)
    if bits == 3:
        acc = seg[..., 0, :].to(torch.int32)
        for p in range(1, 8):
            acc = acc | (seg[..., p, :].to(torch.int32) << (3 * p))
        out = torch.stack([((acc >> (8 * b)) & 0xFF).to(torch.uint8) for b in range(3)], dim=-2)
    else:
        out = seg[..., 0, :].clone()
        for p in range(1, k):
            out |= seg[..., p, :] << (bits * p)
    return out.reshape(*codes.shape[:-1], -1)


def _repeat_byte(b: int) -> int:
    return int.from_bytes(bytes([b]) * 8, "little")


def code_planes(packed: torch.Tensor, bits: int, n: int, segment: int | None = None) -> list[torch.Tensor]:
    """The ``k`` code planes of packed data, each ``[..., n / segment, segment / k]`` (uint8, int32 for 3 bits)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be torch.uint8, got {packed.dtype}")
    segment = _check_segment(n, bits, segment)
    expected = packed_last_dim(n, bits)
    if packed.shape[-1] != expected:
        raise ValueError(f"{n} codes of {bits} bits occupy {expected} bytes, got {packed.shape[-1]}")
    lead = packed.shape[:-1]
    k = codes_per_unit(bits)
    m = segment // k
    if bits == 8:
        return [packed.reshape(*lead, n // segment, segment)]
    if bits == 3:
        b = packed.reshape(*lead, n // segment, 3, m).to(torch.int32)
        acc = b[..., 0, :] | (b[..., 1, :] << 8) | (b[..., 2, :] << 16)
        return [(acc >> (3 * p)) & 0x7 for p in range(8)]
    mask = (1 << bits) - 1
    if packed.is_contiguous() and packed.shape[-1] % 8 == 0:
        # eight bytes per op: shifting an int64 moves bits across byte borders, the per-byte mask removes them
        wide = packed.view(torch.int64)
        wide_mask = _repeat_byte(mask)
        planes = [((wide >> (bits * p)) if p else wide) & wide_mask for p in range(k)]
        planes = [p.view(torch.uint8) for p in planes]
    else:
        planes = [((packed >> (bits * p)) if p else packed) & mask for p in range(k)]
    return [p.reshape(*lead, n // segment, m) for p in planes]


def unpack(packed: torch.Tensor, bits: int, n: int, segment: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8 [..., n * bits / 8]`` -> codes ``uint8 [..., n]``."""
    planes = code_planes(packed, bits, n, segment)
    stacked = torch.stack([p.to(torch.uint8) for p in planes], dim=-2)
    return stacked.reshape(*packed.shape[:-1], n)
