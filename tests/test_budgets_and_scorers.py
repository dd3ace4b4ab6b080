"""Issue 16: four more scorers (expected_attention, tova, keydiff, lagkv), SnapKV keeping its observation window,
and budget allocators (pyramid across layers, adakv across heads with ragged storage that really frees memory).

What each scorer keeps on constructed inputs; what each allocator hands out; and the masking oracle (eviction
equals the full cache with the evicted positions hidden) on the architecture matrix, sdpa and eager, left-padded."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHITECTURES, prompt_ids, tiny_model
from reference import VISIBILITY, oracle_model, reference_cache
from transformers import DynamicCache

from kvcache_plugins import CompressedCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.layers.ragged import RaggedLayer
from kvcache_plugins.selection import (
    TOVA,
    ExpectedAttention,
    KeyDiff,
    LagKV,
    PromptLayout,
    ScoreContext,
    SnapKV,
)
from kvcache_plugins.selection.budget import AdaKV, Pyramid, make_budget

ATTN = {arch: (("eager",) if arch == "gemma2" else ("sdpa", "eager")) for arch in ARCHITECTURES}
ARCH_ATTN = [(a, i) for a in ARCHITECTURES for i in ATTN[a]]
NEW_SCORERS = {"expected_attention": {}, "tova": {}, "keydiff": {}, "lagkv": {"lag": 4}}
QLENS = [4, 6, 5]


def _layout(n: int, pad=(0,), question=(0,), sinks=(0,)) -> PromptLayout:
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return PromptLayout(n, t(pad), t(question), t(sinks))


def _padded_batch(length: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    ids = prompt_ids(3, length)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[2, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _hide_evicted(cache: CompressedCache, prompt_len: int, total: int) -> None:
    """Point the oracle at what ``cache`` evicted, per layer and head (``-1`` slots hold nothing)."""
    VISIBILITY.__init__()
    VISIBILITY.prompt_len = prompt_len
    for idx in cache.compressed_layers:
        kept = cache.kept_positions(idx)
        keep = torch.zeros(*kept.shape[:2], total, dtype=torch.bool)
        b, h, s = (kept >= 0).nonzero(as_tuple=True)
        keep[b, h, kept[b, h, s]] = True
        keep[..., prompt_len:] = True
        VISIBILITY.hidden[idx] = ~keep


def _generate(model, cache, ids, mask, **kwargs):
    args = dict(do_sample=False, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    args.update(kwargs)
    return model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), **args)


def _assert_oracle(model, ids, mask, quant_reference=False, **cache_kwargs) -> CompressedCache:
    cache = CompressedCache(model, **cache_kwargs)
    ours = _generate(model, cache, ids, mask)
    _hide_evicted(cache, ids.shape[1], ours.sequences.shape[1])
    oracle = oracle_model(model)
    ref_cache = reference_cache(oracle, cache.layer_specs) if quant_reference else DynamicCache(config=oracle.config)
    ref = _generate(oracle, ref_cache, ids, mask)
    VISIBILITY.__init__()
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return cache


# ------------------------------------------------------------------------------------ what each scorer keeps


def test_tova_scores_by_the_newest_query_only():
    D = 8
    keys = torch.zeros(1, 1, 6, D)
    keys[0, 0, torch.arange(6), torch.arange(6)] = 1.0  # key j points along axis j
    queries = torch.zeros(1, 2, 6, D)
    queries[0, :, :5, 1] = 9.0  # earlier queries look at key 1
    queries[0, 0, 5, 3] = 9.0  # the newest query looks at key 3 (head 0) and key 4 (head 1)
    queries[0, 1, 5, 4] = 9.0
    ctx = ScoreContext(0, keys, queries, 1.0, None, _layout(6))
    scores = TOVA().score(ctx)[0, 0]
    p = torch.softmax(torch.tensor([0.0, 0, 0, 9, 0, 0]), 0)
    torch.testing.assert_close(scores, (p + p.roll(1)) / 2)
    assert scores.topk(2).indices.sort().values.tolist() == [3, 4]


def test_keydiff_keeps_keys_that_point_away_from_the_rest():
    noise = torch.randn(1, 1, 8, 2, generator=torch.Generator().manual_seed(0))
    keys = torch.tensor([1.0, 0.0]).repeat(1, 1, 8, 1) + 0.01 * noise
    keys[0, 0, 5] = torch.tensor([0.0, 3.0])  # orthogonal to the common direction
    keys[0, 0, 2] = torch.tensor([-1.0, 0.0])  # opposite: the most different
    keys[0, 0, 0] = torch.tensor([0.0, -50.0])  # padding: must not move the anchor
    ctx = ScoreContext(0, keys, None, 1.0, None, _layout(8, pad=[1]))
    scores = KeyDiff().score(ctx)[0, 0]
    assert scores[1:].argsort(descending=True)[:2].add(1).tolist() == [2, 5]
    anchor = torch.nn.functional.normalize(keys[0, 0, 1:], dim=-1).mean(0)
    expected = -torch.nn.functional.cosine_similarity(keys[0, 0], anchor.expand(8, 2), dim=-1)
    torch.testing.assert_close(scores, expected)


def test_lagkv_normalises_by_the_next_chunk_and_keeps_the_last_chunks():
    lag, D = 4, 6
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 1, 16, D, generator=g)
    values = torch.randn(1, 1, 16, D, generator=g)
    keys[0, 0, 7] *= 20  # an outlier in the first chunk (padding 1, sinks 2 | 3..6 | 7..10 | 11..14 | 15)
    ctx = ScoreContext(0, keys, None, 1.0, None, _layout(16, pad=[1], sinks=[2]), values=values)

    def chunk_score(x, i):
        cur, nxt = x[0, 0, 3 + i * lag : 3 + (i + 1) * lag], x[0, 0, 3 + (i + 1) * lag : 3 + (i + 2) * lag]
        lo, hi = nxt.min(0).values, nxt.max(0).values
        return ((cur - lo) / (hi - lo)).std(-1).softmax(0)

    raw = torch.cat([(chunk_score(keys, i) + chunk_score(values, i)) / 2 for i in range(2)])
    cross = LagKV(lag=lag, cross_chunk=True).score(ctx)[0, 0]
    torch.testing.assert_close(cross[3:11], raw)
    assert int(cross[7:11].argmax()) == 0  # the outlier stands out in its chunk
    ranked = LagKV(lag=lag).score(ctx)[0, 0]
    assert sorted(ranked[3:7].tolist()) == sorted(ranked[7:11].tolist()) == [0, 0.25, 0.5, 0.75]
    assert torch.equal(ranked[3:11].view(2, 4).argsort(-1), raw.view(2, 4).argsort(-1))
    kept_last = 2 + torch.arange(16) / 16  # no following chunk (and padding, sinks): kept first, newest highest
    torch.testing.assert_close(ranked[11:], kept_last[11:])
    short = LagKV(lag=8).score(ctx)[0, 0]  # shorter than two chunks: recency
    torch.testing.assert_close(short, kept_last)
    assert LagKV.default_sinks == 4
    with pytest.raises(ValueError, match="lag must be an int >= 2"):
        LagKV(lag=1)


def test_expected_attention_is_the_gaussian_expectation_times_the_value_norm():
    D = 4
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 1, 10, D, generator=g)
    values = torch.randn(1, 1, 10, D, generator=g)
    queries = torch.randn(1, 2, 10, D, generator=g)
    ctx = ScoreContext(0, keys, queries, 0.5, None, _layout(10), values=values)
    scores = ExpectedAttention(window=4).score(ctx)[0, 0]
    expected = torch.zeros(10)
    for head in range(2):
        q = queries[0, head, -4:]
        mu = q.mean(0)
        sigma = (q - mu).T @ (q - mu) / 4
        k = keys[0, 0]
        z = 0.5 * k @ mu + 0.5 * 0.25 * torch.einsum("nd,de,ne->n", k, sigma, k)
        expected += z.softmax(0) / 2
    torch.testing.assert_close(scores, expected * values[0, 0].norm(dim=-1))


def test_expected_attention_prefers_keys_along_the_queries_spread():
    D = 2
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).view(1, 1, 3, D)
    values = torch.ones(1, 1, 3, D)
    queries = torch.zeros(1, 1, 3, D)
    queries[0, 0, :, 1] = torch.tensor([-3.0, 3.0, 0.0])  # zero mean; all the variance along axis 1
    ctx = ScoreContext(0, keys, queries, 1.0, None, _layout(3), values=values)
    scores = ExpectedAttention(window=3).score(ctx)[0, 0]
    assert int(scores.argmax()) == 1  # a key along the spread expects the most attention
    flat = ExpectedAttention(window=3, covariance=False).score(ctx)[0, 0]
    torch.testing.assert_close(flat, torch.full((3,), 1 / 3) * values[0, 0].norm(dim=-1))


def test_snapkv_always_keeps_its_observation_window():
    model = tiny_model("llama", layers=2)
    ids = prompt_ids(2, 40)
    cache = CompressedCache(model, selector="snapkv", retention=0.5, question_len=2, window=8)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    for idx in cache.compressed_layers:
        kept = set(cache.kept_positions(idx)[0, 0].tolist())
        assert set(range(32, 40)) <= kept  # the 8-token window (question included)
    layout = _layout(12, pad=[3], question=[1])
    ctx = ScoreContext(0, torch.randn(1, 1, 12, 4), torch.randn(1, 1, 12, 4), 0.5, None, layout)
    scores = SnapKV(window=4, kernel=3).score(ctx)[0, 0]
    assert scores[8:].tolist() == sorted(scores[8:].tolist()) and bool((scores[8:] > 2).all())
    assert bool((scores[:8] <= 1).all())


# -------------------------------------------------------------------------------------------- allocators


def test_pyramid_budgets_shrink_with_depth_at_the_same_total():
    p = Pyramid()
    budgets = p.layer_budgets(torch.tensor([10, 7]), torch.tensor([100, 100]), 5)
    assert budgets.sum(0).tolist() == [50, 35]
    assert all(budgets[i, 0] >= budgets[i + 1, 0] for i in range(4))
    torch.testing.assert_close(p.weights(5).mean(), torch.tensor(1.0, dtype=torch.float64))
    assert ((budgets[:, 0] - 10 * p.weights(5)).abs() <= 1).all()  # 19.5, 14.75, 10, 5.25, 0.5 rounded, total kept
    clamped = p.layer_budgets(torch.tensor([8]), torch.tensor([10]), 4)  # the first layers would want 15, 11
    assert clamped.sum().item() == 32 and int(clamped.max()) <= 10
    assert p.layer_budgets(torch.tensor([6]), torch.tensor([9]), 1).tolist() == [[6]]
    with pytest.raises(ValueError, match=r"pyramid beta must be >= 1 \(a finite number\), got 0.5"):
        Pyramid(beta=0.5)


def test_adakv_gives_the_layer_budget_to_the_best_scores_across_heads_with_a_floor():
    scores = torch.tensor([[[9.0, 8, 7, 6, 5, 4], [0.1, 0.2, 0.3, 0.0, 0.0, 0.0]]])  # head 0 dominates
    candidates = torch.tensor([[False, True, True, True, True, True]])
    protected = torch.tensor([[True, False, False, False, False, False]])
    keep = AdaKV(floor=0.5).keep(scores, candidates, protected, torch.tensor([2]))
    # 2 heads x 2 = 4 candidates in all; each head first keeps its best ceil(0.5 * 2) = 1
    assert keep[0, 0].tolist() == [True, True, True, True, False, False]
    assert keep[0, 1].tolist() == [True, False, True, False, False, False]
    assert int((keep & candidates.unsqueeze(1)).sum()) == 4
    no_floor = AdaKV(floor=0.0).keep(scores, candidates, protected, torch.tensor([2]))
    assert no_floor[0, 1].tolist() == [True] + [False] * 5
    ties = AdaKV(floor=0.0).keep(torch.zeros(1, 2, 6), candidates, protected, torch.tensor([2]))
    assert (ties & candidates.unsqueeze(1)).sum(-1).tolist() == [[2, 2]]  # equal scores spread over heads


@pytest.mark.parametrize(
    "text, granularity, budget",
    [("snapkv:0.25:adakv", "head", "adakv"), ("keydiff:0.25:pyramid", "layer", "pyramid"),
     ("q2c:0.5:head:pyramid", "head", "pyramid"), ("tova:0.5", "layer", "uniform")],
)
def test_specs_name_budgets(text, granularity, budget):
    from kvcache_plugins.specs import make_cache, parse_spec

    spec = parse_spec(text)
    assert (spec.granularity, spec.budget) == (granularity, budget)
    cache = make_cache(spec, tiny_model("llama"), question_len=2)
    assert (cache.granularity, cache.budget.name) == (granularity, budget)


def test_budget_arguments_are_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"unknown budget 'ada'; choose one of \['adakv', 'pyramid', 'uniform'\]"):
        CompressedCache(model, selector="random", retention=0.5, budget="ada")
    with pytest.raises(ValueError, match=r"budget 'adakv' works with granularity 'head', got 'layer'"):
        CompressedCache(model, selector="random", retention=0.5, budget="adakv")
    with pytest.raises(ValueError, match=r"budget 'pyramid' works with granularity 'layer' or 'head', got 'global'"):
        CompressedCache(model, selector="random", retention=0.5, budget="pyramid", granularity="global")
    with pytest.raises(ValueError, match="needs the model"):
        CompressedCache(config=model.config, selector="random", retention=0.5, budget="adakv", granularity="head")
    with pytest.raises(ValueError, match="no decode_policy"):
        CompressedCache(
            model, selector="random", max_tokens=12, budget="adakv", granularity="head", decode_policy="h2o"
        )
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1\]"):
        AdaKV(floor=1.5)
    assert make_budget("uniform").name == "uniform"


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda: make_budget(None), TypeError, r"budget must be one of \['adakv', 'pyramid', 'uniform'\] or a Budget"),
        (lambda: make_budget(3), TypeError, r"budget must be one of .* got 3 \(int\)"),
        (lambda: make_budget("AdaKV"), ValueError, r"unknown budget 'AdaKV'; choose one of"),
        (lambda: make_budget(" adakv"), ValueError, r"unknown budget ' adakv'"),
        (lambda: AdaKV(floor=True), TypeError, r"adakv floor must be in \[0, 1\] \(a number\), got True \(bool\)"),
        (lambda: AdaKV(floor="0.2"), TypeError, r"adakv floor must be in \[0, 1\] \(a number\)"),
        (lambda: AdaKV(floor=float("nan")), ValueError, r"adakv floor must be in \[0, 1\] \(a finite number\)"),
        (lambda: AdaKV(floor=-0.1), ValueError, r"adakv floor must be in \[0, 1\]"),
        (lambda: AdaKV(floor=torch.tensor(0.2)), TypeError, r"adakv floor must be in \[0, 1\] \(a number\)"),
        (lambda: Pyramid(beta=float("inf")), ValueError, r"pyramid beta must be >= 1 \(a finite number\)"),
        (lambda: Pyramid(beta=False), TypeError, r"pyramid beta must be >= 1 \(a number\)"),
        (lambda: Pyramid(beta=None), TypeError, r"pyramid beta must be >= 1 \(a number\)"),
    ],
)
def test_budget_names_and_options_are_strict(make, error, message):
    """Issue 14's strict arguments for ``budget=`` and the allocators' options: types raise ``TypeError``, values
    ``ValueError``, each naming what is allowed."""
    with pytest.raises(error, match=message):
        make()


def test_budget_options_are_stored_as_floats_and_frozen():
    import dataclasses

    import numpy as np

    b = Pyramid(beta=np.float32(4))
    assert type(b.beta) is float and b.beta == 4.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.beta = 0.5
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"budget must be one of"):
        CompressedCache(model, selector="random", retention=0.5, budget=["adakv"], granularity="head")


# ------------------------------------------------------------------------------------------ masking oracle


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
@pytest.mark.parametrize("selector", sorted(NEW_SCORERS))
def test_new_scorers_evict_exactly_what_masking_hides(arch, attn, selector):
    model = tiny_model(arch, attn)
    ids, mask = _padded_batch()
    for granularity in ("layer", "global", "head"):
        cache = _assert_oracle(
            model, ids, mask, selector=selector, retention=0.4, question_len=QLENS, granularity=granularity,
            **NEW_SCORERS[selector],
        )
        held = (cache.kept_positions()[:, 0] >= 0).sum(-1) - 5  # minus the generated tokens (the last is not stored)
        sinks = cache.sink_tokens  # lagkv protects 4 by default
        for row, (real, q) in enumerate(zip([23, 30, 27], QLENS)):
            assert int(held[row]) == q + sinks + math.ceil(0.4 * (real - q - sinks))


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
@pytest.mark.parametrize("budget,granularity", [("adakv", "head"), ("pyramid", "layer"), ("pyramid", "head")])
def test_budgets_evict_exactly_what_masking_hides(arch, attn, budget, granularity):
    model = tiny_model(arch, attn, layers=4)
    ids, mask = _padded_batch()
    full_layers = [i for i, t in enumerate(getattr(model.config, "layer_types", None) or ["full_attention"] * 4)
                   if t == "full_attention"]
    for selector in ("snapkv", "keydiff"):
        cache = _assert_oracle(
            model, ids, mask, selector=selector, retention=0.4, question_len=QLENS, budget=budget,
            granularity=granularity,
        )
        assert cache.compressed_layers == full_layers
        context = torch.tensor([23, 30, 27]) - torch.tensor(QLENS)
        per_row = torch.stack([
            ((cache.kept_positions(i) >= 0) & (cache.kept_positions(i) < 30)).sum(-1) for i in cache.compressed_layers
        ])  # [L, B, H_s] prompt tokens kept
        budgets = Pyramid().layer_budgets(torch.ceil(0.4 * context).long(), context, len(full_layers))
        if budget == "pyramid":
            assert torch.equal(per_row[:, :, 0], budgets + torch.tensor(QLENS))
        else:  # adakv: each layer keeps H times the per-head budget in all, split unevenly over heads
            H = per_row.shape[-1]
            expected = H * (torch.ceil(0.4 * context).long() + torch.tensor(QLENS))
            assert bool((per_row.sum(-1) == expected).all())


# ----------------------------------------------------------------------------------- ragged storage (adakv)


def _adakv_cache(model, ids, mask=None, **kwargs) -> CompressedCache:
    cache = CompressedCache(model, selector="q2c", retention=0.25, question_len=4, budget="adakv", granularity="head",
                            **kwargs)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    return cache


def test_adakv_holds_exactly_the_kept_tokens_of_each_head():
    model = tiny_model("llama", layers=3)
    ids = prompt_ids(2, 64)
    cache = _adakv_cache(model, ids)
    kept_tokens = 0
    for idx in cache.compressed_layers:
        layer = cache.layers[idx]
        assert isinstance(layer, RaggedLayer) and layer.pending is None
        counts = (cache.kept_positions(idx) >= 0).sum(-1)  # [B, H]
        assert torch.equal(counts, layer.counts)
        assert layer.flat_keys.shape == (1, 1, int(counts.sum()), 16)  # no head padded to the largest
        kept_tokens += int(counts.sum())
    assert len({tuple(cache.layers[i].counts.flatten().tolist()) for i in cache.compressed_layers}) > 1 or bool(
        (cache.layers[0].counts != cache.layers[0].counts[0, 0]).any()
    )  # heads (or layers) really keep different counts
    kept_bytes = kept_tokens * 2 * 16 * 4  # keys and values, fp32
    fp = cache.memory_footprint()
    assert fp.full_precision == kept_bytes
    assert kept_bytes <= fp.total <= 1.1 * kept_bytes
    assert fp.indices == kept_tokens * 4 + 3 * 2 * 2 * 8  # int32 position per token, int64 count per head


def test_adakv_with_quantization_equals_the_masked_quantized_reference():
    model = tiny_model("qwen2", layers=2)
    ids, mask = _padded_batch()
    cache = _assert_oracle(
        model, ids, mask, quant_reference=True, selector="expected_attention", retention=0.4, question_len=QLENS,
        budget="adakv", granularity="head", quant="int4", group_size=8,
    )
    fp = cache.memory_footprint()
    assert fp.codes > 0 and fp.full_precision == 0


def test_adakv_generation_modes_and_crop():
    model = tiny_model("qwen2")
    kw = dict(selector="snapkv", retention=0.5, question_len=6, budget="adakv", granularity="head", window=4)
    ids = prompt_ids(2, 24)
    mask = torch.ones_like(ids)
    cache = CompressedCache(model, **kw)
    ours = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), num_beams=3, num_return_sequences=2,
                          max_new_tokens=5, do_sample=False)
    _hide_evicted(cache, 24, ours.shape[1])
    oracle = oracle_model(model)
    ref = oracle.generate(ids, attention_mask=mask, **cache_kwargs(oracle, DynamicCache(config=oracle.config)),
                          num_beams=3, num_return_sequences=2, max_new_tokens=5, do_sample=False)
    VISIBILITY.__init__()
    assert torch.equal(ours, ref)
    cache = CompressedCache(model, **kw)
    with torch.no_grad():
        model(ids[:1], **cache_kwargs(model, cache))
        model(ids[:1, :3], **cache_kwargs(model, cache))
    cache.crop(-5)  # the 3 generated tokens and 2 of the question span
    assert cache.get_seq_length() == 22
    layer = cache.layers[0]
    assert int(layer.flat_positions.max()) == 21 and layer.generated == 0
    with pytest.raises(ValueError, match="not all stored in every head"):
        cache.crop(-10)


def test_adakv_save_and_load_round_trip(tmp_path):
    model = tiny_model("llama")
    ids = prompt_ids(1, 40)
    cache = _adakv_cache(model, ids, quant="int8", group_size=8)
    path = tmp_path / "c.kvc"
    cache.save(path)
    from kvcache_plugins import load_cache

    loaded = load_cache(path, model)
    assert loaded.budget.name == "adakv"
    for idx in cache.compressed_layers:
        assert torch.equal(loaded.kept_positions(idx), cache.kept_positions(idx))
    assert loaded.memory_footprint().total == cache.memory_footprint().total
    forked = cache.fork()
    step = prompt_ids(1, 1, seed=5)
    with torch.no_grad():
        a = model(step, **cache_kwargs(model, cache)).logits
        b = model(step, **cache_kwargs(model, loaded)).logits
        c = model(step, **cache_kwargs(model, forked)).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    assert forked.layers[0].flat_keys.codes.data_ptr() != cache.layers[0].flat_keys.codes.data_ptr()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_scout_hands_over_pyramid_budgets_per_layer(attn):
    from conftest import make_tokenizer

    from kvcache_plugins import Scout, ScoutMaskedCache

    tok = make_tokenizer()
    scout, large = tiny_model("qwen2", layers=3, seed=1), tiny_model("qwen2", attn, layers=3, hidden=128, seed=2)
    ids, mask = _padded_batch()
    selection = Scout(scout, tok, "keydiff", 0.4, granularity="layer", budget="pyramid").select(
        ids, mask, question_len=QLENS
    )
    sizes = [len(selection.layer_positions[layer][1]) for layer in range(3)]
    assert sizes[0] > sizes[1] > sizes[2] and sum(sizes) == 3 * math.ceil(0.4 * 24)  # row 1: 24 context tokens
    cache = ScoutMaskedCache(selection, large, tokenizer=tok)
    ours = _generate(large, cache, ids, mask)
    _hide_evicted(cache, ids.shape[1], ours.sequences.shape[1])
    oracle = oracle_model(large)
    ref = _generate(oracle, DynamicCache(config=oracle.config), ids, mask)
    VISIBILITY.__init__()
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_pyramid_layers_that_keep_everything_still_hide_left_padding():
    """High retention: the first layers' pyramid budgets cover their whole context (nothing evicted, padding slots
    stored) while deeper layers evict; every layer must still hide the padding."""
    model = tiny_model("llama", "eager", layers=4)
    ids, mask = _padded_batch()
    cache = _assert_oracle(model, ids, mask, selector="keydiff", retention=0.7, question_len=QLENS, budget="pyramid")
    assert cache.layers[0].valid_slots() is None and cache.layers[3].valid_slots() is not None


def test_ragged_layer_reads_like_a_dynamic_layer():
    """``layers[i].keys`` / ``.values`` of a ragged (adakv) layer: the padded view ``[B, H, C + T, D]`` whose slot
    ``s`` of head ``h`` holds the full cache's state at ``kept_positions()[b, h, s]`` and zeros where that is -1."""
    model = tiny_model("llama", layers=2)
    torch.manual_seed(11)
    ids = torch.randint(3, 90, (2, 120))
    cache = CompressedCache(model, selector="snapkv", retention=0.2, question_len=4, granularity="head",
                            budget="adakv", window=4)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
        model(ids, **cache_kwargs(model, full))
    for i in cache.compressed_layers:
        layer = cache.layers[i]
        pos = cache.kept_positions(i)
        assert layer.ragged and layer.keys.shape[:3] == pos.shape
        b, h, s = (pos >= 0).nonzero(as_tuple=True)
        for mine, ref in ((layer.keys, full.layers[i].keys), (layer.values, full.layers[i].values)):
            assert torch.equal(mine[b, h, s], ref[b, h, pos[b, h, s]])
            assert bool((mine[pos < 0] == 0).all())
    assert any(bool((cache.kept_positions(i) < 0).any()) for i in cache.compressed_layers)  # heads differ
