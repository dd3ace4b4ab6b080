"""Ragged per-head storage for a :class:`~.compressed.CompressedCache` layer whose heads keep different counts.

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

from ..quant.groupwise import QuantizedTensor
from .accounting import CacheBytes, reference_bytes, tensor_bytes
from .compressed import CompressedLayer, Stored, _slots, _stored_bytes


def _take(t: Stored, index: torch.Tensor) -> Stored:
    """Entries ``index`` ``LongTensor [K]`` of a flat ``[1, 1, N, D]`` store (a copy)."""
    if isinstance(t, QuantizedTensor):
        return t._map(lambda x: x.index_select(2, index.to(x.device)))
    return t.index_select(2, index.to(t.device))


def _cat(a: Stored | None, b: Stored) -> Stored:
    if a is None:
        return b
    return a.cat(b) if isinstance(a, QuantizedTensor) else torch.cat([a, b], dim=-2)


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
        """Keep the pending prompt positions where ``keep`` ``Bool [B, H, n]`` is true (any count per head)."""
        k, v = self.pending
        row, head, pos = keep.to(k.device).nonzero(as_tuple=True)  # lexicographic: (row, head, position)
        self.flat_keys = self._store(k[row, head, pos].view(1, 1, -1, k.shape[-1]), self.key_spec)
        self.flat_values = self._store(v[row, head, pos].view(1, 1, -1, v.shape[-1]), self.value_spec)
        self.flat_positions = pos.to(torch.int32)
        self.counts = keep.sum(-1).to(k.device)
        self.stored_keys = self.stored_values = None
        self.positions = None
        self.pending = None
        self.tail = 0

    def _padded(self, flat: Stored, dense: Stored | None, new: torch.Tensor, role: str) -> torch.Tensor:
        """The transient ``[B, H, C + T + n, D]`` view: ragged prompt part, generated part, new tokens."""
        B, H, n, D = new.shape
        C, T = self.width, self.generated
        if self.workspace is not None:
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
    _PARTS = ("flat_keys", "flat_values", "stored_keys", "stored_values")

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The ragged layer's state as ``(tensors, metadata)`` (JSON-able metadata, no pickle).

        Tensors: ``counts`` ``[B, H]``, ``flat_positions`` ``[N]``, and for each of ``flat_keys``, ``flat_values``
        (the prompt part, ``[1, 1, N, D]``) and ``stored_keys``, ``stored_values`` (the generated part,
        ``[B, H, T, D]``, absent while empty) either ``<part>`` or ``<part>.codes/.scale/.zero``. Metadata: dtypes,
        ``logical``, ``tail`` and, per quantized part, ``bits``, ``group_size``, ``axis``, ``head_dim``.
        """
        tensors = {"counts": self.counts, "flat_positions": self.flat_positions}
        parts: dict[str, dict | None] = {}
        for name in self._PARTS:
            t = getattr(self, name)
            if t is None:
                parts[name] = None
            elif isinstance(t, QuantizedTensor):
                tensors.update({f"{name}.codes": t.codes, f"{name}.scale": t.scale, f"{name}.zero": t.zero})
                parts[name] = {"bits": t.bits, "group_size": t.group_size, "axis": t.axis, "head_dim": t.head_dim}
            else:
                tensors[name] = t
                parts[name] = {}
        meta = {
            "dtype": str(self.dtype), "scale_dtype": str(self.scale_dtype), "logical": self.logical, "tail": self.tail,
            "parts": parts,
        }
        return tensors, meta

    def from_state(self, tensors: dict[str, torch.Tensor], meta: dict, device, dtypes: dict[str, torch.dtype]) -> None:
        """Restore :meth:`to_state` output (checking that counts, positions and parts agree) onto ``device``."""
        counts = tensors["counts"].to(device).long()
        positions = tensors["flat_positions"].to(device)
        logical = int(meta["logical"])
        total = int(counts.sum()) if counts.numel() else 0
        if counts.dim() != 2 or bool((counts < 0).any()) or positions.shape != (total,):
            raise ValueError("ragged layer state: counts must be [B, H] non-negative and sum to the positions' length")
        if total and (int(positions.min()) < 0 or int(positions.max()) >= logical):
            raise ValueError(f"ragged layer state: kept positions must lie in [0, {logical})")
        for name in self._PARTS:
            info = meta["parts"][name]
            if info is None:
                value = None
            elif info:
                value = QuantizedTensor(
                    tensors[f"{name}.codes"].to(device), tensors[f"{name}.scale"].to(device),
                    tensors[f"{name}.zero"].to(device), info["bits"], info["group_size"], info["axis"],
                    info["head_dim"],
                )
            else:
                value = tensors[name].to(device)
            expected = total if name.startswith("flat") else None
            if value is not None and expected is not None and _slots(value) != expected:
                raise ValueError(f"ragged layer state: {name} holds {_slots(value)} tokens, the counts say {expected}")
            setattr(self, name, value)
        self.counts, self.flat_positions = counts, positions
        self.dtype, self.device = dtypes[meta["dtype"]], device
        self.scale_dtype = dtypes[meta["scale_dtype"]]
        self.logical, self.tail = logical, int(meta["tail"])
        self.positions = self.acc = self.pending = None
        self.is_initialized = True
