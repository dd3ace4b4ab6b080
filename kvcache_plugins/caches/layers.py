"""Per-layer storage of quantized keys and values.

A :class:`KVStream` stores one of K or V of one layer as three consecutive token spans::

    [ sink tokens (model dtype) | quantized body (packed codes + scales/zeros) | residual (model dtype) ]

New tokens enter the residual; as soon as the residual holds more than ``residual_length`` tokens (on the
channel axis: more than ``residual_length`` plus at least one whole group), the oldest of them are quantized and
appended to the body. Tokens are quantized once, when they leave the residual: the body is never re-quantized.

:class:`MixedPrecisionLayer` is a ``transformers.DynamicLayer`` built from two streams. Its ``update`` returns the
stored past (dequantized) followed by the new tokens at full precision, so a forward pass always attends to its own
new tokens exactly, and later forwards see them as stored.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicLayer

from .._compat import crop_count
from ..attention.fused import FUSED_MAX_QUERIES, FusedStep, Layout, chunk_tokens
from ..quant.groupwise import QuantizedTensor, default_meta_dtype, quantize, quantize_step
from ..quant.growable import GrowableQuantized
from ..quant.spec import LayerQuantSpec, TensorQuantSpec
from .accounting import CacheBytes, reference_bytes, tensor_bytes
from .state import (
    SCALE_DTYPES,
    ModelFacts,
    StateReader,
    empty_state,
    is_empty,
    put_stored,
    read_stored,
    register_layer,
)


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=-2)


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor that owns exactly its elements (a slice would keep its whole base storage alive)."""
    if t is None or t.shape[-2] == 0:
        return None
    return t.clone() if t._base is not None else t


class Workspace:
    """Reusable buffers that hold a layer's dequantized keys or values while its attention runs.

    ``update`` has to hand attention dense ``[B, H, T, D]`` states. Allocating them afresh at every step costs
    page faults on large tensors; instead each cache keeps one growing buffer per role (``"key"``/``"value"``),
    device and shape, shared by all of its layers, and returns views of it. The states a layer returns are only
    read by that layer's attention, so the next layer may overwrite them. While autograd records (``requires_grad``
    inputs) fresh tensors are used instead, as autograd may keep them for the backward pass.

    The buffers are transient working memory, not cache storage: :meth:`nbytes` reports them apart.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, like: torch.Tensor, tokens: int) -> torch.Tensor:
        """A ``[B, H, tokens, D]`` tensor shaped, typed and placed like ``like`` (contents undefined)."""
        B, H, _, D = like.shape
        if torch.is_grad_enabled() and like.requires_grad:
            return torch.empty((B, H, tokens, D), dtype=like.dtype, device=like.device)
        key = (role, like.device, like.dtype, B, H, D)
        buf = self._buffers.get(key)
        # a buffer made under torch.inference_mode() (prefill_context's chunks) cannot be written outside it
        stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
        if buf is None or stale or buf.shape[-2] < tokens:
            capacity = tokens + max(64, tokens // 8)
            buf = torch.empty((B, H, capacity, D), dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[..., :tokens, :]

    def nbytes(self) -> int:
        return sum(tensor_bytes(b) for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


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
            B, H, n, D = x.shape
            if self.workspace is not None:
                full = self.workspace.get(self.role, x, past + n)
            else:
                full = torch.empty((B, H, past + n, D), dtype=x.dtype, device=x.device)
            self.materialize_into(full[..., :past, :])
            full[..., past:, :].copy_(x)
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


def refuse_state_write(layer: DynamicLayer, name: str, value: torch.Tensor | None) -> None:
    """Setter of the read-only ``keys`` / ``values`` of our layers: ``DynamicLayer.__init__`` assigns ``None``
    (ignored); anything else would bypass the layer's own storage."""
    if value is not None:
        raise AttributeError(
            f"{type(layer).__name__}.{name} is read-only (the dequantized stored tokens); the layer stores its own "
            "encoding: add tokens with update(), edit with crop() / batch_select_indices() / reorder_cache()"
        )


