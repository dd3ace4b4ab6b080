"""``MixedPrecisionCache``: a drop-in ``DynamicCache`` storing each layer at its own bit width."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .._model import head_dim, text_config
from ..attention import observer, paths
from ..quant.groupwise import META_DTYPES
from ..quant.spec import DEFAULT_GROUP_SIZE, LayerQuantSpec, Spec, resolve_layer_specs
from .accounting import CacheBytes
from .layers import MixedPrecisionLayer, Workspace, dynamic_layer_nbytes
from .persist import PersistentCache
from .state import StateReader, dynamic_length, layer_spec_state, read_layer_spec, register_cache
from .warmup import warm_up

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
class MixedPrecisionCache(PersistentCache, DynamicCache):
    """A ``transformers.DynamicCache`` that stores each layer's keys and values at its own bit width.

    Pass it to ``model.generate(..., cache=MixedPrecisionCache(model, "mixed_l0"))`` or to a forward call
    (``past_key_values=`` before transformers 5.24; both are supported, and ``kvcache_plugins.cache_kwargs(model,
    cache)`` picks the keyword the installed release takes). Reading it works as for a ``DynamicCache``: iteration
    and ``cache.layers[i].keys`` / ``.values`` give the stored tokens, dequantized, as ``[B, H, T, D]``.

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
        self._module_ids: frozenset[int] = frozenset()
        self.fused = False
        #: layer-steps attended by the fused kernels so far (for tests and benchmarks)
        self.fused_steps = 0
        #: the decode path taken and why (:class:`~kvcache_plugins.attention.paths.DecodePath`; set by ``warmup()``
        #: or the first decode step)
        self.decode_path: paths.DecodePath | None = None
        if fused and isinstance(model_or_config, nn.Module) and self._quantized_layers():
            try:
                observer.attach(model_or_config)
            except ValueError as exc:  # an attention implementation the observer cannot route (e.g. flash)
                logger.warning("kvcache_plugins: fused decode is off for this cache: %s", exc)
            else:
                self._module_ids = frozenset(id(m) for m in observer.attention_modules(model_or_config))
                self.fused = True
        for layer in self._quantized_layers():
            layer.fused = self.fused

    def _quantized_layers(self) -> list[MixedPrecisionLayer]:
        return [layer for layer in self.layers if isinstance(layer, MixedPrecisionLayer)]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[layer_idx]
        if not self.fused or not isinstance(layer, MixedPrecisionLayer):
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        for other in self._quantized_layers():
            if other.pending_step is not None:
                other.pending_step = None
                raise RuntimeError(
                    "a fused decode step of this MixedPrecisionCache was never attended: the model's attention did "
                    "not run through kvcache_plugins' attention function. Use the cache with the model it was built "
                    "with, or build it with fused=False."
                )
        out = layer.update(key_states, value_states)
        if layer.pending_step is not None:
            observer.announce(self, layer_idx)
        return out

    # ----------------------------------------------------- observer protocol
    def adjust_attention_mask(self, layer_idx, module, attention_mask, query, key):
        return attention_mask

    def observe_attention(self, layer_idx, module, query, key, attention_mask, scaling, softcap) -> None:
        return None

    def attend(self, layer_idx, module, query, key, value, attention_mask, original, **kwargs):
        """Attention of a decode step from the packed codes (the reference path if no compiler works)."""
        layer = self.layers[layer_idx]
        step = layer.pending_step
        layer.pending_step = None
        if step is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        if id(module) not in self._module_ids or kwargs.get("s_aux") is not None or kwargs.get("sliding_window"):
            out = None  # another model's module; attention sinks as logits, windows: not in the fused kernel
        else:
            scaling = kwargs.get("scaling")
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
            name = paths.route(self, layer, step, query, scaling, kwargs.get("softcap"), False)
            out = None if name == "reference" else step.attend(query, attention_mask, scaling, kwargs.get("softcap"),
                                                                 path=name)
        if out is None:
            key, value = step.dense()
            return original(module, query, key, value, attention_mask, **kwargs)
        self.fused_steps += 1
        return out

    def warmup(self, model: Any, batch_size: int = 1) -> float:
        """Compile the fused decode kernels now rather than inside the first ``generate`` (a few seconds per kernel,
        more on a cold compiler cache); returns the seconds spent. Call it on the unused cache, with the model it was
        built for, and the batch size you will generate with (1, or any larger: larger batches share one kernel).
        See :func:`kvcache_plugins.caches.warmup.warm_up`."""
        return warm_up(self, model, batch_size)

    def memory_footprint(self) -> CacheBytes:
        """Bytes of the stored tokens, by kind (codes, scales, zeros, full precision), with the 16-bit reference.

        Packed buffers grow in place with spare capacity: :meth:`memory_reserved` reports that room apart, so
        ``memory_footprint().total + memory_reserved()`` is what the cache has allocated."""
        return layers_nbytes(self.layers)

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        """The per-layer specs (the layers save themselves; see :mod:`kvcache_plugins.caches.state`)."""
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
        seen = set()
        for layer in self.layers:
            if isinstance(layer, MixedPrecisionLayer):
                seen.add((layer.batch_size, layer.get_seq_length()) if layer.is_initialized else (0, 0))
            elif type(layer) is DynamicLayer:
                n = dynamic_length(layer)
                seen.add((0, 0) if n is None else (int(layer.keys.shape[0]), n))
        state.require(len(seen) <= 1, f"layers disagree on (rows, tokens): {sorted(seen)}")
        rows, tokens = seen.pop() if seen else (None, None)
        for layer in self.layers:
            if getattr(layer, "is_sliding", False) and layer.is_initialized and rows:
                state.require(
                    (layer.keys.shape[0], layer.get_seq_length()) == (rows, tokens),
                    f"a sliding-window layer has seen {layer.get_seq_length()} tokens of {layer.keys.shape[0]} rows, "
                    f"the other layers {tokens} of {rows}",
                )

    def memory_reserved(self) -> int:
        """Bytes allocated beyond the stored tokens: growth room of the packed buffers (amortised growth: about a
        sixteenth of the quantized bytes plus up to 128 tokens per stream)."""
        return sum(layer.reserved_nbytes() for layer in self._quantized_layers())

    def describe(self) -> str:
        """One line per layer: how it is stored."""
        lines = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, MixedPrecisionLayer):
                lines.append(f"layer {i:>3}: {layer.spec.describe()}")
            else:
                lines.append(f"layer {i:>3}: model precision ({type(layer).__name__})")
        return "\n".join(lines)


def layers_nbytes(layers: list[Any]) -> CacheBytes:
    """Sum of :class:`CacheBytes` over cache layers of any supported kind."""
    total = CacheBytes()
    for layer in layers:
        if hasattr(layer, "nbytes"):
            total = total + layer.nbytes()
        elif isinstance(layer, DynamicLayer):
            total = total + dynamic_layer_nbytes(layer)
    return total
