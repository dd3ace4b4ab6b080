"""Exact byte accounting of what a cache holds.

Every figure counts real storage: packed codes, scales, zeros, full-precision tensors (residual windows, sink
tokens, unquantized layers) and position indices. ``reference`` is what a plain ``DynamicCache`` would hold for the
same tokens with 16-bit keys and values, so ``bandwidth = total / reference`` is the fraction of fp16/bf16 bytes
a method really spends (the "% bandwidth" column of the research tables).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

REFERENCE_BYTES_PER_ELEMENT = 2  # fp16 / bf16


def tensor_bytes(t: torch.Tensor | None) -> int:
    """Bytes held by ``t``'s elements (0 for ``None``)."""
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class CacheBytes:
    """Bytes held by a cache (or one layer of it), by kind.

    Attributes:
        codes: packed integer codes.
        scales: quantization scales.
        zeros: quantization zero points.
        full_precision: tensors kept in the model dtype (residual windows, sinks, unquantized layers).
        indices: kept-position indices of evicting caches.
        reference: bytes of the same logical tokens as 16-bit keys and values in every layer.
    """

    codes: int = 0
    scales: int = 0
    zeros: int = 0
    full_precision: int = 0
    indices: int = 0
    reference: int = 0

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.zeros + self.full_precision + self.indices

    @property
    def bandwidth(self) -> float:
        """``total / reference`` (1.0 for an fp16 DynamicCache; nan for an empty cache)."""
        return self.total / self.reference if self.reference else float("nan")

    def __add__(self, other: CacheBytes) -> CacheBytes:
        return CacheBytes(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = asdict(self)
        out["total"] = self.total
        out["bandwidth"] = self.bandwidth
        return out


def reference_bytes(batch: int, heads: int, tokens: int, head_dim: int) -> int:
    """16-bit bytes of K and V for ``tokens`` tokens of one layer: ``2 * B * H * T * D * 2``."""
    return 2 * batch * heads * tokens * head_dim * REFERENCE_BYTES_PER_ELEMENT