class ReadOnlyStates:
    """``DynamicLayer.keys`` / ``.values`` for readers of a cache whose layers keep their own encoding.

    ``keys`` / ``values`` are ``[B, H, T, D]`` tensors computed by :meth:`_read` (``0``: keys, ``1``: values;
    ``None`` while the layer holds nothing): dequantized, reconstructed or gathered from the layer's storage. Writing
    them is refused (:func:`refuse_state_write`). List it before ``DynamicLayer`` among the bases.
    """

    def _read(self, which: int) -> torch.Tensor | None:
        raise NotImplementedError

    @property
    def keys(self) -> torch.Tensor | None:
        return self._read(0)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        refuse_state_write(self, "keys", value)

    @property
    def values(self) -> torch.Tensor | None:
        return self._read(1)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        refuse_state_write(self, "values", value)


class RowEdits:
    """The batch-dimension edits ``generate`` makes (beam reordering, row selection, repeats, offloading) for a layer
    whose :meth:`_map_rows` applies ``fn`` to every stored tensor with rows first. List it before ``DynamicLayer``."""

    def _map_rows(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._map_rows(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        self._map_rows(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map_rows(lambda t: t.to(self.device, non_blocking=True))


def _as_index(indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    indices = indices.to(device)
    return indices.nonzero().flatten() if indices.dtype == torch.bool else indices.long()


@register_layer("mixed")
class MixedPrecisionLayer(ReadOnlyStates, DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are stored at the widths of a :class:`LayerQuantSpec`.

    ``update(k, v)`` takes ``[B, H, n, D]`` states and returns ``[B, H, T + n, D]`` states: the stored past,
    dequantized, followed by the new states unchanged.

    When keys and values share one spec they are stored as one stream stacked along the batch dimension
    (``[2B, H, T, D]``: keys in rows ``[0, B)``, values in ``[B, 2B)``), which halves the number of tensor
    operations per step; otherwise keys and values have a stream each.
    """

    is_sliding = False
    is_croppable = True

    def __init__(
        self, spec: LayerQuantSpec, scale_dtype: torch.dtype | None = None, workspace: Workspace | None = None
    ) -> None:
        super().__init__()
        self.spec = spec
        self.scale_dtype = scale_dtype
        self.workspace = workspace
        self.paired = spec.key == spec.value
        self.streams: list[KVStream] = []
        #: decode steps attend from the packed codes (set by a cache that routes this layer's attention)
        self.fused = False
        #: the step captured by the last fused ``update``, until the attention function takes it
        self.pending_step: FusedStep | None = None
        #: decode steps are faster on the reference path here (set by :func:`kvcache_plugins.attention.paths.route`)
        self.reference_decode = False

    def __repr__(self) -> str:
        return f"MixedPrecisionLayer({self.spec.describe()})"

    def _new_streams(self) -> None:
        s, ws = self.spec, self.workspace
        if self.paired:
            self.streams = [KVStream(s.key, s.residual_length, s.sink_tokens, self.scale_dtype, ws, "kv")]
        else:
            self.streams = [
                KVStream(s.key, s.residual_length, s.sink_tokens, self.scale_dtype, ws, "key"),
                KVStream(s.value, s.residual_length, s.sink_tokens, self.scale_dtype, ws, "value"),
            ]
        for stream in self.streams:
            stream.compiled_steps = self.fused

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if not key_states.is_floating_point() or not value_states.is_floating_point():
            raise TypeError(
                f"keys and values must be floating point tensors, got {key_states.dtype} and {value_states.dtype}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.scale_dtype = self.scale_dtype or default_meta_dtype(self.dtype)
        self._new_streams()
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.dtype != value_states.dtype:
            raise TypeError(
                f"keys and values must share one dtype, got keys {key_states.dtype} and values {value_states.dtype}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.dtype != self.dtype:
            raise TypeError(f"this layer stores {self.dtype} keys and values; got {key_states.dtype}")
        if self.fused and not self.reference_decode and key_states.shape[-2] <= FUSED_MAX_QUERIES:
            step = self._capture(key_states, value_states)
            if step is not None:
                if self.paired:
                    self.streams[0]._store(torch.cat([key_states, value_states], dim=0))
                else:
                    self.streams[0]._store(key_states)
                    self.streams[1]._store(value_states)
                self.pending_step = step
                return key_states, value_states
        if not self.paired:
            return self.streams[0].extend(key_states), self.streams[1].extend(value_states)
        stream = self.streams[0]
        if len(stream) == 0:
            stream.extend(torch.cat([key_states, value_states], dim=0))
            return key_states, value_states
        full = stream.extend(torch.cat([key_states, value_states], dim=0))
        batch = key_states.shape[0]
        return full[:batch], full[batch:]

    def _capture(self, key_states: torch.Tensor, value_states: torch.Tensor) -> FusedStep | None:
        """The stored past as a :class:`FusedStep` (``None`` when there is no quantized past to attend from).

        Separate key and value streams may have quantized different numbers of tokens (a channel-axis stream
        quantizes whole groups only): the fused kernel reads both bodies up to the shorter one, and the few tokens
        one stream holds beyond it are dequantized into that stream's full-precision part.
        """
        streams = self.streams
        if any(s.grown is None for s in streams):
            return None
        B = key_states.shape[0]
        chunk = math.lcm(*(chunk_tokens(Layout(s.spec.bits, s.spec.group_size, s.spec.axis, 0)) for s in streams))
        body_len = min(s.body_len for s in streams)
        # the kernels read whole buffers (whole chunks, at least two, the same capacity for keys and values)
        for s in streams:
            s.grown.reserve(max(2 * chunk, s.grown.capacity), chunk)
        capacity = max(s.grown.capacity for s in streams)
        for s in streams:
            s.grown.resize(capacity)
        bodies = [s.grown.buffers() for s in streams]

        def halves(t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
            return None if t is None else (t[:B], t[B:])

        if self.paired:
            key_body, value_body = bodies[0]._map(lambda t: t[:B]), bodies[0]._map(lambda t: t[B:])
            sink, residual = halves(streams[0].sink), halves(streams[0].residual)
        else:
            key_body, value_body = bodies
            sink = None if streams[0].sink is None else (streams[0].sink, streams[1].sink)
            rest = []
            for s in streams:
                parts = [_dequantize_span(s.grown.view(), body_len, s.dtype)] if s.body_len > body_len else []
                parts += [s.residual] if s.residual is not None else []
                rest.append(torch.cat(parts, dim=-2) if len(parts) > 1 else (parts[0] if parts else None))
            residual = None if rest[0] is None else (rest[0], rest[1])
        return FusedStep(key_body, value_body, body_len, sink, residual, (key_states, value_states))

    # -------------------------------------------------------------- queries
    @property
    def batch_size(self) -> int:
        ref = self.streams[0]._any() if self.streams else None
        if ref is None:
            return 0
        return ref.shape[0] // 2 if self.paired else ref.shape[0]

    def get_seq_length(self) -> int:
        return len(self.streams[0]) if self.streams else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def materialize(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Stored keys and values, dequantized, as ``[B, H, T, D]`` tensors (fresh, not workspace views)."""
        if not self.streams or self.get_seq_length() == 0:
            return None, None
        if self.paired:
            both = self.streams[0].materialize()
            batch = both.shape[0] // 2
            return both[:batch], both[batch:]
        return self.streams[0].materialize(), self.streams[1].materialize()

    def _read(self, which: int) -> torch.Tensor | None:
        """The stored tokens, dequantized, ``[B, H, T, D]`` (see :class:`ReadOnlyStates`)."""
        return self.materialize()[which]

    def nbytes(self) -> CacheBytes:
        out = CacheBytes()
        for stream in self.streams:
            out = out + stream.nbytes()
        ref = self.streams[0]._any() if self.streams else None
        if ref is not None:
            H = ref.shape[1]
            D = self.streams[0].body.head_dim if self.streams[0].body is not None else ref.shape[-1]
            out.reference = reference_bytes(self.batch_size, H, self.get_seq_length(), D)
        return out

    # ---------------------------------------------------------------- state
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors ``s{j}.sink``, ``s{j}.body.*``, ``s{j}.residual`` per stream, and the dtypes (see
        :mod:`kvcache_plugins.caches.state`)."""
        if not self.is_initialized:
            return empty_state()
        tensors: dict[str, torch.Tensor] = {}
        for j, s in enumerate(self.streams):
            put_stored(tensors, f"s{j}.sink", s.sink)
            put_stored(tensors, f"s{j}.body", s.body)
            put_stored(tensors, f"s{j}.residual", s.residual)
        return tensors, {"dtype": str(self.dtype), "scale_dtype": str(self.scale_dtype)}

    def load_state(self, state: StateReader, facts: ModelFacts) -> None:
        """Fill this empty layer; every stream's spans must be what :meth:`KVStream.extend` leaves behind."""
        if is_empty(state):
            return
        state.fields(["dtype", "scale_dtype"])
        self.dtype, self.device = state.model_dtype(facts), facts.device
        self.scale_dtype = state.dtype("scale_dtype", SCALE_DTYPES)
        self._new_streams()
        H, D = facts.num_kv_heads, facts.head_dim
        rows = length = None
        for j, s in enumerate(self.streams):
            s.dtype, s.meta_dtype = self.dtype, self.scale_dtype
            spec = s.spec
            dtypes, full = (self.dtype, self.scale_dtype), TensorQuantSpec()
            s.sink = read_stored(state, f"s{j}.sink", full, *dtypes, (rows, H, None, D), facts.device, optional=True)
            rows = rows if s.sink is None else s.sink.shape[0]
            s.body = read_stored(state, f"s{j}.body", spec, *dtypes, (rows, H, None, D), facts.device, optional=True)
            if s.body is not None:
                rows = s.body.codes.shape[0]
            s.residual = read_stored(state, f"s{j}.residual", full, *dtypes, (rows, H, None, D), facts.device, optional=True)
            rows = rows if s.residual is None else s.residual.shape[0]
            where = f"stream {j} ({spec.describe()})"
            if not spec.quantized:
                state.require(s.sink is None and s.body is None, f"{where}: a 16-bit stream holds a residual only")
            state.require(s.sink_len <= s.sink_tokens, f"{where}: {s.sink_len} sink tokens, the spec {s.sink_tokens}")
            state.require(
                s.sink_len == s.sink_tokens or (s.body is None and s.residual is None),
                f"{where}: tokens after an incomplete sink span",
            )
            if spec.quantized:
                bound = s.residual_length + (spec.group_size - 1 if spec.axis == "channel" else 0)
                state.require(s.residual_len <= bound, f"{where}: {s.residual_len} residual tokens, at most {bound}")
            state.require(length is None or len(s) == length, f"{where}: keys and values hold different token counts")
            length = len(s)
        state.require(length is not None and length > 0 and rows is not None, "an initialized layer holds no token")
        state.require(rows % 2 == 0 if self.paired else True, "paired keys and values need an even number of rows")
        self.is_initialized = True

    def reserved_nbytes(self) -> int:
        """Bytes allocated beyond the stored tokens (not in :meth:`nbytes`)."""
        return sum(s.reserved_nbytes() for s in self.streams)

    # ---------------------------------------------------------------- edits
    def reset(self) -> None:
        self.pending_step = None
        if self.is_initialized:
            self._new_streams()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop tokens from the end as the installed ``DynamicLayer.crop`` does: ``-n`` removes ``n`` tokens;
        ``n >= 0`` is the length to keep on releases that take a length (5.4), refused (``n > 0``) or a no-op
        (``0``) on newer ones (5.23, 5.24); see :func:`kvcache_plugins._compat.crop_count`."""
        remove = crop_count(self.get_seq_length(), tokens_to_remove)
        for s in self.streams:
            s.crop(remove)

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.paired:
            index = torch.cat([index, index + self.batch_size])
        for s in self.streams:
            s.map_batch(lambda t: t.index_select(0, index.to(t.device)), lambda q: q.index_select(0, index))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self._select_rows(_as_index(beam_idx, self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self._select_rows(_as_index(indices, self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for s in self.streams:
            s.map_batch(lambda t: t.repeat_interleave(repeats, dim=0), lambda q: q.repeat_interleave(repeats))

    def offload(self) -> None:
        for s in self.streams:
            s.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        for s in self.streams:
            s.to(self.device, non_blocking=True)


def dynamic_layer_nbytes(layer: DynamicLayer) -> CacheBytes:
    """Accounting for a plain transformers ``DynamicLayer`` (or sliding-window layer): all model dtype."""
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return CacheBytes()
    B, H, T, D = layer.keys.shape
    return CacheBytes(
        full_precision=tensor_bytes(layer.keys) + tensor_bytes(layer.values), reference=reference_bytes(B, H, T, D)
    )
