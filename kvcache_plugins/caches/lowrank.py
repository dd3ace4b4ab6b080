"""``LowRankCache``: every full-attention layer's prompt stored as rank-``r`` SVD factors (the storage is
:mod:`kvcache_plugins.layers.lowrank`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from .._model import head_dim, text_config
from ..layers.base import Workspace
from ..layers.lowrank import LowRankLayer
from ..layers.lowrank_store import check_layers, read_ranks
from ..layers.rope import KEY_SPACES, resolve_rope
from ..persist.state import StateReader, layer_spec_state, read_layer_spec, register_cache
from ..quant.groupwise import META_DTYPES
from ..quant.lowrank import RankSpec, resolve_ranks
from ..quant.spec import DEFAULT_GROUP_SIZE, Spec, resolve_layer_specs
from .base import PluginCache, require_layers_agree


@register_cache("LowRankCache")
class LowRankCache(PluginCache):
    """A ``transformers.DynamicCache`` storing the prompt's keys and values as rank-``r`` SVD factors.

    ``model.generate(..., cache=LowRankCache(model, rank=16))`` (``past_key_values=`` before transformers 5.24; both
    are supported, see ``kvcache_plugins.cache_kwargs``); the spec ``svd:16`` (``svd:k16v32`` for separate key/value
    ranks, ``svd:16+int8`` for quantized factors) builds it through ``make_cache``.

    Args:
        model_or_config: the model (or its config) the cache serves.
        rank: ``r`` in ``1..head_dim`` for keys and values, ``(key_rank, value_rank)``, ``{"key": r, "value": r}``,
            a dict ``{layer: entry, "default": entry}`` or one entry per layer; ``None`` = not factored.
        quant: per-token quantization of the factors and of the tail (a ``MixedPrecisionCache`` spec such as
            ``"int8"``, ``"int4"``, ``"mixed_l0"``); default: factors and tail in the model dtype.
        keys: ``"pre_rope"`` (default; needs the model, not a config) or ``"post_rope"``: factor keys before or
            after the rotary embedding (see the module docstring).
        group_size, scale_dtype: quantization grouping and scale dtype, as in ``MixedPrecisionCache``.
    """

    def __init__(
        self,
        model_or_config: Any,
        rank: RankSpec = 32,
        *,
        quant: Spec | None = None,
        keys: str = "pre_rope",
        group_size: int = DEFAULT_GROUP_SIZE,
        scale_dtype: torch.dtype | None = None,
    ) -> None:
        cfg = text_config(model_or_config)
        if scale_dtype is not None and scale_dtype not in META_DTYPES:
            raise ValueError(f"scale_dtype must be one of {META_DTYPES}, got {scale_dtype!r}")
        n, D = cfg.num_hidden_layers, head_dim(cfg)
        ranks = resolve_ranks(rank, n, D)
        specs = resolve_layer_specs("full" if quant is None else quant, n, group_size=group_size, head_dim=D)
        check_layers(ranks, specs, "LowRankCache")
        rope = resolve_rope(keys, model_or_config, ranks)
        super().__init__(config=cfg)
        self.keys = keys
        self.model_config = cfg
        self.rank = rank
        self.layer_ranks = ranks
        self.layer_specs = specs
        self.workspace = Workspace()
        for i, layer in enumerate(self.layers):
            if type(layer) is DynamicLayer and (ranks[i] != (None, None) or specs[i].quantized):
                self.layers[i] = LowRankLayer(ranks[i], specs[i], scale_dtype, self.workspace, rope)

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        """Per-layer ranks, key space and quantization specs (the layers save themselves; see :mod:`.state`)."""
        return {
            "rank": [list(r) for r in self.layer_ranks], "keys": self.keys,
            "layer_specs": [layer_spec_state(s) for s in self.layer_specs],
        }

    @classmethod
    def from_state(cls, state: StateReader, model: Any, tokenizer: Any = None) -> LowRankCache:
        """An empty cache built from the saved ranks (each null or in ``1..head_dim``), key space and specs."""
        state.fields(["rank", "keys", "layer_specs"])
        cfg = text_config(model)
        n, D = int(cfg.num_hidden_layers), head_dim(cfg)
        specs = [read_layer_spec(s, D) for s in state.items("layer_specs", n)]
        ranks = read_ranks(state, "rank", n, D)
        keys = state.str("keys", KEY_SPACES)
        try:
            return cls(model, ranks, quant=specs, keys=keys)
        except (TypeError, ValueError) as err:  # e.g. a rank that cannot be packed at the saved bits
            raise state.error(f"arguments rejected: {err}") from None

    def finish_state(self, state: StateReader) -> None:
        """Every full-attention layer holds the same rows and tokens; sliding-window layers the same rows and
        the tokens their window keeps of them."""

        def rows_tokens(layer: Any) -> tuple[int, int] | None:
            if not isinstance(layer, LowRankLayer):
                return None
            store = layer.key_store
            return (0, 0) if store is None else (store.shape[0], store.num_tokens)

        require_layers_agree(state, self.layers, rows_tokens)


