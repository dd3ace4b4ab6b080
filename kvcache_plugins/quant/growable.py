"""Packed codes, scales and zeros that grow in place.

Appending a token to a :class:`~kvcache_plugins.quant.groupwise.QuantizedTensor` with ``cat`` copies the whole stored
history every step. :class:`GrowableQuantized` keeps the three tensors in buffers with spare capacity (amortised
growth: at least 1/4 more every time it must reallocate) and writes new tokens into the free part. The stored
tokens are always readable as an ordinary ``QuantizedTensor`` of views (:meth:`view`), so everything that reads
quantized tensors (dequantization, selection, serialization) keeps working.

Unused capacity is zero-filled: a kernel may read the whole buffers (:meth:`buffers`) and mask the slots past the
stored tokens; zero scales and zeros keep those values finite. Compiled kernels read whole buffers rather than views
of their used part because a view's strides depend on the capacity, and the compiler would specialise on them.
"""

from __future__ import annotations

import torch

from .groupwise import QuantizedTensor

#: growth granule in tokens (a multiple of every supported channel group size up to 128)
GRANULE = 128
#: reallocations grow the capacity by at least this fraction (amortised copies; kernels read at most this much padding)
GROWTH = 1 / 16


def next_capacity(capacity: int, needed: int, multiple: int = 1) -> int:
    """The capacity after growing ``capacity`` to hold ``needed``: at least :data:`GROWTH` more, rounded up to a
    multiple of ``multiple`` (amortised: a growing tensor is copied O(log) times, not every step)."""
    grown = max(needed, capacity + int(capacity * GROWTH))
    return multiple * -(-grown // multiple)


class GrowableQuantized:
    """A ``QuantizedTensor`` ``[B, H, T, D]`` stored in buffers of capacity ``>= T`` tokens.

    Args:
        first: the initial content (adopted without copying when it is already contiguous).
    """

    def __init__(self, first: QuantizedTensor) -> None:
        self.bits, self.group_size, self.axis, self.head_dim = first.bits, first.group_size, first.axis, first.head_dim
        self.tokens = first.num_tokens
        self.codes, self.scale, self.zero = first.codes, first.scale, first.zero

    # ------------------------------------------------------------------ sizes
    def _meta_rows(self, tokens: int) -> int:
        return tokens if self.axis == "token" else tokens // self.group_size

    @property
    def capacity(self) -> int:
        return self.codes.shape[-2]

    def _granule(self) -> int:
        g = self.group_size if self.axis == "channel" else 1
        return g * -(-GRANULE // g)

    def reserve(self, tokens: int, multiple: int | None = None) -> None:
        """Make room for ``tokens`` tokens in all, growing by at least :data:`GROWTH` when it must reallocate.
        With ``multiple``, the capacity also becomes a multiple of it (reallocating if it is not)."""
        multiple = multiple or self._granule()
        if tokens <= self.capacity and self.capacity % multiple == 0:
            return
        if tokens > self.capacity:
            self.resize(next_capacity(self.capacity, tokens, multiple))
        else:
            self.resize(multiple * -(-tokens // multiple))

    def resize(self, capacity: int) -> None:
        """Reallocate to exactly ``capacity >= tokens`` tokens (zero-filled past the stored ones)."""
        if capacity == self.capacity:
            return
        if capacity < self.tokens or (self.axis == "channel" and capacity % self.group_size):
            raise ValueError(f"cannot hold {self.tokens} tokens of this tensor in a capacity of {capacity}")
        used = self._meta_rows(self.tokens)

        def grown(t: torch.Tensor, rows: int, used_rows: int) -> torch.Tensor:
            out = t.new_zeros((*t.shape[:-2], rows, t.shape[-1]))
            out[..., :used_rows, :].copy_(t[..., :used_rows, :])
            return out

        self.codes = grown(self.codes, capacity, self.tokens)
        self.scale = grown(self.scale, self._meta_rows(capacity), used)
        self.zero = grown(self.zero, self._meta_rows(capacity), used)

    # ------------------------------------------------------------------ access
    def view(self, tokens: int | None = None) -> QuantizedTensor:
        """The first ``tokens`` (default: all stored) tokens as a ``QuantizedTensor`` of views."""
        tokens = self.tokens if tokens is None else tokens
        rows = self._meta_rows(tokens)
        return QuantizedTensor(
            self.codes[..., :tokens, :], self.scale[..., :rows, :], self.zero[..., :rows, :],
            self.bits, self.group_size, self.axis, self.head_dim,
        )

    def buffers(self) -> QuantizedTensor:
        """The whole buffers (``capacity`` tokens: the stored ones, then zero-valued or stale but finite slots)."""
        return QuantizedTensor(self.codes, self.scale, self.zero, self.bits, self.group_size, self.axis, self.head_dim)

    def append(self, q: QuantizedTensor) -> None:
        """Store ``q``'s tokens after the stored ones (same batch, heads, layout)."""
        n = q.num_tokens
        if self.codes.is_inference() and not torch.is_inference_mode_enabled():
            # buffers made under torch.inference_mode() (a prefill run there) cannot be written outside it: own them
            self.codes, self.scale, self.zero = (t.clone() for t in (self.codes, self.scale, self.zero))
        self.reserve(self.tokens + n)
        start, rows = self.tokens, self._meta_rows(self.tokens)
        self.codes[..., start : start + n, :].copy_(q.codes)
        self.scale[..., rows : rows + q.scale.shape[-2], :].copy_(q.scale)
        self.zero[..., rows : rows + q.zero.shape[-2], :].copy_(q.zero)
        self.tokens += n

    def reserved_nbytes(self) -> int:
        """Bytes allocated beyond the stored tokens (growth room)."""
        used = sum(self.view().nbytes())
        allocated = sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))
        return allocated - used
