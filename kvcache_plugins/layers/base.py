"""What every layer kind of the package shares: read-only ``keys``/``values``, batch-row edits, the workspace
dense states are assembled in, and byte counts (:class:`~kvcache_plugins.layers.accounting.CacheBytes`).

A layer kind is a ``transformers.DynamicLayer`` subclass that owns its storage (as transformers' ``cache_utils``
layers do) and answers ``update``, ``get_seq_length``, ``get_mask_sizes``, ``crop`` and the row edits. Layers never
choose what to keep: a cache (``kvcache_plugins.caches``) asks them to keep positions a selection policy
(``kvcache_plugins.selection``) chose.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ..quant.groupwise import QuantizedTensor, default_meta_dtype
from ..quant.growable import GRANULE, next_capacity
from .accounting import CacheBytes, reference_bytes, tensor_bytes

Stored = torch.Tensor | QuantizedTensor


def _stored_bytes(t: Any) -> CacheBytes:
    """Bytes of a store: a plain tensor, a :class:`QuantizedTensor` or a low-rank store (factors and tail)."""
    if t is None:
        return CacheBytes()
    if isinstance(t, torch.Tensor):
        return CacheBytes(full_precision=tensor_bytes(t))
    codes, scales, zeros, *fp = t.nbytes()
    return CacheBytes(codes=codes, scales=scales, zeros=zeros, full_precision=sum(fp))


def _rows_heads_dim(t: Any) -> tuple[int, int, int]:
    """``(B, H, D)`` of a store (plain ``[B, H, S, D]``, packed, or low-rank)."""
    if isinstance(t, QuantizedTensor):
        return t.codes.shape[0], t.codes.shape[1], t.head_dim
    return t.shape[0], t.shape[1], t.shape[-1]


def _slots(t: Stored | None) -> int:
    if t is None:
        return 0
    return t.num_tokens if isinstance(t, QuantizedTensor) else t.shape[-2]



def assemble(workspace: Workspace | None, role: str, new: torch.Tensor, past: int, write_past) -> torch.Tensor:
    """``[B, H, past + n, D]`` dense states for one attention call: the stored past (``write_past(out)`` writes it
    into the first ``past`` slots, dequantized or reconstructed), then ``new`` ``[B, H, n, D]``; a view of the
    cache's workspace (see :class:`Workspace`), or a fresh tensor without one."""
    B, H, n, D = new.shape
    if workspace is not None:
        full = workspace.get(role, new, past + n)
    else:
        full = torch.empty((B, H, past + n, D), dtype=new.dtype, device=new.device)
    write_past(full[..., :past, :])
    full[..., past:, :].copy_(new)
    return full


class GrowingRows:
    """A layer's ``[B, H, S]`` per-slot tensor (positions, h2o accumulators) in a buffer with spare capacity along
    the slots (``quant.growable.next_capacity``), kept in the attribute ``slot`` as ``[buffer, used]``: a decode
    step writes its slots in place (:func:`append_slots`) instead of copying all of them with ``cat``. Reading gives
    the used part (a view); assigning any tensor replaces the buffer, except the view itself (``acc += x``)."""

    def __init__(self, slot: str) -> None:
        self.slot = slot

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        held = layer.__dict__.get(self.slot)
        return None if held is None else held[0][..., : held[1]]

    def __set__(self, layer: Any, value: torch.Tensor | None) -> None:
        held = layer.__dict__.get(self.slot)
        if held is not None and value is not None and value.data_ptr() == held[0].data_ptr() and (
            value.shape == (*held[0].shape[:-1], held[1]) and value.stride() == held[0].stride()
        ):
            return  # the in-place result of an augmented assignment on the view
        layer.__dict__[self.slot] = None if value is None else [value, value.shape[-1]]


def append_slots(layer: Any, slot: str, new: torch.Tensor) -> None:
    """Write ``new`` ``[B, H, n]`` after the used slots of ``layer``'s :class:`GrowingRows` attribute ``slot``."""
    held = layer.__dict__[slot]
    buffer, used = held
    n = new.shape[-1]
    if used + n > buffer.shape[-1] or not buffer.is_contiguous() or (
        buffer.is_inference() and not torch.is_inference_mode_enabled()
    ):
        grown = buffer.new_empty((*buffer.shape[:-1], next_capacity(buffer.shape[-1], used + n, GRANULE)))
        grown[..., :used].copy_(buffer[..., :used])
        held[0] = buffer = grown
    buffer[..., used : used + n].copy_(new)
    held[1] = used + n


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


class StoredLayer(ReadOnlyStates):
    """:class:`ReadOnlyStates` plus the dtype contract of every layer kind: the first ``update`` fixes the layer's
    dtype, device and scale dtype (bf16 scales for bf16 states, fp16 otherwise, unless the cache set one); keys
    and values must share one floating dtype, then and later (``TypeError`` naming both)."""

    scale_dtype: torch.dtype | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dtype != value_states.dtype or not key_states.is_floating_point():
            raise TypeError(
                f"keys and values must share one floating point dtype, got keys {key_states.dtype} and values "
                f"{value_states.dtype}"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.scale_dtype = self.scale_dtype or default_meta_dtype(self.dtype)
        self.is_initialized = True

    def _accept(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Initialize on the first states, then refuse states of another dtype."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise TypeError(
                f"this layer stores {self.dtype} keys and values; got {key_states.dtype} and {value_states.dtype}"
            )


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


def dynamic_layer_nbytes(layer: DynamicLayer) -> CacheBytes:
    """Accounting for a plain transformers ``DynamicLayer`` (or sliding-window layer): all model dtype."""
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return CacheBytes()
    B, H, T, D = layer.keys.shape
    return CacheBytes(
        full_precision=tensor_bytes(layer.keys) + tensor_bytes(layer.values), reference=reference_bytes(B, H, T, D)
    )



def layers_nbytes(layers: list[Any]) -> CacheBytes:
    """Sum of :class:`CacheBytes` over cache layers of any supported kind."""
    total = CacheBytes()
    for layer in layers:
        if hasattr(layer, "nbytes"):
            total = total + layer.nbytes()
        elif isinstance(layer, DynamicLayer):
            total = total + dynamic_layer_nbytes(layer)
    return total

