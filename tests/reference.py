"""Test oracles written as plainly as possible.

``ReferenceQuantLayer`` keeps every token at full precision (it *is* a transformers ``DynamicLayer``, so beam
reordering, cropping and batch edits are transformers' own) and, at every update, derives what the spec says the
cache holds for the past tokens: sinks and the residual window as they are, the span in between quantized from
scratch with :func:`kvcache_plugins.quant.quantize`. ``MixedPrecisionCache`` must return the same states.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvcache_plugins.quant import LayerQuantSpec, TensorQuantSpec, quantize
from kvcache_plugins.quant.groupwise import default_meta_dtype


def stored_view(full: torch.Tensor, t: TensorQuantSpec, residual: int, sinks: int) -> torch.Tensor:
    """What a cache with spec ``t`` holds for the tokens ``full`` ``[B, H, T, D]`` (dequantized)."""
    if not t.quantized or full.numel() == 0:
        return full
    T = full.shape[-2]
    s = min(sinks, T)
    q = max(0, T - s - residual)
    if t.axis == "channel":
        q -= q % t.group_size
    if q == 0:
        return full
    body = quantize(full[..., s : s + q, :], t.bits, t.group_size, t.axis, default_meta_dtype(full.dtype))
    return torch.cat([full[..., :s, :], body.dequantize(full.dtype), full[..., s + q :, :]], dim=-2)


class ReferenceQuantLayer(DynamicLayer):
    def __init__(self, spec: LayerQuantSpec):
        super().__init__()
        self.spec = spec

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s = self.spec
        past_k = stored_view(self.keys, s.key, s.residual_length, s.sink_tokens)
        past_v = stored_view(self.values, s.value, s.residual_length, s.sink_tokens)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)


def reference_cache(model, layer_specs: list[LayerQuantSpec]) -> DynamicCache:
    """A DynamicCache whose quantized layers are :class:`ReferenceQuantLayer`."""
    cache = DynamicCache(config=model.config)
    for i, spec in enumerate(layer_specs):
        if spec.quantized and type(cache.layers[i]) is DynamicLayer:
            cache.layers[i] = ReferenceQuantLayer(spec)
    return cache


def masked_reference_logits(model, ids: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Logits of one full forward pass over ``ids`` ``[B, n]`` where ``visible`` ``[B, n, n]`` (bool) says which
    key positions each query position may attend to (a 4-D mask for every layer)."""
    mask = torch.zeros(visible.shape, dtype=model.dtype)
    mask.masked_fill_(~visible, torch.finfo(model.dtype).min)
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    return model(ids, attention_mask=mask.unsqueeze(1), position_ids=positions).logits
