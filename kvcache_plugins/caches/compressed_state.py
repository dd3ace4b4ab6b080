"""Save/load of a :class:`~kvcache_plugins.CompressedCache` (and its subclasses): the constructor arguments, the
per-layer specs and the prompt layout; the layers save themselves (:mod:`kvcache_plugins.persist.state`).

A loaded file is untrusted: every argument is checked for type and range, and :meth:`CompressedState.finish_state`
checks that the layout fits the arguments and every layer.
"""

from __future__ import annotations

from typing import Any

import torch

from .._model import head_dim, text_config
from ..layers.lowrank_store import read_ranks
from ..layers.rope import KEY_SPACES
from ..layers.slots import CompressedLayer
from ..persist.state import StateReader, layer_spec_state, read_layer_spec
from ..selection import PromptLayout, selector_names
from ..selection.budget import budget_state, read_budget
from ..selection.eviction import DECODE_POLICIES
from .options import GRANULARITIES


def lowrank_state(cache: Any) -> dict[str, Any]:
    """``lowrank`` (one ``[key_rank, value_rank]`` per layer) and ``lowrank_keys``, only when low rank is used."""
    if cache.layer_ranks is None:
        return {}
    return {"lowrank": [list(r) for r in cache.layer_ranks], "lowrank_keys": cache.lowrank_keys}


def read_lowrank(a: StateReader, model: Any) -> dict[str, Any]:
    """The constructor's ``lowrank``/``lowrank_keys`` from :func:`lowrank_state` (both present or neither)."""
    if not a.has("lowrank") and not a.has("lowrank_keys"):
        return {}
    cfg = text_config(model)
    ranks = read_ranks(a, "lowrank", int(cfg.num_hidden_layers), head_dim(cfg))
    return {"lowrank": ranks, "lowrank_keys": a.str("lowrank_keys", KEY_SPACES)}


