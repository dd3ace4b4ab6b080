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


# --------------------------------------------------------------------------------------------------------------
# Masking oracle for evicting caches: a full DynamicCache whose attention hides chosen positions, per layer/head.
# --------------------------------------------------------------------------------------------------------------


class Visibility:
    """Which keys the oracle model's queries may see, on top of the model's own causal/padding mask.

    ``hidden[layer]``: ``Bool [B, H_s, T]`` logical positions hidden from every query at position >= ``prompt_len``
    (static: the prompt selection). ``per_query[layer]``: ``Bool [B, H_s, T]`` keys visible to the single query of
    the next forward (dynamic: decode-time eviction); it overrides ``hidden`` for that call.
    """

    def __init__(self) -> None:
        self.prompt_len = 0
        self.hidden: dict[int, torch.Tensor] = {}
        self.per_query: dict[int, torch.Tensor] = {}
        self.during_prefill = False  # construction: prompt queries do not see hidden keys either (but themselves)

    def allowed(self, layer: int, q: int, kv: int, device) -> torch.Tensor | None:
        if layer in self.per_query:
            return self.per_query[layer][..., :kv].unsqueeze(2)  # [B, Hs, 1, kv]
        if layer not in self.hidden:
            return None
        hidden = self.hidden[layer][..., :kv].to(device)  # [B, Hs, kv]
        q_pos = torch.arange(kv - q, kv, device=device)
        applies = (q_pos >= self.prompt_len).view(1, 1, q, 1)
        if self.during_prefill:
            own = q_pos.view(q, 1) == torch.arange(kv, device=device).view(1, kv)
            applies = ~own.view(1, 1, q, kv)
        return ~(hidden.unsqueeze(2) & applies)


VISIBILITY = Visibility()


def _oracle_attention(base: str):
    import sys

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        allowed = VISIBILITY.allowed(module.layer_idx, query.shape[2], key.shape[2], query.device)
        if allowed is not None:
            B, Hq, q, kv = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
            allowed = allowed.expand(B, -1, q, kv)
            if allowed.shape[1] > 1:
                allowed = allowed.repeat_interleave(Hq // allowed.shape[1], dim=1)
            if attention_mask is None:
                causal = torch.ones(q, kv, dtype=torch.bool, device=query.device).tril(kv - q)
                attention_mask = causal.view(1, 1, q, kv) & allowed
            elif attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & allowed
            else:
                attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)
        if base == "sdpa":
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        eager = sys.modules[type(module).__module__].eager_attention_forward
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min
            )
        return eager(module, query, key, value, attention_mask, **kwargs)

    return attention


def oracle_model(model):
    """A model sharing ``model``'s weights whose attention obeys :data:`VISIBILITY` (sdpa or eager as ``model``)."""
    import copy

    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    from transformers import PretrainedConfig

    base = model.config._attn_implementation
    name = f"kvcp_test_oracle_{base}"
    AttentionInterface.register(name, _oracle_attention(base))
    AttentionMaskInterface.register(name, sdpa_mask if base == "sdpa" else eager_mask)
    oracle = copy.deepcopy(model)
    oracle.config._attn_implementation = name
    for module in oracle.modules():  # one config for all (an observed model's attention modules hold copies)
        if isinstance(getattr(module, "config", None), PretrainedConfig):
            module.config = oracle.config
    return oracle
