"""Token storage of one of K or V of one layer: :class:`KVStream`.

A stream stores its tokens as three consecutive spans::

    [ sink tokens (model dtype) | quantized body (packed codes + scales/zeros) | residual (model dtype) ]

New tokens enter the residual; as soon as the residual holds more than ``residual_length`` tokens (on the
channel axis: more than ``residual_length`` plus at least one whole group), the oldest of them are quantized and
appended to the body. Tokens are quantized once, when they leave the residual: the body is never re-quantized.
The body lives in growable buffers (:class:`~kvcache_plugins.quant.growable.GrowableQuantized`): appending writes
into spare capacity instead of concatenating the whole body.
"""

from __future__ import annotations

import torch

from ..quant.groupwise import QuantizedTensor, quantize, quantize_step
from ..quant.growable import GrowableQuantized
from ..quant.spec import TensorQuantSpec
from .accounting import CacheBytes, tensor_bytes
from .base import Workspace, assemble


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor that owns exactly its elements (a slice would keep its whole base storage alive)."""
    if t is None or t.shape[-2] == 0:
        return None
    return t.clone() if t._base is not None else t


class KVStream:
    """Token storage for one of K or V of one layer (see the module docstring).

    Args:
        spec: bits, axis and group size for this tensor.
        residual_length: newest tokens kept in the model dtype.
        sink_tokens: first tokens kept in the model dtype.
        meta_dtype: dtype of scales and zeros; ``None`` picks bf16 for bf16 input, fp16 otherwise.
        workspace: where dequantized states are assembled (``None``: fresh tensors) and the role in it.
    """

    def __init__(
        self,
        spec: TensorQuantSpec,
        residual_length: int = 0,
        sink_tokens: int = 0,
        meta_dtype: torch.dtype | None = None,
        workspace: Workspace | None = None,
        role: str = "key",
    ) -> None:
        self.spec = spec
        self.workspace = workspace
        self.role = role
        self.residual_length = residual_length
        self.sink_tokens = sink_tokens if spec.quantized else 0
        self.meta_dtype = meta_dtype
        self.sink: torch.Tensor | None = None
        self.grown: GrowableQuantized | None = None
        self.residual: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None
        #: quantize decode steps through the compiled kernel (:func:`quantize_step`; set for fused layers)
        self.compiled_steps = False

    @property
    def body(self) -> QuantizedTensor | None:
        """The quantized tokens (views of growable buffers)."""
        return None if self.grown is None else self.grown.view()

    @body.setter
    def body(self, value: QuantizedTensor | None) -> None:
        self.grown = None if value is None or value.num_tokens == 0 else GrowableQuantized(value)

    # ----------------------------------------------------------------- sizes
    @property
    def sink_len(self) -> int:
        return 0 if self.sink is None else self.sink.shape[-2]

    @property
    def body_len(self) -> int:
        return 0 if self.grown is None else self.grown.tokens

    @property
    def residual_len(self) -> int:
        return 0 if self.residual is None else self.residual.shape[-2]

    def __len__(self) -> int:
        return self.sink_len + self.body_len + self.residual_len

    def _any(self) -> torch.Tensor | None:
        for t in (self.sink, self.residual):
            if t is not None:
                return t
        return None if self.body is None else self.body.codes

    # ----------------------------------------------------------------- read
    def materialize_into(self, out: torch.Tensor) -> None:
        """Write the stored tokens, dequantized, into ``out`` of shape ``[B, H, len(self), D]``."""
        start = 0
        if self.sink is not None:
            out[..., : self.sink_len, :].copy_(self.sink)
            start = self.sink_len
        if self.body is not None:
            self.body.dequantize(out.dtype, out=out[..., start : start + self.body_len, :])
            start += self.body_len
        if self.residual is not None:
            out[..., start:, :].copy_(self.residual)

    def materialize(self) -> torch.Tensor | None:
        """All stored tokens as one ``[B, H, T, D]`` tensor in the model dtype (``None`` when empty)."""
        ref = self._any()
        if ref is None:
            return None
        if self.body is None and self.sink is None:
            return self.residual
        B, H = ref.shape[:2]
        D = self.body.head_dim if self.body is not None else ref.shape[-1]
        out = torch.empty((B, H, len(self), D), dtype=self.dtype, device=ref.device)
        self.materialize_into(out)
        return out

    # ----------------------------------------------------------------- write
    def extend(self, x: torch.Tensor) -> torch.Tensor:
        """Store ``x`` ``[B, H, n, D]`` and return ``[stored past (dequantized), x]`` of shape ``[B, H, T+n, D]``."""
        if self.dtype is None:
            self.dtype = x.dtype
        past = len(self)
        if past == 0:
            full = x
        elif self.body is None and self.sink is None:
            full = torch.cat([self.residual, x], dim=-2)
        else:
            full = assemble(self.workspace, self.role, x, past, self.materialize_into)
        self._store(x)
        return full

    def _store(self, x: torch.Tensor) -> None:
        if not self.spec.quantized:
            self.residual = _cat(self.residual, x)
            return
        if self.sink_len < self.sink_tokens:
            take = min(x.shape[-2], self.sink_tokens - self.sink_len)
            self.sink = _own(_cat(self.sink, x[..., :take, :]))
            x = x[..., take:, :]
            if x.shape[-2] == 0:
                return
        if self.residual is None and self.residual_length == 0 and self.spec.axis == "token":
            self._append_body(x)  # nothing stays at full precision: skip the residual round trip
            return
        self.residual = _cat(self.residual, x)
        self._flush()

    def _append_body(self, x: torch.Tensor) -> None:
        spec = self.spec
        quantizer = quantize_step if self.compiled_steps else quantize
        q = quantizer(x, spec.bits, spec.group_size, spec.axis, self.meta_dtype)
        if self.grown is None:
            self.grown = GrowableQuantized(q)
        else:
            self.grown.append(q)

    def _flush(self) -> None:
        excess = self.residual_len - self.residual_length
        if self.spec.axis == "channel":
            excess -= excess % self.spec.group_size
        if excess <= 0:
            return
        self._append_body(self.residual[..., :excess, :])
        self.residual = _own(self.residual[..., excess:, :])

    # ----------------------------------------------------------------- edit
    def crop(self, n: int) -> None:
        """Drop the newest ``n`` tokens.

        Per-token bodies are cut exactly. On the channel axis a cut inside a group moves that group's surviving
        tokens back to the residual with the values they were stored at (their dequantized values).
        """
        if n <= 0:
            return
        take = min(n, self.residual_len)
        if take:
            self.residual = _own(self.residual[..., : self.residual_len - take, :])
            n -= take
        if n and self.body is not None:
            take = min(n, self.body_len)
            keep = self.body_len - take
            n -= take
            if self.body.axis == "channel" and keep % self.body.group_size:
                whole = keep - keep % self.body.group_size
                tail = self.body.dequantize(self.dtype)[..., whole:keep, :]
                self.residual = _own(_cat(tail, self.residual)) if self.residual is not None else tail.clone()
                keep = whole
            self.body = self.body.keep_tokens(keep) if keep else None
        if n and self.sink is not None:
            self.sink = _own(self.sink[..., : self.sink_len - min(n, self.sink_len), :])

    def map_batch(self, fn_tensor, fn_quant) -> None:
        """Apply a batch-dimension edit to every stored part."""
        if self.sink is not None:
            self.sink = fn_tensor(self.sink)
        if self.residual is not None:
            self.residual = fn_tensor(self.residual)
        if self.body is not None:
            self.body = fn_quant(self.body)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> None:
        self.map_batch(lambda t: t.to(device, non_blocking=non_blocking), lambda q: q.to(device, non_blocking))

    def nbytes(self) -> CacheBytes:
        out = CacheBytes(full_precision=tensor_bytes(self.sink) + tensor_bytes(self.residual))
        if self.grown is not None:
            out.codes, out.scales, out.zeros = self.grown.view().nbytes()
        return out

    def reserved_nbytes(self) -> int:
        """Bytes allocated beyond the stored tokens (growth room of the packed buffers)."""
        return 0 if self.grown is None else self.grown.reserved_nbytes()


def _dequantize_span(q: QuantizedTensor, start: int, dtype: torch.dtype) -> torch.Tensor:
    """Tokens ``[start, T)`` of ``q``, dequantized to ``[B, H, T - start, D]``."""
    first = start - start % q.group_size if q.axis == "channel" else start
    rows = slice(first // q.group_size if q.axis == "channel" else first, None)
    tail = QuantizedTensor(
        q.codes[..., first:, :], q.scale[..., rows, :], q.zero[..., rows, :], q.bits, q.group_size, q.axis, q.head_dim
    )
    return tail.dequantize(dtype)[..., start - first :, :]

