"""Ragged per-head storage for a :class:`~kvcache_plugins.CompressedCache` layer whose heads keep different counts.

With ``budget="adakv"`` every (row, KV head) of a layer keeps its own number ``c[b, h]`` of prompt tokens. The
layer holds exactly those, nothing padded::

    prompt part (ragged)   keys, values   [1, 1, N, D]   N = sum_{b,h} c[b, h], ordered by (row, head, position)
                           positions      int32 [N]      logical position of each entry
                           counts         int64 [B, H]   c[b, h]
    generated part (dense) keys, values   [B, H, T, D]   tokens appended after the selection (every head has them)

Keys and values of both parts are stored at the layer's quantization spec (per-token groups: a flat token is
quantized exactly as it would be in a ``[B, H, S, D]`` tensor).

**Attention.** The model's attention wants dense ``[B, H, S, D]`` states. At each forward ``update`` writes a
transient padded view into the cache's :class:`~.layers.Workspace`: ``[B, H, C + T + n, D]`` with
``C = max c[b, h]``, each head's prompt tokens right-aligned in the first ``C`` slots (zeros before them), then the
generated part, then the ``n`` new tokens. :meth:`RaggedLayer.valid_slots` gives the per-head ``[B, H, C + T]``
slot mask, which the cache folds into the attention mask for every query head, so padding slots receive no weight.
Transient cost per forward: one such view for keys and one for values (shared by all layers: the workspace is
reused layer after layer), plus, for quantized layers, one dequantized ``[N, D]`` copy of the prompt part.

Held bytes (:meth:`RaggedLayer.nbytes`): the ragged and dense parts plus ``positions`` (4 bytes per prompt token)
and ``counts``; the padded view is workspace, not storage.
"""

from __future__ import annotations

import torch

from ..persist.state import SCALE_DTYPES, ModelFacts, StateReader, is_empty, put_stored, read_stored, register_layer
from ..quant.groupwise import QuantizedTensor
from .accounting import CacheBytes, reference_bytes, tensor_bytes
from .base import Stored, _slots, _stored_bytes
from .slots import CompressedLayer


def _take(t: Stored, index: torch.Tensor) -> Stored:
    """Entries ``index`` ``LongTensor [K]`` of a flat ``[1, 1, N, D]`` store (a copy)."""
    if isinstance(t, QuantizedTensor):
        return t._map(lambda x: x.index_select(2, index.to(x.device)))
    return t.index_select(2, index.to(t.device))


def _take_flat(t: Stored, take) -> Stored:
    """``take`` (``[B, H, S, *] -> [1, 1, N, *]``) applied to a store's tensors: codes, scales and zeros alike."""
    return t._map(take) if isinstance(t, QuantizedTensor) else take(t)


def _cat(a: Stored | None, b: Stored) -> Stored:
    if a is None:
        return b
    return a.cat(b) if isinstance(a, QuantizedTensor) else torch.cat([a, b], dim=-2)


