"""Chunked and unchunked prefill apply one selection plan: the same kept counts per layer and head, for every
scorer with a chunked form and every budget allocator (issue 28).

The rule (kvcache_plugins.selection.plan): a layer keeps its allocator's budget of context tokens per row (pyramid:
shrinking with depth; adakv: the layer's H * k_b across heads, each head at least ceil(floor * k_b)) plus sinks and
question, whether the prompt came in one forward or in chunks.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvcache_plugins import CompressedCache, cache_kwargs
from kvcache_plugins.selection import HeldContext, ScoreContext, Selector, chunked_selector_names, selector_names

from conftest import prompt_ids, tiny_model

N, QLEN, CHUNK, RETENTION = 57, 5, 16, 0.3
CHUNKED = chunked_selector_names()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=4)


def _counts(cache) -> torch.Tensor:
    """``[L, B, H]`` kept slots per compressed layer, row and KV head."""
    out = []
    for i in cache.compressed_layers:
        kept = cache.kept_positions(i)
        out.append((kept >= 0).sum(-1).expand(kept.shape[0], cache.model_config.num_key_value_heads))
    return torch.stack(out)


def _run(model, chunk, **kw) -> torch.Tensor:
    return _fill(model, chunk, **kw)[0]


def _fill(model, chunk, **kw):
    ids = prompt_ids(2, N, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # row 1 left-padded
    cache = CompressedCache(model, retention=RETENTION, question_len=QLEN, **kw)
    extra = {} if chunk is None else {"prefill_chunk_size": chunk}
    model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=1, do_sample=False, **extra)
    return _counts(cache), cache


def test_every_selector_but_two_has_a_chunked_form():
    assert set(selector_names()) - set(CHUNKED) == {"expected_attention", "lagkv"}


@pytest.mark.parametrize("selector", CHUNKED)
@pytest.mark.parametrize("budget,granularity", [("uniform", "layer"), ("uniform", "head"), ("pyramid", "layer"),
                                                ("pyramid", "head")])
def test_chunked_keeps_the_unchunked_counts(model, selector, budget, granularity):
    whole = _run(model, None, selector=selector, budget=budget, granularity=granularity)
    chunked = _run(model, CHUNK, selector=selector, budget=budget, granularity=granularity)
    assert torch.equal(chunked, whole)


def test_pyramid_counts_shrink_with_depth_chunked(model):
    counts = _run(model, CHUNK, selector="knorm", budget="pyramid")[:, 0, 0]
    assert counts.tolist() == sorted(counts.tolist(), reverse=True) and counts[0] > counts[-1]


@pytest.mark.parametrize("selector", CHUNKED)
def test_adakv_chunked_keeps_each_layers_total_and_every_heads_floor(model, selector):
    whole, whole_cache = _fill(model, None, selector=selector, budget="adakv", granularity="head")
    chunked, chunked_cache = _fill(model, CHUNK, selector=selector, budget="adakv", granularity="head")
    # the last chunk allocates across heads as the whole prompt does: stored ragged wherever heads differ
    for i in chunked_cache.compressed_layers:
        assert chunked_cache.layers[i].ragged == whole_cache.layers[i].ragged
    assert any(chunked_cache.layers[i].ragged for i in chunked_cache.compressed_layers)
    assert torch.equal(chunked.sum(-1), whole.sum(-1))  # per layer and row: H * k_b + protected per head
    for row, real in enumerate((N, N - 6)):
        k_b = math.ceil(RETENTION * (real - QLEN) - 1e-9)
        floor = math.ceil(0.2 * k_b - 1e-9)
        assert bool((chunked[:, row] >= floor + QLEN).all())
    if selector in ("streaming",):  # equal scores in every head: the same per-head counts as unchunked
        assert torch.equal(chunked, whole)


class _Newest(Selector):
    """A scorer added in one file: the newer, the better (both forms)."""

    name = "newest_test"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return torch.arange(ctx.keys.shape[2], dtype=torch.float32).view(1, 1, -1)

    def score_held(self, held: HeldContext) -> torch.Tensor:
        return held.positions.float()


def test_a_new_scorer_works_chunked_and_unchunked_alike(model):
    ids = prompt_ids(1, N, seed=2)
    kept = []
    for chunk in (None, CHUNK):
        cache = CompressedCache(model, selector=_Newest(), retention=RETENTION, question_len=QLEN)
        extra = {} if chunk is None else {"prefill_chunk_size": chunk}
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=1, do_sample=False, **extra)
        kept.append(cache.kept_positions(0))
    assert torch.equal(kept[0], kept[1])
    k_b = math.ceil(RETENTION * (N - QLEN) - 1e-9)
    assert kept[0][0, 0].tolist() == list(range(N - QLEN - k_b, N))


def test_a_scorer_without_a_chunked_form_is_refused_before_any_work(model):
    cache = CompressedCache(model, selector="lagkv", retention=0.5, question_len=QLEN)
    with pytest.raises(ValueError, match="no chunked form.*snapkv"):
        cache.prefill(model, prompt_ids(1, N), chunk_size=CHUNK)
    assert cache.get_seq_length() == 0
