"""``MixedPrecisionCache``: a drop-in ``DynamicCache`` storing each layer at its own bit width."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .._model import head_dim, text_config
from ..attention import observer
from ..layers.base import Workspace
from ..layers.mixed import MixedPrecisionLayer
from ..persist.state import StateReader, layer_spec_state, read_layer_spec, register_cache
from ..quant.groupwise import META_DTYPES
from ..quant.spec import DEFAULT_GROUP_SIZE, LayerQuantSpec, Spec, resolve_layer_specs
from .base import PluginCache, require_layers_agree

logger = logging.getLogger(__name__)


def build_quantized_layers(
    cache: DynamicCache,
    specs: list[LayerQuantSpec],
    scale_dtype: torch.dtype | None,
    workspace: Workspace | None = None,
) -> list[str]:
    """Replace the full-attention layers of ``cache`` whose spec quantizes by :class:`MixedPrecisionLayer`.

    Layers of other types (sliding-window, linear attention, shared KV) keep transformers' own layer class at model
    precision; their indices and reasons are returned so callers can report them.
    """
    if len(cache.layers) != len(specs):
        raise ValueError(f"the model has {len(cache.layers)} cache layers but {len(specs)} layer specs were given")
    kept_full: list[str] = []
    for i, spec in enumerate(specs):
        if not spec.quantized:
            continue
        layer = cache.layers[i]
        if type(layer) is DynamicLayer:
            cache.layers[i] = MixedPrecisionLayer(spec, scale_dtype, workspace)
        else:
            kept_full.append(f"layer {i}: {type(layer).__name__} kept at model precision")
    if kept_full:
        logger.warning(
            "kvcache_plugins quantizes full-attention layers only; these layers stay at model precision: %s",
            "; ".join(kept_full),
        )
    return kept_full


@register_cache("MixedPrecisionCache")
class MixedPrecisionCache(PluginCache):
    """A ``transformers.DynamicCache`` that stores each layer's keys and values at its own bit width.

    Pass it to ``model.generate(..., cache=MixedPrecisionCache(model, "mixed_l0"))`` or to a forward call
    (``past_key_values=`` before transformers 5.24; both are supported, and ``kvcache_plugins.cache_kwargs(model,
    cache)`` picks the keyword the installed release takes). Reading it works as for a ``DynamicCache``: iteration
    and ``cache.layers[i].keys`` / ``.values`` give the stored tokens, dequantized, as ``[B, H, T, D]``.

    Non-finite states: 16-bit ("full") layers store NaN and Inf exactly, as a ``DynamicCache`` does (so do the sink
    and residual tokens a quantized layer keeps at model precision); a quantized layer refuses them with a
    ``ValueError`` naming the layer, keys or values, and NaN / +Inf / -Inf, before quantizing.

    Keys and values are quantized group-wise (asymmetric min/max, fp32 arithmetic, see
    :mod:`kvcache_plugins.quant.groupwise`) into really packed codes as they arrive; layers at 16 bits are plain
    ``DynamicLayer`` objects and give bit-identical results to ``DynamicCache``.

    Args:
        model_or_config: the model (or its config) the cache will serve; it fixes the layer count and layer types.
        spec: a preset name (``"full"``, ``"int8"``, ``"int4"``, ``"int3"``, ``"int2"``, ``"mixed_l0"``, ``"kivi4"``,
            ``"kivi2"``), a bit width, a dict ``{layer: bits, "default": bits}`` or a per-layer list; see
            :mod:`kvcache_plugins.quant.spec`.
        group_size: elements per quantization group (along head_dim per-token, along tokens per-channel).
        key_axis / value_axis: ``"token"`` or ``"channel"`` grouping for keys / values where the spec does not say.
        residual_length: newest tokens kept at model precision (needs ``>= group_size`` for channel groups;
            default 0, or 128 for the ``kivi*`` presets).
        sink_tokens: first tokens kept at model precision.
        scale_dtype: dtype of stored scales and zeros (default: bf16 for bf16 models, fp16 otherwise).
        fused: when the cache is built with the model (not a config), decode steps of quantized layers attend
            straight from the packed codes (:mod:`kvcache_plugins.attention.fused`, compiled by ``torch.compile``;
            the model's attention modules are routed through :mod:`kvcache_plugins.attention.observer`). ``False``
            keeps the reference path: dequantize the past, then the model's own attention. Prefill and steps with
            more than ``FUSED_MAX_QUERIES`` new tokens always take the reference path; so does every step where no
            compiler works (after one warning).

    Sliding-window layers (Gemma-2/3, Mistral with a window) keep transformers' own layer at model precision; a
    warning names them and :meth:`describe` shows them.
    """

    def __init__(
        self,
        model_or_config: Any,
        spec: Spec = "mixed_l0",
        *,
        group_size: int = DEFAULT_GROUP_SIZE,
        key_axis: str = "token",
        value_axis: str = "token",
        residual_length: int | None = None,
        sink_tokens: int = 0,
        scale_dtype: torch.dtype | None = None,
        fused: bool = True,
    ) -> None:
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be True or False, got {fused!r}")
        config = text_config(model_or_config)
        if scale_dtype is not None and scale_dtype not in META_DTYPES:
            raise ValueError(f"scale_dtype must be one of {META_DTYPES}, got {scale_dtype!r}")
        super().__init__(config=config)
        self.model_config = config
        self.layer_specs = resolve_layer_specs(
            spec,
            len(self.layers),
            group_size=group_size,
            key_axis=key_axis,
            value_axis=value_axis,
            residual_length=residual_length,
            sink_tokens=sink_tokens,
            head_dim=head_dim(config),
        )
        self.spec = spec
        self.workspace = Workspace()
        self.unquantized_layers = build_quantized_layers(self, self.layer_specs, scale_dtype, self.workspace)
        self.fused = False
        self.fused_steps = 0
        if fused and isinstance(model_or_config, nn.Module) and self._quantized_layers():
            try:
                self._observe(model_or_config)
            except ValueError as exc:  # an attention implementation the observer cannot route (e.g. flash)
                logger.warning("kvcache_plugins: fused decode is off for this cache: %s", exc)
            else:
                self.fused = True
        for layer in self._quantized_layers():
            layer.fused = self.fused

    def _quantized_layers(self) -> list[MixedPrecisionLayer]:
        return [layer for layer in self.layers if isinstance(layer, MixedPrecisionLayer)]

    def _update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not self.fused or not isinstance(layer, MixedPrecisionLayer):
            return super()._update(key_states, value_states, layer_idx, *args, **kwargs)
        self._require_attended(self._quantized_layers())
        out = layer.update(key_states, value_states)
        if layer.pending_step is not None:
            observer.announce(self, layer_idx)
        return out

    # ----------------------------------------------------- observer protocol
    def attend(self, layer_idx, module, query, key, value, attention_mask, original, **kwargs):
        """Attention of a decode step from the packed codes (the reference path if no compiler works)."""
        layer = self.layers[layer_idx]
        step = layer.pending_step
        layer.pending_step = None
        if step is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        return self.attend_step(layer, step, module, query, attention_mask, original, kwargs)[0]

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        """The per-layer specs (the layers save themselves; see :mod:`kvcache_plugins.persist.state`)."""
        return {"layer_specs": [layer_spec_state(s) for s in self.layer_specs]}

    @classmethod
    def from_state(cls, state: StateReader, model: Any, tokenizer: Any = None) -> MixedPrecisionCache:
        state.fields(["layer_specs"])
        config = text_config(model)
        hd = head_dim(config)
        specs = [read_layer_spec(s, hd) for s in state.items("layer_specs", int(config.num_hidden_layers))]
        return cls(model, specs)

    def finish_state(self, state: StateReader) -> None:
        """Every non-sliding layer holds the same rows and tokens."""

        def rows_tokens(layer: Any) -> tuple[int, int] | None:
            if not isinstance(layer, MixedPrecisionLayer):
                return None
            return (layer.batch_size, layer.get_seq_length()) if layer.is_initialized else (0, 0)

        require_layers_agree(state, self.layers, rows_tokens)

    def describe(self) -> str:
        """One line per layer: how it is stored."""
        lines = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MixedPrecisionLayer):
                lines.append(f"layer {i:>3}: {layer.spec.describe()}")
            else:
                lines.append(f"layer {i:>3}: model precision ({type(layer).__name__})")
        return "\n".join(lines)


