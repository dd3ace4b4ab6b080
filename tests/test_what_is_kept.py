"""What each selector and decode policy keeps, on inputs small enough to know the answer by hand.

The masking oracle (test_compressed_cache.py) proves that evicting equals masking the evicted positions; these tests
prove the right positions were evicted. Expected sets are written out, never read back from the cache.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import prompt_ids, tiny_config, tiny_model

from kvcache_plugins import CacheBytes, CompressedCache, cache_kwargs
from kvcache_plugins.selection import PromptLayout, ScoreContext, make_selector, select
from kvcache_plugins.selection.eviction import decode_attention


def _feed(cache: CompressedCache, keys: torch.Tensor) -> None:
    """Hand every layer the same prompt keys (values: zeros) as a forward pass would, without a model."""
    for idx in range(len(cache.layers)):
        cache.update(keys, torch.zeros_like(keys), idx)


def _kept(cache: CompressedCache, layer: int | None = None) -> list[int]:
    return cache.kept_positions(layer)[0, 0].tolist()


def _layout(n: int, question: int, sinks: int = 0) -> PromptLayout:
    zero = torch.zeros(1, dtype=torch.long)
    return PromptLayout(n, zero, torch.tensor([question]), torch.tensor([sinks]))


# ------------------------------------------------------------------------------------------ prompt selectors


def test_knorm_keeps_the_smallest_key_norms():
    cfg = tiny_config("llama", layers=1)
    n, question = 12, 2
    norms = torch.tensor([5.0, 1.0, 9.0, 0.5, 7.0, 3.0, 8.0, 2.0, 6.0, 4.0, 9.5, 9.5])
    keys = torch.ones(1, 2, n, 16) / 4.0 * norms.view(1, 1, n, 1)  # ||k_j|| = norms[j]
    cache = CompressedCache(config=cfg, selector="knorm", retention=0.4, question_len=question)
    _feed(cache, keys)
    # context 0..9 (10 tokens), ceil(0.4 * 10) = 4 kept: the norms 0.5, 1, 2, 3 at positions 3, 1, 7, 5
    assert _kept(cache) == [1, 3, 5, 7, 10, 11]


def test_streaming_keeps_four_sinks_by_default_and_the_newest_context():
    cfg = tiny_config("llama", layers=1)
    n, question = 24, 3
    cache = CompressedCache(config=cfg, selector="streaming", retention=0.25, question_len=question)
    _feed(cache, torch.randn(1, 2, n, 16))
    # 4 sinks, context 4..20 (17 tokens), ceil(0.25 * 17) = 5 newest of it, the question 21..23
    assert _kept(cache) == [0, 1, 2, 3, 16, 17, 18, 19, 20, 21, 22, 23]
    explicit = CompressedCache(config=cfg, selector="streaming", retention=0.25, question_len=question, sink_tokens=1)
    _feed(explicit, torch.randn(1, 2, n, 16))
    assert _kept(explicit) == [0, 16, 17, 18, 19, 20, 21, 22, 23]  # ceil(0.25 * 20) = 5


def test_random_keeps_the_budget_reproducibly():
    cfg = tiny_config("llama", layers=2)
    n, question = 40, 4

    def kept(seed):
        cache = CompressedCache(config=cfg, selector="random", retention=0.3, question_len=question, seed=seed)
        _feed(cache, torch.randn(1, 2, n, 16))
        return [_kept(cache, layer) for layer in (0, 1)]

    a, b, c = kept(0), kept(0), kept(1)
    assert a == b and a != c and a[0] != a[1]  # seeded per (seed, layer)
    for layer in a:
        context = [p for p in layer if p < n - question]
        assert len(context) == math.ceil(0.3 * (n - question)) and layer[-question:] == list(range(36, 40))


def _attention_pull(n: int, target: int, strength: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys where every query attends almost only to ``target`` (plus a weak random background)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, n, 8, generator=g) * 0.1
    queries = torch.randn(1, 2, n, 8, generator=g) * 0.1
    keys[0, 0, target, 0] = strength
    queries[0, :, :, 0] = strength
    return queries, keys


@pytest.mark.parametrize(
    "selector, options, budget, expected",
    [
        ("q2c", {}, 1, [9]),
        ("h2o", {}, 1, [9]),
        # snapkv pools its scores over 5 neighbours: the attended key keeps its neighbourhood (window = question)
        ("snapkv", {"window": 4}, 5, [7, 8, 9, 10, 11]),
        ("snapkv", {"window": 4, "kernel": 1}, 1, [9]),
    ],
)
def test_query_aware_selectors_keep_the_attended_key(selector, options, budget, expected):
    n, question = 32, 4
    queries, keys = _attention_pull(n, target=9)
    layout = _layout(n, question)
    ctx = ScoreContext(0, keys, queries, 1.0, None, layout)
    scores = make_selector(selector, **options).score(ctx)
    kept = select(scores, layout, torch.tensor([budget]))[0, 0].tolist()
    assert kept == expected + [28, 29, 30, 31]


def test_q2c_scores_by_the_question_only():
    # the context queries look at position 5, the question's at position 20: q2c keeps 20, h2o (every query) keeps 5
    n, question = 32, 4
    keys = torch.zeros(1, 1, n, 8)
    keys[0, 0, 5, 0] = keys[0, 0, 20, 1] = 6.0
    queries = torch.zeros(1, 2, n, 8)
    queries[0, :, : n - question, 0] = 6.0
    queries[0, :, n - question :, 1] = 6.0
    layout = _layout(n, question)
    ctx = ScoreContext(0, keys, queries, 1.0, None, layout)
    q2c = select(make_selector("q2c").score(ctx), layout, torch.tensor([1]))[0, 0].tolist()
    h2o = select(make_selector("h2o").score(ctx), layout, torch.tensor([1]))[0, 0].tolist()
    assert q2c == [20, 28, 29, 30, 31] and h2o == [5, 28, 29, 30, 31]


# ------------------------------------------------------------------------------------------- decode policies


def test_h2o_decode_policy_accumulates_attention_over_steps():
    model = tiny_model("llama", layers=1)
    ids = prompt_ids(1, 12)
    cache = CompressedCache(model, selector="random", retention=1.0, max_tokens=40, question_len=2,
                            decode_policy="h2o")
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    layer = cache.layers[0]
    S = layer.stored
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, S, 16, generator=g)
    steps = [torch.randn(1, 4, 1, 16, generator=g) * 3 for _ in range(3)]
    expected = torch.zeros(1, 2, S)
    for q in steps:
        layer.acc += decode_attention(q, keys, None, 0.25, None)
        probs = torch.softmax((q.view(1, 2, 2, 16) @ keys.transpose(-1, -2)) * 0.25, -1)  # [B, H_kv, G, S]
        expected += probs.sum(2)  # the two query heads that share each KV head
    torch.testing.assert_close(layer.acc, expected, rtol=1e-5, atol=1e-6)


def _decode_cache(policy: str, **kw):
    """A budgeted cache after a 20-token prompt (question: 3 tokens) and 5 decode steps: 25 tokens stored."""
    model = tiny_model("llama", layers=1)
    cache = CompressedCache(model, selector="random", retention=1.0, max_tokens=25, question_len=3,
                            decode_policy=policy, evict_every=10, **kw)
    ids = prompt_ids(1, 20)
    with torch.no_grad():
        token = model(ids, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        for _ in range(5):
            token = model(token, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
    layer = cache.layers[0]
    assert layer.stored == 25 and _kept(cache) == list(range(25))
    return cache, layer


def test_h2o_eviction_keeps_the_heaviest_and_every_protected_token():
    cache, layer = _decode_cache("h2o", recent_tokens=4, sink_tokens=2)
    # heavy hitters: positions 6, 9, 12 and 15; the recent tokens 21..24 got the *least* attention
    acc = torch.full((1, 2, 25), 0.5)
    acc[..., [6, 9, 12, 15]] = 5.0
    acc[..., 21:] = 0.0
    layer.acc = acc
    cache.max_tokens = 15
    cache._evict(layer)
    # 15 slots: 2 sinks, the question 17..19, the 4 recent tokens 21..24, then the 4 heaviest of the rest and the
    # earliest two of the 0.5-ties (2, 3: ties break towards earlier slots)
    assert _kept(cache) == [0, 1, 2, 3, 6, 9, 12, 15, 17, 18, 19, 21, 22, 23, 24]


def test_streaming_decode_policy_keeps_question_sinks_and_the_newest():
    model = tiny_model("llama", layers=2)
    ids = prompt_ids(1, 30)
    cache = CompressedCache(model, selector="streaming", max_tokens=20, question_len=5, decode_policy="streaming",
                            evict_every=4, recent_tokens=2)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=40,
                         min_new_tokens=40, do_sample=False)
    assert out.shape[1] == 70
    for idx in cache.compressed_layers:
        kept = _kept(cache, idx)
        newest = len(kept) - 4 - 5  # everything but the 4 default sinks and the 5 question tokens is the newest
        assert 20 <= len(kept) < 24
        assert kept == [0, 1, 2, 3, 25, 26, 27, 28, 29] + list(range(70 - 1 - newest, 70 - 1))
    assert cache.get_seq_length() == 69


# ------------------------------------------------------------------------------------------- byte accounting


def test_cache_bytes_total_is_the_sum_of_its_parts():
    parts = dict(codes=1, scales=20, zeros=300, full_precision=4000, indices=50000)
    assert CacheBytes(**parts, reference=7).total == 54321
    model = tiny_model("llama", layers=2)
    cache = CompressedCache(model, selector="q2c", retention=0.5, question_len=4, quant={0: 4, "default": 16},
                            group_size=16)
    with torch.no_grad():
        model(prompt_ids(2, 20), **cache_kwargs(model, cache))
    fp = cache.memory_footprint()
    assert min(fp.codes, fp.scales, fp.zeros, fp.full_precision, fp.indices) > 0
    assert fp.total == fp.codes + fp.scales + fp.zeros + fp.full_precision + fp.indices
    # by hand: 4 + ceil(0.5 * 16) = 12 slots per row; 2 rows, 2 KV heads, head_dim 16
    slots = 2 * 2 * 12
    layer1 = 2 * slots * 16 * 4  # fp32 keys and values
    layer0 = 2 * (slots * 16 // 2 + 2 * slots * 2)  # 4-bit codes, one fp16 scale and zero per 16-element group
    indices = 2 * (2 * 12 * 4)  # one int32 position per row and slot, per layer
    assert fp.total == layer0 + layer1 + indices