@register_layer("ragged")
class RaggedLayer(CompressedLayer):
    """A :class:`CompressedLayer` that can hold a different number of prompt tokens per head (module docstring).

    Until :meth:`compress_ragged` runs (and after :meth:`keep_all`, when nothing is evicted) it behaves exactly as a
    :class:`CompressedLayer`. ``stored_keys`` / ``stored_values`` hold the generated part once ragged.
    """

    def _clear(self) -> None:
        super()._clear()
        self.counts: torch.Tensor | None = None
        self.flat_keys: Stored | None = None
        self.flat_values: Stored | None = None
        self.flat_positions: torch.Tensor | None = None

    @property
    def ragged(self) -> bool:
        return self.counts is not None

    def __repr__(self) -> str:
        return f"RaggedLayer(k={self.key_spec.describe()}, v={self.value_spec.describe()})"

    # ------------------------------------------------------------------ sizes
    @property
    def width(self) -> int:
        """``C``: prompt slots of the padded view (the largest head's count)."""
        return int(self.counts.max()) if self.counts.numel() else 0

    @property
    def generated(self) -> int:
        return _slots(self.stored_keys)

    @property
    def stored(self) -> int:
        if not self.ragged:
            return super().stored
        return self.width + self.generated

    def valid_slots(self) -> torch.Tensor | None:
        """``Bool [B, H, C + T]`` slots of the padded view that hold a token (``[B, S]`` before the ragged part)."""
        if not self.ragged:
            return super().valid_slots()
        B, H = self.counts.shape
        C = self.width
        prompt = torch.arange(C, device=self.counts.device).view(1, 1, C) >= (C - self.counts).unsqueeze(-1)
        return torch.cat([prompt, prompt.new_ones(B, H, self.generated)], dim=-1)

    def _slot_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(row, head, slot)`` ``LongTensor [N]`` each: where every flat entry sits in the padded view.

        Computed once per ``counts`` tensor (every edit of the counts assigns a new one), not at every step."""
        cached = getattr(self, "_slots_for", None)
        if cached is not None and cached[0] is self.counts:
            return cached[1]
        B, H = self.counts.shape
        counts = self.counts.flatten()
        owner = torch.repeat_interleave(torch.arange(B * H, device=counts.device), counts)
        start = torch.cumsum(counts, 0) - counts
        within = torch.arange(owner.numel(), device=counts.device) - start[owner]
        slot = self.width - counts[owner] + within
        self._slots_for = (self.counts, (owner // H, owner % H, slot))
        return self._slots_for[1]

    # ----------------------------------------------------------------- writes
    def compress_ragged(self, keep: torch.Tensor) -> None:
        """Keep, per row and head, the pending prompt positions where ``keep`` ``Bool [B, H, n]`` is true, or (after a
        chunked prefill, no prompt pending) the held slots where ``keep`` ``Bool [B, H, S]`` is (any count per head)."""
        if self.pending is not None:
            k, v = self.pending
            row, head, pos = keep.to(k.device).nonzero(as_tuple=True)  # lexicographic: (row, head, position)
            self.flat_keys = self._store(k[row, head, pos].view(1, 1, -1, k.shape[-1]), self.key_spec)
            self.flat_values = self._store(v[row, head, pos].view(1, 1, -1, v.shape[-1]), self.value_spec)
            self.flat_positions = pos.to(torch.int32)
        else:  # held slots, already stored (quantized or not): moved, never re-quantized
            B, S = keep.shape[0], keep.shape[-1]
            row, head, slot = keep.to(self.positions.device).nonzero(as_tuple=True)

            def take(t: torch.Tensor) -> torch.Tensor:
                return t[row.to(t.device), head.to(t.device), slot.to(t.device)].view(1, 1, row.numel(), -1)

            self.flat_keys = _take_flat(self.stored_keys, take)
            self.flat_values = _take_flat(self.stored_values, take)
            self.flat_positions = self.positions.expand(B, keep.shape[1], S)[row, head, slot].to(torch.int32)
        self.counts = keep.sum(-1).to(self.flat_positions.device)
        self.stored_keys = self.stored_values = None
        self.positions = None
        self.pending = None
        self.tail = 0

    def _padded(
        self, flat: Stored, dense: Stored | None, new: torch.Tensor, role: str | None
    ) -> torch.Tensor:
        """The ``[B, H, C + T + n, D]`` view: ragged prompt part, generated part, new tokens (in the workspace, a
        transient, when ``role`` names one; a fresh tensor for ``role=None``)."""
        B, H, n, D = new.shape
        C, T = self.width, self.generated
        if self.workspace is not None and role is not None:
            out = self.workspace.get(role, new, C + T + n)
        else:
            out = new.new_empty(B, H, C + T + n, D)
        out[..., :C, :].zero_()
        row, head, slot = self._slot_index()
        values = flat.dequantize(new.dtype) if isinstance(flat, QuantizedTensor) else flat
        out[row, head, slot] = values.view(-1, D).to(new.dtype)
        if isinstance(dense, QuantizedTensor):
            dense.dequantize(new.dtype, out=out[..., C : C + T, :])
        elif dense is not None:
            out[..., C : C + T, :].copy_(dense)
        out[..., C + T :, :].copy_(new)
        return out

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ragged:
            return super().update(key_states, value_states, *args, **kwargs)
        if key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise TypeError(f"this layer stores {self.dtype} keys and values; got {key_states.dtype}")
        keys = self._padded(self.flat_keys, self.stored_keys, key_states, "key")
        values = self._padded(self.flat_values, self.stored_values, value_states, "value")
        self.stored_keys = _cat(self.stored_keys, self._store(key_states, self.key_spec))
        self.stored_values = _cat(self.stored_values, self._store(value_states, self.value_spec))
        n = key_states.shape[-2]
        self.logical += n
        self.tail += n
        return keys, values

    # ----------------------------------------------------------------- reads
    def _read(self, which: int) -> torch.Tensor | None:
        """``keys`` / ``values`` once ragged: the padded view ``[B, H, C + T, D]`` (a fresh tensor), unused slots
        zero where :meth:`kept_positions` is ``-1``."""
        if not self.ragged:
            return super()._read(which)
        flat, dense = (self.flat_values, self.stored_values) if which else (self.flat_keys, self.stored_keys)
        B, H = self.counts.shape
        D = flat.head_dim if isinstance(flat, QuantizedTensor) else flat.shape[-1]
        return self._padded(flat, dense, torch.empty(B, H, 0, D, dtype=self.dtype, device=self.counts.device), None)

    def kept_positions(self) -> torch.Tensor | None:
        """``LongTensor [B, H, C + T]``: logical position of every slot of the padded view (``-1`` = unused)."""
        if not self.ragged:
            return super().kept_positions()
        B, H = self.counts.shape
        C, T = self.width, self.generated
        out = torch.full((B, H, C + T), -1, dtype=torch.long, device=self.counts.device)
        row, head, slot = self._slot_index()
        out[row, head, slot] = self.flat_positions.long()
        out[..., C:] = torch.arange(self.logical - T, self.logical, device=out.device)
        return out

    def nbytes(self) -> CacheBytes:
        if not self.ragged:
            return super().nbytes()
        out = (
            _stored_bytes(self.flat_keys) + _stored_bytes(self.flat_values)
            + _stored_bytes(self.stored_keys) + _stored_bytes(self.stored_values)
        )
        out.indices = tensor_bytes(self.flat_positions) + tensor_bytes(self.counts)
        fk = self.flat_keys
        D = fk.head_dim if isinstance(fk, QuantizedTensor) else fk.shape[-1]
        out.reference = reference_bytes(self.counts.shape[0], self.counts.shape[1], self.logical, D)
        return out

    # ----------------------------------------------------------------- edits
    def crop(self, tokens_to_remove: int) -> None:
        """As :meth:`CompressedLayer.crop`; past the generated part, every head must still hold the newest
        positions (the always-kept question span), which are then dropped from each head."""
        if not self.ragged:
            return super().crop(tokens_to_remove)
        remove = -tokens_to_remove if tokens_to_remove <= 0 else max(0, self.logical - tokens_to_remove)
        if remove == 0:
            return
        from_generated = min(remove, self.generated)
        from_prompt = remove - from_generated
        if from_prompt:
            cut = self.logical - remove  # entries at positions >= cut go
            going = self.flat_positions >= cut
            B, H = self.counts.shape
            if int(going.sum()) != B * H * from_prompt:
                raise ValueError(
                    f"cannot crop {remove} tokens: the newest {remove} positions are not all stored in every head "
                    "(some were evicted); a CompressedCache can only drop tokens appended after its selection or "
                    "inside the kept question span"
                )
            index = (~going).nonzero().flatten()
            self.flat_keys, self.flat_values = _take(self.flat_keys, index), _take(self.flat_values, index)
            self.flat_positions = self.flat_positions[index]
            self.counts = self.counts - from_prompt
        if from_generated:
            keep = self.generated - from_generated
            if keep:
                self.stored_keys = self._cut(self.stored_keys, keep)
                self.stored_values = self._cut(self.stored_values, keep)
            else:
                self.stored_keys = self.stored_values = None
        self.logical -= remove
        self.tail = max(0, self.tail - remove)

    def _select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, repeat) batch rows ``rows`` ``LongTensor [B']`` of the ragged and generated parts."""
        rows = rows.to(self.counts.device)
        per_row = self.counts.sum(-1)
        start = torch.cumsum(per_row, 0) - per_row
        index = torch.cat([
            torch.arange(int(start[r]), int(start[r] + per_row[r]), device=rows.device) for r in rows.tolist()
        ])
        self.flat_keys, self.flat_values = _take(self.flat_keys, index), _take(self.flat_values, index)
        self.flat_positions = self.flat_positions[index]
        self.counts = self.counts[rows]
        super()._map_rows(lambda t: t.index_select(0, rows.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.ragged:
            return super().batch_select_indices(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select_rows(indices.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.ragged:
            return super().batch_repeat_interleave(repeats)
        self._select_rows(torch.arange(self.counts.shape[0]).repeat_interleave(repeats))

    def _move(self, device) -> None:
        to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        for name in ("flat_keys", "flat_values"):
            t = getattr(self, name)
            setattr(self, name, t.to(device, True) if isinstance(t, QuantizedTensor) else to(t))
        self.flat_positions, self.counts = to(self.flat_positions), to(self.counts)

    def offload(self) -> None:
        super().offload()
        if self.ragged:
            self._move("cpu")

    def prefetch(self) -> None:
        super().prefetch()
        if self.ragged:
            self._move(self.device)

    # ------------------------------------------------------------------ state
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The layer's state as ``(tensors, metadata)`` (see :mod:`kvcache_plugins.persist.state`).

        Before its selection made it ragged (or after :meth:`keep_all`) the layer saves what a
        :class:`CompressedLayer` saves, with ``"ragged": false``. Once ragged (``"ragged": true``), tensors:
        ``counts`` ``int64 [B, H]``, ``flat_positions`` ``int32 [N]`` (``N = counts.sum()``, ordered by row, head,
        position), ``flat_keys`` / ``flat_values`` ``[1, 1, N, D]`` (the prompt part) and, once tokens were appended,
        ``keys`` / ``values`` ``[B, H, T, D]`` (the generated part), each plain or ``<name>.codes/.scale/.zero``.
        Metadata: ``dtype``, ``scale_dtype``, ``logical``, ``tail``.
        """
        if not self.ragged:
            tensors, meta = super().to_state()
            if meta.get("empty"):
                return tensors, meta
            return tensors, {**meta, "ragged": False}
        tensors: dict[str, torch.Tensor] = {"counts": self.counts, "flat_positions": self.flat_positions}
        put_stored(tensors, "flat_keys", self.flat_keys)
        put_stored(tensors, "flat_values", self.flat_values)
        put_stored(tensors, "keys", self.stored_keys)
        put_stored(tensors, "values", self.stored_values)
        meta = {
            "ragged": True, "dtype": str(self.dtype), "scale_dtype": str(self.scale_dtype), "logical": self.logical,
            "tail": self.tail,
        }
        return tensors, meta

    def load_state(self, state: StateReader, facts: ModelFacts) -> None:
        """Fill this empty layer from :meth:`to_state` output, checking every field (``ValueError`` otherwise).

        Ragged state: ``counts`` ``int64 [B >= 1, H]`` (``H`` the model's KV heads), non-negative, summing to ``N``,
        the length of ``flat_positions`` ``int32 [N]``; within each (row, head) the positions increase strictly and
        lie in ``[0, logical - T)`` (the prompt part precedes the ``T`` generated tokens); ``flat_keys`` /
        ``flat_values`` are ``[1, 1, N, D]`` and ``keys`` / ``values`` ``[B, H, T, D]`` (both or neither, ``T >= 1``)
        in the model's dtype, or quantized as this layer's spec says; ``tail`` equals ``T`` (every generated token
        was appended after the selection).
        """
        if is_empty(state):
            return
        ragged = state.bool("ragged")
        if not ragged:
            body = {k: v for k, v in state.meta.items() if k != "ragged"}
            dense = StateReader(state.where, body, state.tensors, state.prefix, state.used)
            CompressedLayer.load_state(self, dense, facts)
            return
        state.fields(["ragged", "dtype", "scale_dtype", "logical", "tail"])
        dtype, scale_dtype = state.model_dtype(facts), state.dtype("scale_dtype", SCALE_DTYPES)
        H, D = facts.num_kv_heads, facts.head_dim
        counts = state.tensor("counts", torch.int64, (None, H))
        B = counts.shape[0]
        state.require(B >= 1, f"counts must be [B >= 1, {H}], got {list(counts.shape)}")
        positions = state.tensor("flat_positions", torch.int32, (None,))
        N = positions.shape[0]
        state.require(
            bool(((counts >= 0) & (counts <= N)).all()) and int(counts.sum()) == N,
            f"counts must be non-negative and sum to the {N} entries of flat_positions",
        )
        logical = state.int("logical", 1)
        generated = dict(dtype=dtype, scale_dtype=scale_dtype, shape=(B, H, None, D), device=facts.device)
        keys = read_stored(state, "keys", self.key_spec, **generated, optional=True)
        T = _slots(keys)
        generated["shape"] = (B, H, T, D)
        values = read_stored(state, "values", self.value_spec, **generated, optional=keys is None)
        state.require(keys is None or T >= 1, "the generated part holds no token (omit keys and values instead)")
        state.require((keys is None) == (values is None), "the generated part needs both keys and values")
        prompt = logical - T
        state.require(prompt >= 1, f"logical={logical} leaves no prompt before the {T} generated tokens")
        state.int("tail", T, T)
        p = positions.long()
        state.require(bool(((p >= 0) & (p < prompt)).all()), f"flat_positions must lie in [0, {prompt})")
        owner = torch.repeat_interleave(torch.arange(B * H), counts.flatten())
        same_head = owner[1:] == owner[:-1]
        state.require(
            bool(((p[1:] > p[:-1]) | ~same_head).all()), "flat_positions must increase strictly within each head"
        )
        flat = dict(dtype=dtype, scale_dtype=scale_dtype, shape=(1, 1, N, D), device=facts.device)
        flat_keys = read_stored(state, "flat_keys", self.key_spec, **flat)
        flat_values = read_stored(state, "flat_values", self.value_spec, **flat)
        self.dtype, self.scale_dtype, self.device = dtype, scale_dtype, facts.device
        self.counts, self.flat_positions = counts.to(facts.device), positions.to(facts.device)
        self.flat_keys, self.flat_values = flat_keys, flat_values
        self.stored_keys, self.stored_values = keys, values
        self.positions = self.acc = self.pending = None
        self.logical, self.tail = logical, T
        self.is_initialized = True
