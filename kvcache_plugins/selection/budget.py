"""Budget allocators: how many context tokens each layer (and head) keeps, given what every row may keep.

Scorers say how important each position is; an allocator says how many positions each layer / head gets; the
cache's layers say how the kept tokens are stored. Three allocators:

``uniform``
    Every compressed layer and every head keeps the row's budget ``k_b`` (see :func:`~.base.context_budget`).
``pyramid`` (PyramidKV, Cai et al., 2024)
    Budgets shrink linearly with depth at the same total. Of ``L`` compressed layers, layer rank ``i`` gets

        k_i = k_b * w_i,   w_i = w_max - i * (w_max - w_min) / (L - 1),   w_min = 1 / beta,  w_max = 2 - 1 / beta

    (so ``mean_i w_i = 1``), rounded so that the layers' budgets sum to ``L * k_b`` and clamped to the context; what
    a clamped layer cannot hold goes to the next deeper layers with room.
``adakv`` (Ada-KV, Feng et al., 2024), per layer and per KV head (``granularity="head"``)
    The layer's combined budget ``H * k_b`` goes to the highest scores across all heads, after each head first keeps
    its own best ``ceil(floor * k_b)`` (the safeguard), so heads keep different counts:

        keep(h, j) = rank_h(j) < ceil(floor * k_b)  or  rank_all(h, j) < H * k_b    (after boosting the safeguard)

    Scores must be comparable across heads (attention probabilities are; so are the query-free scores).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._checks import check_real

if TYPE_CHECKING:
    from ..persist.state import StateReader


@dataclass(frozen=True)
class Budget:
    """Uniform budgets (the base class: subclasses override what differs). Instances are immutable; their fields
    (the allocator's options) are checked when built: ``TypeError`` for a non-number, ``ValueError`` out of range."""

    name: ClassVar[str] = "uniform"
    #: the cache granularities the allocator works with
    granularities: ClassVar[tuple[str, ...]] = ("layer", "global", "head")
    #: heads keep different counts: the layer stores them ragged
    ragged: ClassVar[bool] = False

    def layer_budgets(self, budget: torch.Tensor, context_len: torch.Tensor, layers: int) -> torch.Tensor:
        """``LongTensor [L, B]``: context tokens each of ``layers`` compressed layers keeps per row."""
        return budget.view(1, -1).expand(layers, -1).clone()


@dataclass(frozen=True)
class Pyramid(Budget):
    """``beta``: ratio of the first layer's weight to the last one's is ``(2 * beta - 1)`` (kvpress: 20)."""

    name: ClassVar[str] = "pyramid"
    granularities: ClassVar[tuple[str, ...]] = ("layer", "head")
    beta: float = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", check_real("pyramid beta", self.beta, lo=1.0))

    def weights(self, layers: int) -> torch.Tensor:
        """``float64 [L]``: ``w_i``, decreasing with depth, mean 1."""
        if layers == 1:
            return torch.ones(1, dtype=torch.float64)
        lo, hi = 1.0 / self.beta, 2.0 - 1.0 / self.beta
        return hi - torch.arange(layers, dtype=torch.float64) * (hi - lo) / (layers - 1)

    def layer_budgets(self, budget: torch.Tensor, context_len: torch.Tensor, layers: int) -> torch.Tensor:
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), self.weights(layers).cumsum(0)])
        edges = torch.round(cumulative.view(-1, 1) * budget.double().view(1, -1)).long()  # [L + 1, B]
        out = edges[1:] - edges[:-1]
        for b in range(out.shape[1]):
            room = int(context_len[b])
            spill = 0
            for i in range(layers):
                want = int(out[i, b]) + spill
                out[i, b] = min(want, room)
                spill = want - int(out[i, b])
            for i in range(layers - 1, -1, -1):  # what the deepest layers could not hold goes back up
                take = min(spill, room - int(out[i, b]))
                out[i, b] += take
                spill -= take
        return out


@dataclass(frozen=True)
class AdaKV(Budget):
    """``floor``: fraction of the per-head budget every head keeps by its own ranking (kvpress: 0.2)."""

    name: ClassVar[str] = "adakv"
    granularities: ClassVar[tuple[str, ...]] = ("head",)
    ragged: ClassVar[bool] = True
    floor: float = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "floor", check_real("adakv floor", self.floor, lo=0.0, hi=1.0))

    def keep(
        self, scores: torch.Tensor, candidates: torch.Tensor, protected: torch.Tensor, budget: torch.Tensor
    ) -> torch.Tensor:
        """``Bool [B, H, n]``: protected slots plus each layer's ``H * budget[b]`` candidates chosen across heads.

        Args:
            scores: ``[B, H, n]``.
            candidates, protected: ``Bool [B, n]`` (disjoint).
            budget: ``LongTensor [B]`` per-head average budget.

        Ties across heads go to the earlier position, then the lower head, so equal scores spread over heads.
        """
        B, H, n = scores.shape
        device = scores.device
        cand = candidates.to(device).view(B, 1, n)
        budget = budget.to(device)
        masked = scores.float().masked_fill(~cand, float("-inf"))
        floor = torch.ceil(budget.double() * self.floor - 1e-9).long().view(B, 1, 1)
        own_rank = _ranks(masked)
        boosted = masked.masked_fill((own_rank < floor) & cand, float("inf"))
        across = _ranks(boosted.transpose(1, 2).reshape(B, n * H)).view(B, n, H).transpose(1, 2)
        keep = (across < H * budget.view(B, 1, 1)) & cand
        return keep | protected.to(device).view(B, 1, n)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim (0 = highest; ties: earlier first)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank


BUDGETS: dict[str, type[Budget]] = {cls.name: cls for cls in (Budget, AdaKV, Pyramid)}


def make_budget(budget: str | Budget) -> Budget:
    """An allocator from a name (``uniform``, ``adakv``, ``pyramid``) or an instance (returned as is).

    ``TypeError`` for anything else than a string or a :class:`Budget`, ``ValueError`` for an unknown name."""
    if isinstance(budget, Budget):
        return budget
    if not isinstance(budget, str):
        raise TypeError(
            f"budget must be one of {sorted(BUDGETS)} or a Budget instance, got {budget!r} ({type(budget).__name__})"
        )
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {sorted(BUDGETS)} or pass a Budget instance")
    return BUDGETS[budget]()


def budget_state(budget: Budget) -> dict[str, Any]:
    """``{"name": ..., "options": {field: number}}``: a built-in allocator as JSON (a saved cache's argument).

    ``TypeError`` for an allocator of another class (a subclass cannot be rebuilt from a file)."""
    cls = BUDGETS.get(budget.name)
    if type(budget) is not cls:
        raise TypeError(
            f"cannot save a cache with a {type(budget).__name__} budget: only the built-in allocators "
            f"{sorted(BUDGETS)} can be saved"
        )
    return {"name": budget.name, "options": {f.name: getattr(budget, f.name) for f in fields(budget)}}


def read_budget(state: StateReader) -> Budget:
    """The allocator :func:`budget_state` wrote, every option checked (``ValueError`` naming what is allowed)."""
    state.fields(["name", "options"])
    cls = BUDGETS[state.str("name", sorted(BUDGETS))]
    options = state.sub("options")
    names = [f.name for f in fields(cls)]
    options.fields(names)
    values = {name: options.float(name, -1e300, 1e300) for name in names}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise options.error(str(err)) from None


__all__ = ["AdaKV", "BUDGETS", "Budget", "Pyramid", "budget_state", "make_budget", "read_budget"]
