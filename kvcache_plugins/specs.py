"""Cache specs by name: one grammar for Python (:func:`make_cache`), the benchmark and lm-eval.

A spec has no commas (lm-eval splits ``--model_args`` on commas)::

    full                                  no compression (a plain DynamicCache)
    int8 | int4 | int3 | int2 | mixed_l0 | kivi4 | kivi2        MixedPrecisionCache presets
    <selector>:<retention>[:<granularity>]                       CompressedCache, e.g. q2c:0.5, snapkv:0.25:global
    <selector>:<retention>[:<granularity>]:<budget>              with a budget allocator, e.g. snapkv:0.25:adakv
                                                                 (per-head budgets; implies :head),
                                                                 keydiff:0.25:pyramid (per-layer budgets)
    <selector>:<retention>+<preset>                              selection plus quantization, e.g. q2c:0.5+mixed_l0
    scout=<model id or path>:<selector>:<retention>[:layer][+<preset>]
                                          a scout model selects (global positions; :layer for per-layer ones),
                                          e.g. scout=Qwen/Qwen2.5-3B-Instruct:q2c:0.5
    svd:<ranks>[:post][+<preset>]        LowRankCache: the prompt's keys and values as rank-r SVD factors; ranks
                                          are r (keys and values), k<r>v<r> (e.g. svd:k32v64), k<r> or v<r> (the
                                          other tensor not factored); keys are factored before RoPE unless :post;
                                          +<preset> quantizes the factors and later tokens
    <selection or scout spec>+svd:<ranks>[+<preset>]
                                          the kept tokens stored low-rank, e.g. q2c:0.5+svd:64, q2c:0.75+svd:64+int4
    <selection or scout spec>@construction
                                          apply the selection during the prefill too: the model first scores the
                                          prompt (its own selection, or the scout's), then prefills it with the
                                          unselected context hidden from every later token (ScoutMaskedCache
                                          mode="construction"), so even the first answer token sees only what was
                                          kept; e.g. q2c:0.25:global@construction
    <preset>@construction                 the transmission protocol for a compressing cache (int4@construction,
                                          mixed_l0@construction; full@construction is the lossless control): the
                                          context (all but the question span) is stored compressed before the
                                          question is read (:func:`~kvcache_plugins.transmission.prefill_context`),
                                          so the question and every answer token attend to the compressed context
                                          (a selection's ``+<preset>`` is not transmitted this way: with
                                          ``@construction`` the prefill reads the kept tokens at model precision and
                                          stores them quantized after it)

``<selector>`` is one of q2c, snapkv, h2o, random, streaming, knorm, tova, keydiff, lagkv, expected_attention;
``<retention>`` is a decimal number in (0, 1]; leading and trailing whitespace is ignored, whitespace inside a spec
is an error; a rank is a decimal integer (ASCII digits) in 1..head_dim (the upper bound is checked against the
model by :func:`make_cache`); ``<granularity>`` is layer (default), global or head (not with ``@construction``); ``<budget>`` is
uniform (default), pyramid or adakv (:mod:`kvcache_plugins.selection.budget`; plain selections only, not scouts or
``@construction``). ``scout=embedded`` names the package's embedded scout model. Without ``@construction`` a
selection is applied after a full prefill, as a ``CompressedCache`` does: the prompt's own forward pass (and so the
first generated token) still sees every token; likewise a quantized cache without ``@construction`` quantizes what it
stores, but the prompt's forward pass (and so the first generated token) attends to the prompt at full precision.
:func:`parse_spec` validates a spec without loading anything, so a bad spec fails before the model loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from .quant.spec import PRESETS
from .selection import selector_names
from .selection.budget import BUDGETS

GRANULARITY_NAMES = ("layer", "global", "head")
_NUMBER = re.compile(r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_RANKS = re.compile(r"([0-9]{1,9})|(?:k([0-9]{1,9}))?(?:v([0-9]{1,9}))?")
FORMS = (
    "full",
    " | ".join(p for p in PRESETS if p != "full"),
    "<selector>:<retention>[:<granularity>]  e.g. q2c:0.5, snapkv:0.25:global",
    "<selector>:<retention>[:<granularity>]:<budget>  e.g. snapkv:0.25:adakv, keydiff:0.25:pyramid",
    "<selector>:<retention>+<preset>  e.g. q2c:0.5+mixed_l0",
    "svd:<rank | k<rank>v<rank>>[:post][+<preset>]  e.g. svd:32, svd:k32v64, svd:16:post, svd:64+int8",
    "<selection or scout spec>+svd:<ranks>[+<preset>]  e.g. q2c:0.5+svd:64, q2c:0.75+svd:64+int4",
    "scout=<model id or path>:<selector>:<retention>[+<preset>]  e.g. scout=embedded:q2c:0.5",
    "<selection or scout spec>@construction  e.g. q2c:0.25:global@construction",
    "<preset or svd spec>@construction  e.g. int4@construction, svd:16@construction (context stored compressed "
    "before the question is read)",
)


def valid_forms() -> str:
    return "; ".join(FORMS) + (
        f" (selectors: {', '.join(selector_names())}; granularity: {', '.join(GRANULARITY_NAMES)}; "
        f"budget: {', '.join(sorted(BUDGETS))})"
    )


@dataclass(frozen=True)
class CacheSpec:
    """A parsed spec. ``kind`` is ``"full"``, ``"quant"``, ``"lowrank"``, ``"select"`` or ``"scout"``."""

    text: str
    kind: str
    preset: str | None = None
    selector: str | None = None
    retention: float | None = None
    granularity: str = "layer"
    scout: str | None = None
    prefill: str = "post_hoc"  # "construction": the selection also hides unselected context during the prefill
    lowrank: tuple[int | None, int | None] | None = None  # (key rank, value rank) of svd:...; None: no low rank
    lowrank_keys: str = "pre_rope"  # svd:...:post factors keys after RoPE
    budget: str = "uniform"

    @property
    def needs_question(self) -> bool:
        """Whether the cache needs the question span (query-aware selection, or the transmission protocol)."""
        return self.selector == "q2c" or self.transmits

    @property
    def transmits(self) -> bool:
        """The transmission protocol: a compressing (non-selecting) cache stores the context before the question."""
        return self.prefill == "construction" and not self.selects

    @property
    def selects(self) -> bool:
        return self.kind in ("select", "scout")


def _error(spec: str, why: str) -> ValueError:
    return ValueError(f"invalid cache spec {spec!r}: {why}. Valid forms: {valid_forms()}")


def _parse_selection(
    spec: str, body: str, default_granularity: str = "layer", budgets: bool = True
) -> tuple[str, float, str, str]:
    """``(selector, retention, granularity, budget)`` of ``<selector>:<retention>[:<granularity>][:<budget>]``.

    A third field is a granularity or, when it names a budget, the budget (``adakv`` then implies ``head``); a
    fourth field must be a budget. ``budgets=False`` (scouts) refuses any budget field."""
    grammar = "a selection is <selector>:<retention>[:<granularity>][:<budget>]"
    parts = body.split(":")
    if len(parts) not in (2, 3, 4):
        raise _error(spec, grammar)
    name, retention, *rest = parts
    budget = "uniform"
    if len(rest) == 2:
        if rest[1] not in BUDGETS:
            raise _error(spec, f"unknown budget {rest[1]!r} ({grammar})")
        budget = rest.pop()
    elif len(rest) == 1 and rest[0] not in GRANULARITY_NAMES:
        if rest[0] not in BUDGETS:
            raise _error(
                spec,
                f"unknown granularity {rest[0]!r}: the field after the retention is a granularity "
                f"({', '.join(GRANULARITY_NAMES)}) or a budget ({', '.join(sorted(BUDGETS))})",
            )
        budget = rest.pop()
        if budget == "adakv":
            rest = ["head"]  # per-head budgets: the only granularity adakv works with
    if budget != "uniform" and not budgets:
        raise _error(spec, "budget allocators apply to plain selections, not to a scout's")
    if name not in selector_names():
        raise _error(spec, f"unknown selector {name!r}")
    if not _NUMBER.fullmatch(retention):
        raise _error(spec, f"retention {retention!r} is not a number (write a decimal such as 0.5)")
    r = float(retention)
    if not 0 < r <= 1:
        raise _error(spec, f"retention {r} is outside (0, 1]")
    granularity = rest[0] if rest else default_granularity
    if granularity not in GRANULARITY_NAMES:
        raise _error(spec, f"unknown granularity {granularity!r}")
    if granularity not in BUDGETS[budget].granularities:
        raise _error(spec, f"budget {budget!r} works with granularity {' or '.join(BUDGETS[budget].granularities)}")
    return name, r, granularity, budget


def _parse_ranks(spec: str, body: str) -> tuple[tuple[int | None, int | None], str]:
    """``32`` -> (32, 32); ``k32v64`` -> (32, 64); ``k32`` -> (32, None); ``v64`` -> (None, 64); a ``:post``
    suffix factors keys after RoPE (``:pre``, the default, before)."""
    body, sep, space = body.partition(":")
    if sep and space not in ("pre", "post"):
        raise _error(spec, f"unknown key space {space!r} after the svd ranks (pre or post: before or after RoPE)")
    keys = "post_rope" if space == "post" else "pre_rope"
    m = _RANKS.fullmatch(body)
    if not body or m is None:
        raise _error(spec, f"svd ranks {body!r} are not <rank>, k<rank>v<rank>, k<rank> or v<rank>")
    both, k, v = m.groups()
    if both is not None:
        ranks = (int(both), int(both))
    else:
        ranks = (None if k is None else int(k), None if v is None else int(v))
    for r in ranks:
        if r is not None and r < 1:
            raise _error(spec, f"rank {r} is outside the allowed range 1..head_dim")
    return ranks, keys


def parse_spec(spec: str) -> CacheSpec:
    """Validate and parse a spec string (see the module docstring); raises ``ValueError`` listing the valid forms."""
    if not isinstance(spec, str):
        raise TypeError(f"a cache spec is a string, got {type(spec).__name__}. Valid forms: {valid_forms()}")
    text = spec.strip()
    if not text:
        raise _error(spec, "empty spec")
    if "," in text:
        raise _error(text, "specs cannot contain commas")
    if any(c.isspace() for c in text):
        raise _error(text, "specs contain no whitespace (only leading and trailing whitespace is ignored)")
    prefill = "post_hoc"
    head, sep, tail = text.rpartition("@")
    if sep and ":" not in tail and "/" not in tail:  # a suffix, not an '@' inside a scout's model path
        text, prefill = head, tail
        if prefill != "construction":
            raise _error(spec, f"unknown prefill mode {prefill!r} after '@' (only @construction)")
        if ":" not in text and text not in PRESETS:
            raise _error(spec, "'@construction' follows a selection, scout or quantization spec")
    preset = None
    lowrank, keys = None, "pre_rope"
    text_sel = text
    if "+" in text_sel and not text_sel.rsplit("+", 1)[1].startswith("svd:"):
        text_sel, preset = text_sel.rsplit("+", 1)
        if preset not in PRESETS or preset == "full":
            raise _error(spec, f"unknown quantization preset {preset!r} after '+'")
        if preset.startswith("kivi"):
            raise _error(spec, "selection stores tokens per-token; kivi presets (per-channel keys) cannot follow a selector")
    if "+" in text_sel and text_sel.rsplit("+", 1)[1].startswith("svd:"):
        text_sel, svd = text_sel.rsplit("+", 1)
        lowrank, keys = _parse_ranks(spec, svd[len("svd:") :])
        if ":" not in text_sel or text_sel.startswith("svd:"):
            raise _error(spec, "'+svd:<ranks>' follows a selection or scout spec (alone it is svd:<ranks>)")
    if text_sel.startswith("svd:"):
        lowrank, keys = _parse_ranks(spec, text_sel[len("svd:") :])
        return CacheSpec(spec, "lowrank", preset, prefill=prefill, lowrank=lowrank, lowrank_keys=keys)
    if text_sel.startswith("scout="):
        rest = text_sel[len("scout=") :]
        head, sep, tail = rest.partition(":")
        if not sep or not head:
            raise _error(spec, "a scout spec is scout=<model id or path>:<selector>:<retention>")
        name, r, granularity, _ = _parse_selection(spec, tail, default_granularity="global", budgets=False)
        if granularity == "head":
            raise _error(spec, "a scout hands over global (or per-layer) selections, not per-head ones")
        return CacheSpec(spec, "scout", preset, name, r, granularity, head, prefill, lowrank, keys)
    if ":" in text_sel:
        name, r, granularity, budget = _parse_selection(spec, text_sel)
        if prefill == "construction" and budget != "uniform":
            raise _error(spec, "@construction applies uniform selections; budget allocators apply to plain ones")
        if prefill == "construction" and granularity == "head":
            raise _error(spec, "@construction applies global or per-layer selections, not per-head ones")
        return CacheSpec(spec, "select", preset, name, r, granularity, None, prefill, lowrank, keys, budget)
    if preset is not None:
        raise _error(spec, "'+<preset>' follows a selection")
    if text_sel == "full":
        return CacheSpec(spec, "full", prefill=prefill)
    if text_sel in PRESETS:
        return CacheSpec(spec, "quant", text_sel, prefill=prefill)
    raise _error(spec, f"unknown preset or selector {text_sel!r}")


_SCOUTS: dict[str, tuple[Any, Any]] = {}


def load_scout(name: str, dtype: torch.dtype | None = None, device: Any = None) -> tuple[Any, Any]:
    """The scout model and tokenizer named in a spec (``embedded`` or a hub id / local path), loaded once."""
    key = f"{name}|{dtype}|{device}"
    if key not in _SCOUTS:
        if name == "embedded":
            from .reference import load_scout_model

            model, tok = load_scout_model(dtype=dtype or torch.float32, device=device or "cpu")
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from ._compat import no_hub_kernels

            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype or "auto", attn_implementation="sdpa", **no_hub_kernels()
            )
            model = model.to(device or "cpu").eval()
            tok = AutoTokenizer.from_pretrained(name)
        _SCOUTS[key] = (model, tok)
    return _SCOUTS[key]


def make_cache(
    spec: str | CacheSpec,
    model: Any,
    *,
    question_len: Any = None,
    tokenizer: Any = None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    group_size: int | None = None,
):
    """A fresh cache for ``model`` from a spec (see the module docstring).

    ``question_len`` is required by q2c specs; scout specs also need ``tokenizer`` (the large model's) and the
    prompt (``input_ids``, ``attention_mask``) the scout reads. ``<preset>@construction`` needs ``question_len`` and
    the prompt: the returned cache already holds each row's context, and ``generate`` must be called with the same
    ``input_ids`` and ``attention_mask`` (it reads the questions, then answers).
    """
    from transformers import DynamicCache

    from ._model import head_dim, text_config
    from .caches import CompressedCache, LowRankCache, MixedPrecisionCache, ScoutMaskedCache
    from .scout import Scout

    s = parse_spec(spec) if isinstance(spec, str) else spec
    if group_size is None:
        group_size = min(32, head_dim(text_config(model)))
    if s.transmits and input_ids is None:
        raise ValueError(f"cache spec {s.text!r} stores the prompt's context before the question: it needs input_ids=")
    if s.kind == "full":
        return _context_first(s, model, DynamicCache(config=model.config), input_ids, attention_mask, question_len)
    if s.kind == "quant":
        kw = {"residual_length": max(128, group_size)} if s.preset.startswith("kivi") else {}
        cache = MixedPrecisionCache(model, s.preset, group_size=group_size, **kw)
        return _context_first(s, model, cache, input_ids, attention_mask, question_len)
    if s.kind == "lowrank":
        cache = LowRankCache(model, s.lowrank, quant=s.preset, keys=s.lowrank_keys, group_size=group_size)
        return _context_first(s, model, cache, input_ids, attention_mask, question_len)
    if s.needs_question and question_len is None:
        raise ValueError(f"cache spec {s.text!r} selects by the question: it needs question_len")
    if s.kind == "select" and s.prefill == "post_hoc":
        return CompressedCache(
            model, selector=s.selector, retention=s.retention, question_len=question_len if question_len is not None else 0,
            granularity=s.granularity, quant=s.preset, group_size=group_size, lowrank=s.lowrank,
            lowrank_keys=s.lowrank_keys, budget=s.budget,
        )
    if tokenizer is None or input_ids is None:
        what = "runs a scout on the prompt" if s.kind == "scout" else "scores the prompt before its prefill"
        raise ValueError(f"cache spec {s.text!r} {what}: it needs tokenizer= and input_ids=")
    if s.kind == "scout":
        scout_model, scout_tok = load_scout(s.scout, device=input_ids.device)
    else:  # @construction: the model scouts for itself
        scout_model, scout_tok = model, tokenizer
    selection = Scout(scout_model, scout_tok, s.selector, s.retention, granularity=s.granularity).select(
        input_ids, attention_mask, question_len=question_len if question_len is not None else 0
    )
    return ScoutMaskedCache(
        selection, model, tokenizer=tokenizer, mode=s.prefill, quant=s.preset, group_size=group_size,
        lowrank=s.lowrank, lowrank_keys=s.lowrank_keys,
    )


def _context_first(s: CacheSpec, model: Any, cache: Any, input_ids, attention_mask, question_len):
    """``cache`` as is, or (``@construction`` on a compressing cache) holding each row's context already."""
    if not s.transmits:
        return cache
    from .transmission import prefill_context

    return prefill_context(model, cache, input_ids, attention_mask, question_len)
