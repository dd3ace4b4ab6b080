"""Mixed-precision storage of one layer: :class:`MixedPrecisionLayer`, keys and values as two
:class:`~kvcache_plugins.layers.stream.KVStream` (or one, stacked along the batch, when they share a spec).

Its ``update`` returns the stored past (dequantized) followed by the new tokens at full precision, so a forward pass
always attends to its own new tokens exactly, and later forwards see them as stored. A fused decode step
(``fused=True``, set by the cache) returns only the new tokens and leaves a
:class:`~kvcache_plugins.attention.fused.FusedStep` over the packed past for the attention function.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicLayer

from .._compat import crop_count
from ..attention.fused import FUSED_MAX_QUERIES, FusedStep, Layout, chunk_tokens
from ..persist.state import (
    SCALE_DTYPES,
    ModelFacts,
    StateReader,
    empty_state,
    is_empty,
    put_stored,
    read_stored,
    register_layer,
)
from ..quant.spec import LayerQuantSpec, TensorQuantSpec
from .accounting import CacheBytes, reference_bytes
from .base import StoredLayer, Workspace, _as_index
from .stream import KVStream, _dequantize_span


@register_layer("mixed")
class MixedPrecisionLayer(StoredLayer, DynamicLayer):
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
        super().lazy_initialization(key_states, value_states)
        self._new_streams()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._accept(key_states, value_states)
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
        :mod:`kvcache_plugins.persist.state`)."""
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


