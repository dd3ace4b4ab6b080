"""The selection plan: how a layer's scores become the slots it keeps, the same for a whole prompt and for every
chunk of a chunked prefill.

Three choices compose (each written once):

* the **granularity**: ``"layer"`` (one slot set per row: scores averaged over the KV heads), ``"head"`` (one per
  KV head) or ``"global"`` (one for all layers: the per-layer head means averaged over layers, applied when the last
  compressed layer has been scored);
* the **budget allocator** (:mod:`~kvcache_plugins.selection.budget`): context tokens per layer and row
  (``uniform``, ``pyramid``) and, for ``adakv``, per head across the layer (ragged);
* :func:`~kvcache_plugins.selection.base.select_slots` / :meth:`AdaKV.keep` over the candidates and protected
  slots of :func:`~kvcache_plugins.selection.layout.slot_roles`.

A cut returns a :class:`Cut`: which layers it applies to and either the kept slot indices (``[B, H_s, S]``, ``-1``
unused, right-aligned) or, for a ragged allocator, a ``Bool [B, H, T]`` keep mask.

Positions chosen elsewhere (a scout's selection) enter as :class:`GivenPositions` (``plan.given``): the plan then
keeps those instead of scoring, for the prompt and for every chunk alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import context_budget, select_slots
from .budget import Budget
from .layout import PromptLayout


@dataclass
class Cut:
    """What to keep in ``layers``: ``slots`` ``LongTensor [B, H_s, S]`` or ``ragged`` ``Bool [B, H, T]``."""

    layers: list[int]
    slots: torch.Tensor | None = None
    ragged: torch.Tensor | None = None


class GivenPositions:
    """Positions chosen elsewhere, kept instead of scored (the contract a :class:`SelectionPlan` asks of them).

    ``hides``: whether the prefill also hides unselected context positions from later tokens (construction).
    """

    hides: bool = False

    def check_prompt(self, n: int, pad: torch.Tensor, rows: torch.Tensor | None) -> None:
        """``ValueError`` if the positions were not chosen for this ``n``-token prompt with left padding ``pad``
        ``[B]`` (``rows``: the prompt's keys or ids, batch first, telling generate()'s repeated rows)."""

    def bind(self, layout: PromptLayout) -> None:
        """The layout of the prompt the positions are applied to."""

    def keep(self, layer_number: int, positions: torch.Tensor, seen: int, chunked: bool) -> torch.Tensor:
        """``LongTensor [B, 1, S]``: which of the held slots at ``positions`` ``[B, T]`` (``-1`` unused) layer
        ``layer_number`` (its rank among the compressed layers) keeps, after ``seen`` tokens."""
        raise NotImplementedError

    def construction_mask(
        self, layer_number: int, mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
        held: torch.Tensor | None, seen: int, chunked: bool,
    ) -> torch.Tensor | None:
        """The attention mask with unselected positions hidden (``hides`` only); ``held`` ``[B, T]``: positions of
        the held slots (``None``: the keys are the prompt itself)."""
        return mask


class SelectionPlan:
    """The budgets of one prompt and the rule that turns scores into kept slots (see the module docstring).

    Args:
        granularity: ``"layer"``, ``"head"`` or ``"global"``.
        budget: the allocator.
        layers: indices of the compressed layers, in order.
    """

    def __init__(self, granularity: str, budget: Budget, layers: list[int]) -> None:
        self.granularity = granularity
        self.budget = budget
        self.layers = layers
        self.row_budget: torch.Tensor | None = None
        self.layer_budgets: torch.Tensor | None = None
        self._global_sum: torch.Tensor | None = None
        self._global_count = 0
        #: positions chosen elsewhere, kept instead of scored
        self.given: GivenPositions | None = None

    def start(self, layout: PromptLayout, retention: float | None, max_tokens: int | None, reserve=None) -> None:
        """Budgets of a new prompt: ``row_budget`` ``[B]`` context tokens per row (``ceil(r * |context|)`` or what
        ``max_tokens`` allows) and the allocator's ``layer_budgets`` ``[L, B]``. ``reserve`` ``LongTensor [B]``:
        context slots each row sets aside in every layer (a token kept outside the selection)."""
        self.row_budget = context_budget(layout, retention, max_tokens)
        self.layer_budgets = self.budget.layer_budgets(self.row_budget, layout.context_len, len(self.layers))
        if reserve is not None:
            self.layer_budgets = (self.layer_budgets - reserve.view(1, -1)).clamp(min=0)
        self._global_sum, self._global_count = None, 0

    def budget_of(self, layer_idx: int) -> torch.Tensor:
        """``LongTensor [B]``: context tokens ``layer_idx`` keeps per row."""
        return self.layer_budgets[self.layers.index(layer_idx)]

    def keeps_everything(self, layer_idx: int, layout: PromptLayout) -> bool:
        return bool((self.budget_of(layer_idx) >= layout.context_len).all())

    def given_cut(self, layer_idx: int, positions: torch.Tensor, seen: int, chunked: bool = False) -> Cut:
        """The cut of :attr:`given` positions for ``layer_idx`` over held slots at ``positions`` ``[B, T]``."""
        return Cut([layer_idx], slots=self.given.keep(self.layers.index(layer_idx), positions, seen, chunked))

    def cut(
        self, layer_idx: int, scores: torch.Tensor, heads: int, candidates: torch.Tensor, protected: torch.Tensor,
        final: bool = True,
    ) -> Cut | None:
        """The cut for ``layer_idx`` (``heads`` KV heads) from its scores ``[B, H_kv or 1, T]`` over slots
        classified as ``candidates`` /
        ``protected`` ``Bool [B, T]``; ``None`` while a global plan waits for the last layer. ``final=False`` (a
        chunk before the last) keeps a ragged allocator's heads at the uniform per-head budget, so that the memory
        stays bounded; its last cut allocates across heads."""
        budget = self.budget_of(layer_idx).to(scores.device)
        if self.granularity == "global":
            mean = scores.mean(1, keepdim=True)
            self._global_sum = mean if self._global_sum is None else self._global_sum + mean
            self._global_count += 1
            if layer_idx != self.layers[-1]:
                return None
            keep = select_slots(self._global_sum / self._global_count, candidates, protected, budget)
            self._global_sum, self._global_count = None, 0
            return Cut(list(self.layers), slots=keep)
        if self.granularity == "head":
            per_head = scores.expand(scores.shape[0], heads, scores.shape[2])
            if self.budget.ragged and final:
                return Cut([layer_idx], ragged=self.budget.keep(per_head, candidates, protected, budget))
            return Cut([layer_idx], slots=select_slots(per_head, candidates, protected, budget))
        return Cut([layer_idx], slots=select_slots(scores.mean(1, keepdim=True), candidates, protected, budget))
