"""The lab's layer-sensitivity protocol: quantize one layer at a time and measure the damage.

For every prompt the full cache answers first (greedy, or the given reference answer is teacher-forced). Then, for
each layer ``l``, a cache that stores only layer ``l`` at ``bits`` (every other layer at model precision) replays
the same answer tokens one decode step at a time, as ``generate`` would. Damage of layer ``l``:

    KL_l  = mean over prompts and answer positions t of  KL( p_full(. | x_<t) || p_l(. | x_<t) )
    top1_l = fraction of those positions where argmax p_l == argmax p_full

The prompt's own forward pass attends to full-precision states in every cache (quantization applies to what is
stored), so the first answer token is unaffected; the damage shows on the tokens after it.

Classification of the per-layer KL profile (``total = sum_l KL_l``):

* ``none``: every ``KL_l < none_below`` -> quantize every layer at ``bits``;
* ``concentrated``: at most ``max_protected`` layers carry at least ``concentration`` of ``total`` -> keep those
  layers at model precision, every other layer at ``bits`` (the lab's ``mixed_l0`` when it is layer 0);
* ``distributed``: otherwise -> uniform int8, since protecting a few layers does not help.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .._compat import cache_kwargs
from ..caches.mixed_precision import MixedPrecisionCache


@dataclass
class LayerDamage:
    """Damage of quantizing one layer: mean KL (nats) and top-1 agreement with the full cache."""

    layer: int
    kl: float
    top1_agreement: float


@dataclass
class LayerDiagnosis:
    """Result of :func:`diagnose_layers`.

    Attributes:
        bits: the width each layer was tested at.
        layers: one :class:`LayerDamage` per layer, in layer order.
        pattern: ``"none"``, ``"concentrated"`` or ``"distributed"``.
        protected: layers to keep at model precision (non-empty only for ``"concentrated"``).
        recommended_spec: a spec to pass to :class:`~kvcache_plugins.MixedPrecisionCache`.
        answer_positions: number of answer positions the means run over.
    """

    bits: int
    layers: list[LayerDamage]
    pattern: str
    protected: list[int] = field(default_factory=list)
    recommended_spec: Any = None
    answer_positions: int = 0

    def table(self) -> str:
        """The per-layer damage as a text table."""
        total = sum(d.kl for d in self.layers) or 1.0
        rows = [f"{'layer':>5}  {'KL (nats)':>10}  {'share':>6}  {'top-1 agree':>11}"]
        for d in self.layers:
            mark = "  <- protect" if d.layer in self.protected else ""
            rows.append(f"{d.layer:>5}  {d.kl:>10.5f}  {d.kl / total:>6.1%}  {d.top1_agreement:>11.1%}{mark}")
        rows.append(f"pattern: {self.pattern}; recommended spec: {self.recommended_spec!r}")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def _prompt_ids(tokenizer: Any, prompt: str | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[0] != 1:
        raise ValueError("diagnose_layers takes prompts one at a time (a string or a [1, n] tensor each)")
    return ids.to(device)


def classify(
    kls: Sequence[float], bits: int, none_below: float, concentration: float, max_protected: int
) -> tuple[str, list[int], Any]:
    """Pattern, protected layers and recommended spec for a per-layer KL profile (see the module docstring)."""
    if max(kls) < none_below:
        return "none", [], f"int{bits}" if bits != 16 else "full"
    total = sum(kls)
    order = sorted(range(len(kls)), key=lambda i: kls[i], reverse=True)
    carried = 0.0
    for count, layer in enumerate(order[:max_protected], start=1):
        carried += kls[layer]
        if carried >= concentration * total:
            protected = sorted(order[:count])
            spec: dict[Any, int] = {layer_idx: 16 for layer_idx in protected}
            spec["default"] = bits
            return "concentrated", protected, spec
    return "distributed", [], "int8"


@torch.inference_mode()
def diagnose_layers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | torch.Tensor],
    bits: int = 4,
    *,
    answers: Sequence[str] | None = None,
    answer_tokens: int = 16,
    group_size: int = 32,
    axis: str = "token",
    none_below: float = 0.01,
    concentration: float = 0.6,
    max_protected: int = 2,
) -> LayerDiagnosis:
    """Quantize one layer at a time and report per-layer damage, the pattern and a recommended spec.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (unused when prompts are already token-id tensors).
        prompts: prompt strings, or ``[1, n]`` token-id tensors.
        bits: the width to test every layer at (2, 3, 4 or 8).
        answers: reference answers to teacher-force (strings); by default the full cache's greedy answer.
        answer_tokens: length of the greedy reference answer.
        group_size, axis: quantization grouping of the tested layer (keys and values alike).
        none_below: a layer whose mean KL stays below this (nats) counts as undamaged.
        concentration: share of the total KL that the protected layers must carry to call it concentrated.
        max_protected: at most this many layers are proposed for protection.

    Returns:
        A :class:`LayerDiagnosis`; ``print(result)`` shows the table.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of (2, 3, 4, 8), got {bits!r}")
    if not prompts:
        raise ValueError("diagnose_layers needs at least one prompt")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"got {len(answers)} answers for {len(prompts)} prompts")
    if answer_tokens < 2 and answers is None:
        raise ValueError("answer_tokens must be at least 2: the first answer token comes from the prompt pass")
    if not 0 < concentration <= 1:
        raise ValueError(f"concentration must be in (0, 1], got {concentration}")
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    # validates group size, axis and head_dim before any forward pass
    MixedPrecisionCache(model, {0: bits, "default": 16}, group_size=group_size, key_axis=axis, value_axis=axis)
    device = next(model.parameters()).device

    kl_sum = [0.0] * num_layers
    agree_sum = [0.0] * num_layers
    positions = 0
    for i, prompt in enumerate(prompts):
        ids = _prompt_ids(tokenizer, prompt, device)
        if answers is not None:
            answer = tokenizer(answers[i], add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        else:
            answer = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=answer_tokens, do_sample=False,
                **cache_kwargs(model, DynamicCache(config=model.config)),
            )[:, ids.shape[1] :]
        if answer.shape[1] < 2:
            continue
        prefill = DynamicCache(config=model.config)
        model(ids, **cache_kwargs(model, prefill), use_cache=True)
        # copying the prompt's states is exact for plain layers; sliding-window layers keep only a window and
        # their own token count, so there the prompt is run again for every tested layer
        copy_prefill = all(type(layer) is DynamicLayer for layer in prefill.layers)
        # reference: full-precision logits after each answer token but the last, predicting the next one
        full = model(torch.cat([ids, answer[:, :-1]], dim=1)).logits[0, ids.shape[1] :].float()
        ref_logp = F.log_softmax(full, dim=-1)
        steps = answer.shape[1] - 1
        positions += steps
        for layer in range(num_layers):
            cache = MixedPrecisionCache(
                model, {layer: bits, "default": 16}, group_size=group_size, key_axis=axis, value_axis=axis
            )
            if copy_prefill:
                for idx, source in enumerate(prefill.layers):
                    cache.update(source.keys, source.values, idx)
            else:
                model(ids, **cache_kwargs(model, cache), use_cache=True)
            logits = []
            for t in range(steps):
                out = model(answer[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True)
                logits.append(out.logits[0, -1].float())
            logp = F.log_softmax(torch.stack(logits), dim=-1)
            kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1)
            kl_sum[layer] += float(kl.sum())
            agree_sum[layer] += float((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
    if positions == 0:
        raise ValueError("no prompt produced an answer of at least 2 tokens to measure damage on")
    damages = [LayerDamage(l, kl_sum[l] / positions, agree_sum[l] / positions) for l in range(num_layers)]
    pattern, protected, spec = classify([d.kl for d in damages], bits, none_below, concentration, max_protected)
    return LayerDiagnosis(bits, damages, pattern, protected, spec, positions)