class CompressedState:
    """The state contract of :class:`~kvcache_plugins.CompressedCache` (``to_state`` / ``from_state`` /
    ``finish_state``, see :class:`~kvcache_plugins.persist.mixin.PersistentCache`)."""

    def to_state(self) -> dict[str, Any]:
        """Constructor arguments, per-layer specs and the prompt layout (layers save themselves)."""
        lay = self.layout
        layout = None if lay is None else {
            "length": lay.length, "pad": lay.pad.tolist(), "question_len": lay.question_len.tolist(),
            "sinks": lay.sinks.tolist(),
        }
        specs = [layer_spec_state(s) for s in self.layer_specs]
        return {"args": self.state_args(), "layer_specs": specs, "layout": layout}

    def state_args(self) -> dict[str, Any]:
        """The constructor arguments a saved file carries (a subclass saves its own)."""
        options = {k: v for k, v in vars(self.selector).items() if not k.startswith("_")}
        return {
            "selector": self.selector.name, "selector_options": options, "retention": self.retention,
            "max_tokens": self.max_tokens, "question_len": self.question_len, "sink_tokens": self.sink_tokens,
            "granularity": self.granularity, "decode_policy": self.decode_policy, "evict_every": self.evict_every,
            "recent_tokens": self.recent_tokens, "seed": self.seed, "budget": budget_state(self.budget),
            **lowrank_state(self),
        }

    @classmethod
    def from_state(cls, state: StateReader, model: Any, tokenizer: Any = None) -> Any:
        """An empty cache built from saved arguments, each checked for type and range."""
        state.fields(["args", "layer_specs", "layout"])
        cfg = text_config(model)
        specs = [read_layer_spec(s, head_dim(cfg)) for s in state.items("layer_specs", int(cfg.num_hidden_layers))]
        return cls.from_state_args(state.sub("args"), model, specs, tokenizer)

    @classmethod
    def from_state_args(cls, a: StateReader, model: Any, specs: list, tokenizer: Any) -> Any:
        """A cache built from what :meth:`state_args` wrote, every field checked (a subclass reads its own)."""
        a.fields(
            ["selector", "selector_options", "retention", "max_tokens", "question_len", "sink_tokens", "granularity",
             "decode_policy", "evict_every", "recent_tokens", "seed", "budget"],
            ["lowrank", "lowrank_keys"],
        )
        options = a.raw("selector_options")
        a.require(
            isinstance(options, dict)
            and all(isinstance(v, (int, float, str, bool)) or v is None for v in options.values()),
            "selector_options must map names to plain values",
        )
        qlen = a.raw("question_len")
        if qlen is not None and not isinstance(qlen, int):
            qlen = a.int_list("question_len")
        kwargs = dict(
            selector=a.str("selector", selector_names()), retention=a.float("retention", 1e-12, 1.0, optional=True),
            max_tokens=a.int("max_tokens", 1, optional=True), question_len=qlen, sink_tokens=a.int("sink_tokens"),
            granularity=a.str("granularity", GRANULARITIES), quant=specs,
            decode_policy=a.str("decode_policy", DECODE_POLICIES, optional=True), evict_every=a.int("evict_every", 1),
            recent_tokens=a.int("recent_tokens"), seed=a.int("seed", -(2**63), 2**63 - 1),
            budget=read_budget(a.sub("budget")), **read_lowrank(a, model),
        )
        try:
            return cls(model, **kwargs, **options)
        except (TypeError, ValueError) as err:  # the constructor's own checks of what the fields did not pin down
            raise a.error(f"arguments rejected: {err}") from None

    def finish_state(self, state: StateReader) -> None:
        """The layout fits the arguments and every layer: rows, lengths, and no kept position in the padding."""
        layers = [self.layers[i] for i in self.compressed_layers]
        held = {id(layer): layer.kept_positions() for layer in layers}  # [B, 1 or H, S] (-1 unused), or None
        filled = [layer for layer in layers if held[id(layer)] is not None]
        if state.raw("layout") is None:
            state.require(not filled, "a cache holding tokens needs its prompt layout")
            return
        lay = state.sub("layout")
        lay.fields(["length", "pad", "question_len", "sinks"])
        length = lay.int("length", 1)
        pad = lay.int_list("pad", None, 0, length - 1)
        B = len(pad)
        lay.require(B >= 1, "the layout has no row")
        question = lay.int_list("question_len", B, 0, length)
        sinks = lay.int_list("sinks", B, self.sink_tokens, self.sink_tokens)
        given = 0 if self.question_len is None else self.question_len
        if isinstance(given, list):
            lay.require(B % len(given) == 0, f"{B} rows cannot come from question_len {given}")
            given = [q for q in given for _ in range(B // len(given))]
        else:
            given = [given] * B
        lay.require(question == given, f"question spans {question} differ from question_len {self.question_len}")
        lay.require(
            all(p + q + s <= length for p, q, s in zip(pad, question, sinks)),
            "padding, sinks and question exceed the prompt",
        )
        lay.require(len(filled) == len(layers), "some compressed layers are empty, others are not")
        if self.decode_policy is not None:
            protected = max(q + s for q, s in zip(question, sinks)) + self.recent_tokens
            lay.require(
                protected <= self.max_tokens, f"max_tokens={self.max_tokens} cannot hold the {protected} protected tokens"
            )
            most = self.max_tokens + self.evict_every - 1
            lay.require(all(layer.stored <= most for layer in filled), f"a layer holds more than the {most} slots allowed")
        for layer in filled:
            p = held[id(layer)].cpu()
            lay.require(p.shape[0] == B, f"a layer holds {p.shape[0]} rows, the layout {B}")
            lay.require(layer.logical == filled[0].logical, "compressed layers disagree on the tokens seen")
            lay.require(layer.logical >= length, f"a layer has seen {layer.logical} tokens, fewer than the prompt")
            ragged = getattr(layer, "ragged", False)
            lay.require(
                not ragged or layer.logical - layer.generated == length,
                f"a ragged layer's prompt part covers {layer.logical - layer.generated if ragged else 0} positions, "
                f"the prompt {length}",
            )
            start = torch.tensor(pad).view(B, 1, 1)
            lay.require(bool(((p < 0) | (p >= start)).all()), "a kept position lies in a row's left padding")
            for b in range(B):  # sinks and the question span are always kept, by every head
                protected = [*range(pad[b], pad[b] + sinks[b]), *range(length - question[b], length)]
                if protected:
                    kept = (p[b].unsqueeze(-1) == torch.tensor(protected)).any(1)
                    lay.require(bool(kept.all()), f"row {b} does not keep its sinks and question span")
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                continue
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                lay.require(layer.keys.shape[0] == B, f"a layer holds {layer.keys.shape[0]} rows, the layout {B}")
                lay.require(layer.get_seq_length() == filled[0].logical, "layers disagree on the tokens seen")
        self.layout = PromptLayout(length, torch.tensor(pad), torch.tensor(question), torch.tensor(sinks))
