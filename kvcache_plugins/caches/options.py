"""The arguments of :class:`~kvcache_plugins.CompressedCache`, checked once, before anything is built.

Every refusal is a ``TypeError`` / ``ValueError`` naming what is allowed; :func:`check_options` returns the
normalised arguments as :class:`CompressedOptions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_choice, check_fraction, check_int, check_row_counts
from .._model import head_dim, text_config
from ..layers.lowrank_store import check_layers
from ..layers.rope import RopeRotation, resolve_rope
from ..quant.groupwise import META_DTYPES
from ..quant.lowrank import LayerRanks, resolve_ranks
from ..quant.spec import LayerQuantSpec, Spec, resolve_layer_specs
from ..selection import Selector, make_selector
from ..selection.budget import Budget, make_budget
from ..selection.eviction import DECODE_POLICIES

GRANULARITIES = ("layer", "global", "head")


@dataclass
class CompressedOptions:
    """The checked arguments (see :class:`~kvcache_plugins.CompressedCache` for their meaning)."""

    config: Any
    selector: Selector
    budget: Budget
    retention: float | None
    max_tokens: int | None
    question_len: int | list[int] | None
    sink_tokens: int
    granularity: str
    layer_specs: list[LayerQuantSpec]
    scale_dtype: torch.dtype | None
    decode_policy: str | None
    evict_every: int
    recent_tokens: int
    seed: int
    layer_ranks: list[LayerRanks] | None
    lowrank_keys: str
    rope: RopeRotation | None


def check_options(
    model: Any, config: Any, selector: str | Selector, retention: float | None, max_tokens: int | None,
    question_len: int | Sequence[int] | torch.Tensor | None, question: str | None, tokenizer: Any,
    sink_tokens: int | None, granularity: str, budget: str | Budget, quant: Spec | None, group_size: int,
    scale_dtype: torch.dtype | None, decode_policy: str | None, evict_every: int, recent_tokens: int | None, seed: int,
    lowrank: Any, lowrank_keys: str, fused: bool, selector_options: dict[str, Any],
) -> CompressedOptions:
    """Check and normalise the constructor's arguments (``TypeError`` / ``ValueError`` naming what is allowed)."""
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be True or False, got {fused!r}")
    if model is None and config is None:
        raise TypeError("CompressedCache needs the model it will serve (or, for query-free selectors, its config)")
    cfg = text_config(model if model is not None else config)
    sel = make_selector(selector, **selector_options)
    if retention is None and max_tokens is None:
        raise ValueError("give a budget: retention (a fraction of the context in (0, 1]) and/or max_tokens")
    retention = None if retention is None else check_fraction("retention", retention)
    max_tokens = None if max_tokens is None else check_int("max_tokens", max_tokens, 1)
    check_choice("granularity", granularity, GRANULARITIES)
    allocator = make_budget(budget)
    if granularity not in allocator.granularities:
        raise ValueError(
            f"budget {allocator.name!r} works with granularity "
            f"{' or '.join(map(repr, allocator.granularities))}, got {granularity!r}"
        )
    if allocator.ragged and (model is None or decode_policy is not None):
        raise ValueError(
            f"budget {allocator.name!r} keeps different counts per head: it needs the model (to mask each head's "
            "unused slots) and no decode_policy"
        )
    if question is not None:
        if question_len is not None:
            raise ValueError("give either question_len or question, not both")
        if tokenizer is None:
            raise ValueError("question= needs the tokenizer (tokenizer=...) to count its tokens")
        question_len = len(tokenizer(question, add_special_tokens=False).input_ids)
    if sel.needs_question and question_len is None:
        raise ValueError(
            f"selector {sel.name!r} scores the context by the question's attention: give question_len "
            "(tokens of the question at the end of the prompt) or question= with tokenizer="
        )
    question_len = None if question_len is None else check_row_counts("question_len", question_len)
    if sel.needs_queries and model is None:
        raise ValueError(f"selector {sel.name!r} needs the model's queries: build the cache as CompressedCache(model, ...)")
    check_choice("decode_policy", decode_policy, (*DECODE_POLICIES, None))
    if decode_policy is not None:
        if max_tokens is None:
            raise ValueError("decode_policy bounds the cache during generation: it needs max_tokens")
        if model is None:
            raise ValueError("decode_policy evicts right after each layer's attention: it needs the model")
    evict_every = check_int("evict_every", evict_every, 1)
    recent_tokens = evict_every if recent_tokens is None else check_int("recent_tokens", recent_tokens, 0)
    seed = check_int("seed", seed)
    check_choice("lowrank_keys", lowrank_keys, ("pre_rope", "post_rope"))
    if lowrank is not None and decode_policy is not None:
        raise ValueError("lowrank storage keeps its factored slots: it cannot be combined with a decode_policy")
    if scale_dtype is not None and scale_dtype not in META_DTYPES:
        raise ValueError(f"scale_dtype must be one of {META_DTYPES}, got {scale_dtype!r}")
    sinks = check_int("sink_tokens", sel.default_sinks if sink_tokens is None else sink_tokens, 0)
    specs = quant_specs(quant, cfg, group_size)
    ranks = rope = None
    if lowrank is not None:
        if allocator.ragged:
            raise ValueError(
                f"budget={allocator.name!r} stores each head's tokens ragged; low-rank storage (lowrank=) works "
                "with the 'uniform' and 'pyramid' budgets"
            )
        ranks = resolve_ranks(lowrank, cfg.num_hidden_layers, head_dim(cfg))
        check_layers(ranks, specs, "CompressedCache")
        rope = resolve_rope(lowrank_keys, model, ranks)
    return CompressedOptions(
        cfg, sel, allocator, retention, max_tokens, question_len, sinks, granularity, specs, scale_dtype,
        decode_policy, evict_every, recent_tokens, seed, ranks, lowrank_keys, rope,
    )


def quant_specs(quant: Spec | None, cfg: Any, group_size: int) -> list[LayerQuantSpec]:
    """Per-layer specs of a selecting cache: per-token groups only, no residual window or full-precision sinks."""
    specs = resolve_layer_specs(
        "full" if quant is None else quant, cfg.num_hidden_layers, group_size=group_size, head_dim=head_dim(cfg)
    )
    for i, spec in enumerate(specs):
        for t in (spec.key, spec.value):
            if t.quantized and t.axis != "token":
                raise ValueError(
                    f"layer {i}: CompressedCache quantizes per token (evicting single tokens would break "
                    "per-channel groups); use a per-token spec such as 'int4' or 'mixed_l0'"
                )
        if spec.quantized and (spec.residual_length or spec.sink_tokens):
            raise ValueError(
                f"layer {i}: CompressedCache stores kept tokens quantized as a whole; residual windows and "
                "full-precision sinks are MixedPrecisionCache options (use sink_tokens= to protect tokens)"
            )
    return specs
