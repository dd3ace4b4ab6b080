"""AdaKV's allocation rule (Feng et al., 2024; :mod:`kvcache_plugins.selection.budget`), stated directly.

Per row ``b`` of a layer with ``H`` KV heads and per-head budget ``k_b``, among the context candidates:

* every head keeps at least its safeguard, its own best ``f_b = ceil(floor * k_b)`` positions (exact ceiling:
  ``0.1 * 30`` is 3, not 4, and ``0.3 * 5 = 1.5`` is 2, not 1);
* the heads together keep exactly ``H * k_b`` candidates: the safeguards plus the best remaining scores across
  all heads;
* protected positions are kept in every head, and nothing else.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from conftest import prompt_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_plugins import CompressedCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.selection import Selector
from kvcache_plugins.selection.budget import AdaKV

#: floors as exact fractions: ``floor * k_b`` is often not an integer, so truncation and the ceiling differ
FLOORS = [Fraction(a, b) for b in (3, 4, 5, 7, 10) for a in range(0, b + 1)]


def _by_hand(scores: torch.Tensor, cand: list[bool], k: int, f: int) -> list[list[bool]]:
    """One row: ``scores [H, n]`` (distinct), candidates, budget ``k``, safeguard ``f`` -> kept candidates per head."""
    H, n = scores.shape
    slots = [j for j in range(n) if cand[j]]
    keep = [[False] * n for _ in range(H)]
    for h in range(H):
        for j in sorted(slots, key=lambda j: -float(scores[h, j]))[:f]:
            keep[h][j] = True
    rest = sorted(((h, j) for h in range(H) for j in slots if not keep[h][j]), key=lambda hj: -float(scores[hj]))
    for h, j in rest[: max(0, H * k - sum(map(sum, keep)))]:
        keep[h][j] = True
    return keep


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    heads=st.integers(1, 4), n=st.integers(2, 24), floor=st.sampled_from(FLOORS), data=st.data(),
)
def test_adakv_keep_follows_the_rule(heads, n, floor, data):
    B = 2
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    scores = torch.randperm(B * heads * n, generator=gen).float().view(B, heads, n)  # distinct: one right answer
    cand = torch.zeros(B, n, dtype=torch.bool)
    prot = torch.zeros(B, n, dtype=torch.bool)
    budgets = []
    for b in range(B):
        kinds = data.draw(st.lists(st.sampled_from("cpx"), min_size=n, max_size=n), label=f"row {b}")
        cand[b] = torch.tensor([c == "c" for c in kinds])
        prot[b] = torch.tensor([c == "p" for c in kinds])
        budgets.append(data.draw(st.integers(0, int(cand[b].sum())), label=f"budget {b}"))
    keep = AdaKV(floor=float(floor)).keep(scores, cand, prot, torch.tensor(budgets))
    assert keep.shape == (B, heads, n) and keep.dtype == torch.bool
    for b in range(B):
        k, c = budgets[b], int(cand[b].sum())
        f = math.ceil(floor * k)
        got = keep[b] & cand[b]
        assert bool((got.sum(-1) >= min(f, c)).all()), (got.sum(-1).tolist(), f)
        assert int(got.sum()) == heads * k
        assert bool(keep[b][:, prot[b]].all()) and not bool((keep[b] & ~cand[b] & ~prot[b]).any())
        assert got.tolist() == _by_hand(scores[b], cand[b].tolist(), k, f)


@pytest.mark.parametrize(
    "floor,k,f", [(0.1, 30, 3), (0.3, 5, 2), (0.2, 7, 2), (0.7, 10, 7), (0.25, 1, 1), (1 - 0.7, 10, 3), (0.5, 0, 0)]
)
def test_a_dominated_head_keeps_exactly_its_ceiling_floor(floor, k, f):
    """Head 0 outscores head 1 everywhere: head 1 keeps exactly ``ceil(floor * k)``, head 0 the rest of ``2 k``.

    A floor written as ``1 - 0.7`` (0.30000000000000004 in binary) still means 0.3: 3 of 10, not 4 (as retentions,
    :func:`~kvcache_plugins.selection.base.context_budget`)."""
    n = 2 * k + 4
    scores = torch.stack([torch.arange(n) + 1000.0, torch.arange(n) * 1.0]).unsqueeze(0)
    cand = torch.ones(1, n, dtype=torch.bool)
    keep = AdaKV(floor=floor).keep(scores, cand, torch.zeros_like(cand), torch.tensor([k]))
    assert keep.sum(-1).tolist() == [[2 * k - f, f]]
    assert keep[0, 1].nonzero().flatten().tolist() == list(range(n - f, n))  # head 1's own best


class HeadZeroFirst(Selector):
    """Query-free scores over ``[B, H, n]``: every position of head 0 above every position of any other head."""

    name = "head_zero_first"
    needs_queries = False

    def score(self, ctx):
        B, H, n, _ = ctx.keys.shape
        pos = torch.arange(n, dtype=torch.float32).view(1, 1, n) / n
        lead = (torch.arange(H) == 0).float().view(1, H, 1) * 10
        return (pos + lead).expand(B, H, n).contiguous()


@pytest.mark.parametrize("floor,retention,n", [(0.2, 0.25, 30), (0.1, 0.5, 62), (0.3, 0.2, 27)])
def test_compressed_cache_adakv_counts_follow_the_floor_and_the_layer_budget(floor, retention, n):
    """Through the cache: per (row, head) kept context counts are at least ``ceil(floor * k_b)`` and sum over heads
    to ``H * k_b`` with ``k_b = ceil(r * |context|)``; a dominated head keeps exactly the floor."""
    model = tiny_model("qwen2", layers=2)
    q, pads = 2, [0, 5]
    ids = prompt_ids(2, n, seed=n)
    mask = torch.ones_like(ids)
    mask[1, : pads[1]] = 0
    cache = CompressedCache(
        model, selector=HeadZeroFirst(), retention=retention, question_len=q, sink_tokens=0, budget=AdaKV(floor),
        granularity="head",
    )
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    H = model.config.num_key_value_heads
    for idx in cache.compressed_layers:
        counts = cache.layers[idx].counts - q  # [B, H] context tokens kept (the question is always kept)
        kept = cache.kept_positions(idx)
        for row, pad in enumerate(pads):
            context = n - pad - q
            k = math.ceil(Fraction(str(retention)) * context)
            f = math.ceil(Fraction(str(floor)) * k)
            assert int(counts[row].sum()) == H * k
            assert counts[row].tolist() == [H * k - (H - 1) * f] + [f] * (H - 1)
            real = kept[row][kept[row] >= 0]
            assert bool((real >= pad).all())  # padding is never kept
