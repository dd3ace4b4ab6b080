"""What every cache of the package shares: the observer attachment, the fused-step routing, warm-up, byte counts,
save/load (:class:`~kvcache_plugins.persist.mixin.PersistentCache`) and the layers-agree check of a loaded file.

A cache is a ``transformers.DynamicCache`` whose ``layers`` are this package's layer kinds
(:mod:`kvcache_plugins.layers`). Built with a model, it attaches :mod:`kvcache_plugins.attention.observer` to the
model's attention modules, which then call the cache's ``adjust_attention_mask``, ``attend`` and
``observe_attention`` for every layer the cache announced in ``update``. A decode step of a quantized layer runs
as: ``update`` appends the new tokens to the packed buffers and leaves a
:class:`~kvcache_plugins.attention.fused.FusedStep` on the layer; ``attend`` hands it to the fused kernel
(:meth:`PluginCache.attend_step`), or to the model's attention over dense states where the kernel cannot run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .._checks import explain_nonfinite
from .._model import attention_modules
from ..attention import observer, paths
from ..attention.fused import FusedStep
from ..layers.accounting import CacheBytes
from ..layers.base import layers_nbytes
from ..persist.mixin import PersistentCache
from ..persist.state import StateReader, dynamic_length
from .warmup import warm_up


class PluginCache(PersistentCache, DynamicCache):
    """The shared base of the package's caches (see the module docstring)."""

    #: decode steps of quantized layers attend from the packed codes (set by the constructor)
    fused: bool = False
    #: layer-steps attended by the fused kernel so far (for tests and benchmarks)
    fused_steps: int = 0
    #: the decode path taken and why (:class:`~kvcache_plugins.attention.paths.DecodePath`; set by ``warmup()`` or
    #: the first decode step)
    decode_path: paths.DecodePath | None = None
    _module_ids: frozenset[int] = frozenset()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """``DynamicCache.update`` through the cache's :meth:`_update`; states a layer refuses because they hold NaN
        or Inf (the quantizer's range check, the low-rank check before the SVD) are named: layer, keys or values,
        NaN / +Inf / -Inf (``ValueError``)."""
        try:
            return self._update(key_states, value_states, layer_idx, *args, **kwargs)
        except ValueError:
            explain_nonfinite(key_states, value_states, layer_idx)
            raise

    def _update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return DynamicCache.update(self, key_states, value_states, layer_idx, *args, **kwargs)

    def _observe(self, model: Any) -> None:
        """Route ``model``'s attention through the observer (``ValueError`` for implementations it cannot route)."""
        observer.attach(model)
        self._module_ids = frozenset(id(m) for m in attention_modules(model))

    def _require_attended(self, layers: Iterable[Any]) -> None:
        """``RuntimeError`` if a fused step captured by ``update`` was never consumed by the attention function."""
        for layer in layers:
            if getattr(layer, "pending_step", None) is not None:
                layer.pending_step = None
                raise RuntimeError(
                    f"a fused decode step of this {type(self).__name__} was never attended: the model's attention did "
                    "not run through kvcache_plugins' attention function. Use the cache with the model it was built "
                    "with, or build it with fused=False."
                )

    def attend_step(
        self, layer: Any, step: FusedStep, module: Any, query: torch.Tensor, attention_mask: torch.Tensor | None,
        original: Any, kwargs: dict[str, Any], weights: bool = False,
    ) -> tuple[tuple[torch.Tensor, Any], torch.Tensor | None]:
        """A decode step's attention: ``((output [B, n, Hq, D], None), probabilities)`` from the fused kernel over
        the packed past (with ``weights``, its probabilities ``fp32 [B, Hq, n, L]``, else ``None``), or
        ``(original(...), None)``, the model's own attention over the step's dense states, for another model's
        module, attention sinks as logits, a sliding window, a per-head mask, when no kernel can run, or where the
        timed choice of :mod:`kvcache_plugins.attention.paths` found the reference path faster."""
        out = None
        if (
            id(module) in self._module_ids
            and kwargs.get("s_aux") is None
            and not kwargs.get("sliding_window")
            and (attention_mask is None or attention_mask.shape[1] == 1)
        ):
            scaling = kwargs.get("scaling")
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            name = paths.route(self, layer, step, query, scaling, kwargs.get("softcap"), weights)
            if name != "reference":
                out = step.attend(query, attention_mask, scaling, kwargs.get("softcap"), weights=weights, path=name)
        if out is None:
            key, value = step.dense()
            return original(module, query, key, value, attention_mask, **kwargs), None
        self.fused_steps += 1
        return (out[0], None), out[1]

    # ----------------------------------------------------- observer protocol defaults
    def adjust_attention_mask(self, layer_idx, module, attention_mask, query, key):
        return attention_mask

    def observe_attention(self, layer_idx, module, query, key, attention_mask, scaling, softcap) -> None:
        return None

    # ------------------------------------------------------------------ shared API
    def warmup(self, model: Any, batch_size: int = 1) -> float:
        """Compile the fused decode kernels now rather than inside the first ``generate`` (a few seconds per kernel,
        more on a cold compiler cache); returns the seconds spent (``0.0`` for a cache that does not decode fused).
        Call it on the unused cache, with the model it was built for, and the batch size you will generate with (1,
        or any larger: larger batches share one kernel). See :func:`kvcache_plugins.caches.warmup.warm_up`."""
        return warm_up(self, model, batch_size)

    def memory_footprint(self) -> CacheBytes:
        """Bytes held now by kind (codes, scales, zeros, full precision, kept-position indices), with the 16-bit
        reference for the same tokens. Packed buffers grow in place with spare capacity: :meth:`memory_reserved`
        reports that room apart, so ``memory_footprint().total + memory_reserved()`` is what the cache allocated."""
        return layers_nbytes(self.layers)

    def memory_reserved(self) -> int:
        """Bytes allocated beyond the stored tokens: growth room of the packed buffers (amortised growth: about a
        sixteenth of the quantized bytes plus up to 128 tokens per buffer)."""
        return sum(layer.reserved_nbytes() for layer in self.layers if hasattr(layer, "reserved_nbytes"))

    def describe(self) -> str:
        """One line per layer: how it is stored."""
        return "\n".join(f"layer {i:>3}: {layer!r}" for i, layer in enumerate(self.layers))


def require_layers_agree(state: StateReader, layers: list[Any], rows_tokens: Any) -> None:
    """A loaded cache's full-attention layers hold the same ``(rows, tokens)`` (``rows_tokens(layer)`` for the
    package's layers, ``None`` to skip one), and its sliding-window layers the same rows and the tokens their window
    keeps of them (``ValueError`` naming the disagreement)."""
    seen = set()
    for layer in layers:
        if type(layer) is DynamicLayer:
            n = dynamic_length(layer)
            seen.add((0, 0) if n is None else (int(layer.keys.shape[0]), n))
        elif not getattr(layer, "is_sliding", False):
            got = rows_tokens(layer)
            if got is not None:
                seen.add(got)
    state.require(len(seen) <= 1, f"layers disagree on (rows, tokens): {sorted(seen)}")
    rows, tokens = seen.pop() if seen else (0, 0)
    for layer in layers:
        if getattr(layer, "is_sliding", False) and layer.is_initialized and layer.keys is not None:
            state.require(
                rows > 0 and (layer.keys.shape[0], layer.get_seq_length()) == (rows, tokens),
                f"a sliding-window layer has seen {layer.get_seq_length()} tokens of {layer.keys.shape[0]} rows, "
                f"the other layers {tokens} of {rows}",
            )
