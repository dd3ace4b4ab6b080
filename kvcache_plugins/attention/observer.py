"""Let a cache see each layer's queries exactly as the model uses them.

A ``Cache`` only receives keys and values. Question-aware selection (Q2C, SnapKV, H2O) also needs the queries after
q-norm and RoPE, with the model's own scaling. transformers hands exactly those to its attention function
(``AttentionInterface``), so that is where we listen:

* :func:`attach` registers one attention function, ``"kvcache_plugins"``, in ``AttentionInterface`` (a new name;
  nothing existing is replaced) and gives every attention module of *this* model a shallow copy of its config whose
  ``_attn_implementation`` names it. The model's own config is untouched, so masks are still built for the
  implementation the model runs (sdpa or eager). Nothing happens at import time.
* The registered function looks up the module's real implementation from its original config (at call time, so a
  later ``set_attn_implementation`` is honoured), runs it, and, if a cache announced this layer on this thread,
  lets that cache adjust the mask first and observe the query, keys and mask afterwards.
* A listener with an ``attend(layer_idx, module, query, key, value, mask, original, **kwargs)`` method computes the
  attention itself (the quantized caches attend straight from packed codes during decode; they call ``original``
  otherwise).
* A cache announces a layer from its ``update`` (which transformers calls right before the attention function of
  the same layer) with :func:`announce`. Announcements are thread-local and name the cache and the layer, so
  several models, caches and threads never see each other's queries.
* :func:`detach` gives every module its original config back; the model is then exactly as before. Attaching twice
  is a no-op. With no announcing cache the function only forwards the call: outputs are bit-identical.
"""

from __future__ import annotations

import copy
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from .._model import attention_modules

OBSERVER_NAME = "kvcache_plugins"
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")

_local = threading.local()
_lock = threading.Lock()
# attention module -> the config it had before attach (weak: a deleted model leaves nothing behind)
_originals: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
_attached_models: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_registered = False


class QueryListener(Protocol):
    """What an announcing cache implements."""

    def adjust_attention_mask(
        self,
        layer_idx: int,
        module: nn.Module,
        attention_mask: torch.Tensor | None,
        query: torch.Tensor,
        key: torch.Tensor,
    ) -> torch.Tensor | None: ...

    def observe_attention(
        self,
        layer_idx: int,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        softcap: float | None,
    ) -> None: ...

    # optional: ``attention_query_block`` (int or None): run the announced attention call in blocks of that many
    # queries (bounded working memory for long multi-token calls, e.g. chunked prefill)


def announce(listener: QueryListener, layer_idx: int) -> None:
    """Called by a cache's ``update``: the next attention call of ``layer_idx`` on this thread is the listener's."""
    _local.pending = (listener, layer_idx)


def clear_announcement() -> None:
    _local.pending = None




def _original_implementation(module: nn.Module) -> tuple[str, Callable]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = _originals.get(module, module.config)
    name = config._attn_implementation
    if name == "eager" or name is None:
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no module-level eager_attention_forward to call")
        return "eager", fn
    if name not in SUPPORTED_IMPLEMENTATIONS:
        raise RuntimeError(
            f"kvcache_plugins observes queries under {SUPPORTED_IMPLEMENTATIONS} attention; this model now runs "
            f"{name!r}. Load it with attn_implementation='sdpa' (or 'eager'), or detach the model."
        )
    return name, ALL_ATTENTION_FUNCTIONS[name]


def _observing_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
):
    """The function registered as ``"kvcache_plugins"`` in transformers' ``AttentionInterface``."""
    _, original = _original_implementation(module)
    pending = getattr(_local, "pending", None)
    if pending is None or pending[1] != module.layer_idx:
        return original(module, query, key, value, attention_mask, **kwargs)
    _local.pending = None
    listener, layer_idx = pending
    attention_mask = listener.adjust_attention_mask(layer_idx, module, attention_mask, query, key)
    attend = getattr(listener, "attend", None)  # a listener may compute the attention itself (fused decode)
    block = getattr(listener, "attention_query_block", None)
    if attend is not None:
        output = attend(layer_idx, module, query, key, value, attention_mask, original, **kwargs)
    elif block and attention_mask is not None and query.shape[2] > block:
        output = _in_query_blocks(original, block, module, query, key, value, attention_mask, **kwargs)
    else:
        output = original(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    listener.observe_attention(layer_idx, module, query, key, attention_mask, scaling, kwargs.get("softcap"))
    return output


def _in_query_blocks(original, block, module, query, key, value, attention_mask, **kwargs):
    """``original`` attention, ``block`` queries at a time: the same output (rows of the query axis are
    independent under an explicit mask), with the mask-sized working memory (e.g. sdpa's float copy of a boolean
    mask, eager's score matrix) of one block. Returns ``(output [B, q, H, D], weights or None)``."""
    outputs, weights = [], []
    for start in range(0, query.shape[2], block):
        stop = min(start + block, query.shape[2])
        mask = attention_mask[:, :, start:stop] if attention_mask.shape[2] > 1 else attention_mask
        out, w = original(module, query[:, :, start:stop], key, value, mask, **kwargs)
        outputs.append(out)
        weights.append(w)
    return torch.cat(outputs, dim=1), None if weights[0] is None else torch.cat(weights, dim=2)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(OBSERVER_NAME, _observing_attention)
    _registered = True


def is_attached(model: nn.Module) -> bool:
    return model in _attached_models


def attach(model: nn.Module) -> nn.Module:
    """Route ``model``'s attention calls through the observer (idempotent). Returns the model.

    Raises ``ValueError`` if the model runs an attention implementation other than sdpa or eager, or has no
    attention modules the observer recognizes.
    """
    with _lock:
        if model in _attached_models:
            return model
        modules = attention_modules(model)
        if not modules:
            raise ValueError(
                f"found no self-attention modules with a layer_idx in {type(model).__name__}; query-aware selection "
                "needs a transformers decoder model"
            )
        for module in modules:
            name = module.config._attn_implementation
            if name not in (*SUPPORTED_IMPLEMENTATIONS, None):
                raise ValueError(
                    f"query-aware selection observes attention under {SUPPORTED_IMPLEMENTATIONS}; "
                    f"{type(module).__name__} runs {name!r}. Load the model with attn_implementation='sdpa' "
                    "(selectors compute their scores themselves, so no attention weights are needed)."
                )
        _register()
        for module in modules:
            original = module.config
            observed = copy.copy(original)
            for sub in getattr(original, "sub_configs", {}) or {}:
                if getattr(original, sub, None) is not None:
                    setattr(observed, sub, copy.copy(getattr(original, sub)))
            observed._attn_implementation = OBSERVER_NAME
            _originals[module] = original
            module.config = observed
        _attached_models.add(model)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo :func:`attach`: every attention module gets its original config object back."""
    with _lock:
        for module in attention_modules(model):
            original = _originals.pop(module, None)
            if original is not None:
                module.config = original
        _attached_models.discard(model)
    return model


class observing:
    """Context manager: ``with observing(model): ...`` attaches for the block and detaches after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._was_attached = False

    def __enter__(self) -> nn.Module:
        self._was_attached = is_attached(self.model)
        return attach(self.model)

    def __exit__(self, *exc: object) -> None:
        if not self._was_attached:
            detach(self.model)
