"""Every cache reads and behaves like a ``transformers.DynamicCache`` at lossless settings.

The cache-behaviour tests of transformers (``tests/utils/test_cache_utils.py`` and the generation tests that use a
cache), restated for our caches: each test runs the same operations on a ``DynamicCache`` and on one of our caches
configured to lose nothing, and requires identical results, bit for bit: the states a layer returns and holds,
iteration, ``get_seq_length``, ``get_mask_sizes``, crop, beam reordering, batch selection, repeat-interleave,
reset, deepcopy, and ``generate`` (continuation, prompt lookup, beam search, left padding).

Lossless settings that still run our own layer code: ``MixedPrecisionCache`` with an int8 spec whose
full-precision residual window holds every token (``MixedPrecisionLayer`` storage, nothing quantized),
``CompressedCache`` at ``retention=1.0`` (``CompressedLayer`` storage, nothing evicted) and ``ScoutMaskedCache`` with a
selection that keeps every position.

The low-rank caches at ``rank = head_dim`` (``LowRankCache``, ``CompressedCache(lowrank=...)``) are lossless only up
to fp32 rounding: the SVD factors reconstruct the states within about 1e-6, not bit for bit. Their states, logits and
scores are compared within ``LOWRANK_TOL`` (absolute and relative) instead of exactly; token sequences still have to
be identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tokenizer, prompt_ids, tiny_model
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvcache_plugins import CompressedCache, LowRankCache, MixedPrecisionCache, Scout, ScoutMaskedCache
from kvcache_plugins._compat import cache_kwargs, output_cache
from kvcache_plugins._model import head_dim
from kvcache_plugins.layers.slots import CompressedLayer
from kvcache_plugins.layers.mixed import MixedPrecisionLayer
from kvcache_plugins.layers.lowrank import LowRankCompressedLayer, LowRankLayer

QLEN = 3
TOKENIZER = make_tokenizer()
#: low-rank caches at full rank: equal within this tolerance, not bitwise (measured: about 1e-6 on the tiny model)
LOWRANK_TOL = 1e-4


def _dynamic(model, ids, mask):
    return DynamicCache(config=model.config)


def _mixed_full(model, ids, mask):
    return MixedPrecisionCache(model, "full")


def _mixed_residual(model, ids, mask):
    cache = MixedPrecisionCache(model, "int8", group_size=16, residual_length=1 << 20)
    assert all(isinstance(layer, MixedPrecisionLayer) for layer in cache.layers)
    return cache


def _compressed(model, ids, mask):
    cache = CompressedCache(model, selector="q2c", retention=1.0, question_len=QLEN)
    assert all(isinstance(layer, CompressedLayer) for layer in cache.layers)
    return cache


def _compressed_per_head(model, ids, mask):
    return CompressedCache(model, selector="knorm", retention=1.0, granularity="head")


def _lowrank(model, ids, mask):
    cache = LowRankCache(model, rank=head_dim(model.config))  # full rank: lossless up to fp32 rounding
    assert all(isinstance(layer, LowRankLayer) for layer in cache.layers)
    return cache


def _compressed_lowrank(model, ids, mask):
    cache = CompressedCache(model, selector="q2c", retention=1.0, question_len=QLEN, lowrank=head_dim(model.config))
    assert all(isinstance(layer, LowRankCompressedLayer) for layer in cache.layers)
    return cache


def _scout(model, ids, mask):
    selection = Scout(model, TOKENIZER, "q2c", retention=1.0).select(ids, mask, question_len=QLEN)
    return ScoutMaskedCache(selection, model, tokenizer=TOKENIZER)


CACHES = {
    "DynamicCache": _dynamic,  # the oracle passes its own tests
    "MixedPrecisionCache(full)": _mixed_full,
    "MixedPrecisionCache(int8, all in the residual)": _mixed_residual,
    "CompressedCache(q2c, 1.0)": _compressed,
    "CompressedCache(knorm, 1.0, head)": _compressed_per_head,
    "ScoutMaskedCache(keeps all)": _scout,
    "LowRankCache(rank=head_dim)": _lowrank,  # within LOWRANK_TOL
    "CompressedCache(q2c, 1.0, lowrank=head_dim)": _compressed_lowrank,  # within LOWRANK_TOL
}
OURS = [name for name in CACHES if name != "DynamicCache"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2")


def _tol(cache) -> float:
    """``LOWRANK_TOL`` for a cache with low-rank layers (SVD reconstruction), else 0 (bit for bit)."""
    lowrank = any(isinstance(layer, (LowRankLayer, LowRankCompressedLayer)) for layer in cache.layers)
    return LOWRANK_TOL if lowrank else 0


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 0) -> None:
    if tol:
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    else:
        assert torch.equal(a, b)


def _same(a: torch.Tensor | None, b: torch.Tensor | None, tol: float = 0) -> None:
    """Equal states (within ``tol``); ``None`` and a tensor without tokens both mean an empty layer."""
    if a is None or b is None or a.numel() == 0 or b.numel() == 0:
        assert (a is None or a.numel() == 0) and (b is None or b.numel() == 0), (a, b)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    _close(a, b, tol)


def assert_reads_like(cache, ref) -> None:
    """Everything a DynamicCache user reads agrees: lengths, mask sizes, ``layers[i].keys/.values``, iteration."""
    tol = _tol(cache)
    assert len(cache.layers) == len(ref.layers)
    assert cache.get_seq_length() == ref.get_seq_length()
    for i, (a, b) in enumerate(zip(cache.layers, ref.layers)):
        assert cache.get_seq_length(i) == ref.get_seq_length(i)
        for q in (1, 4):
            assert cache.get_mask_sizes(q, i) == ref.get_mask_sizes(q, i)
        _same(a.keys, b.keys, tol)
        _same(a.values, b.values, tol)
    items, ref_items = list(cache), list(ref)
    assert len(items) == len(ref_items)
    for (k, v, *_), (rk, rv, *_) in zip(items, ref_items):
        _same(k, rk, tol)
        _same(v, rv, tol)


def _forward(model, ids, cache, mask=None):
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **cache_kwargs(model, cache), use_cache=True)
    assert output_cache(out) is cache
    return out.logits


def _pair(model, name, ids, mask=None):
    """(ours, reference) after the same prefill of ``ids``; returns the logits of both too."""
    ours, ref = CACHES[name](model, ids, mask), DynamicCache(config=model.config)
    logits, ref_logits = _forward(model, ids, ours, mask), _forward(model, ids, ref, mask)
    _close(logits, ref_logits, _tol(ours))
    return ours, ref


def _step(model, ours, ref, ids, mask=None):
    a, b = _forward(model, ids, ours, mask), _forward(model, ids, ref, mask)
    _close(a, b, _tol(ours))
    assert_reads_like(ours, ref)


# ------------------------------------------------------------------------------------------------ reading API


@pytest.mark.parametrize("name", CACHES)
def test_update_and_read_like_dynamic_cache(model, name):
    ids = prompt_ids(2, 12)
    ours, ref = _pair(model, name, ids)
    assert_reads_like(ours, ref)
    assert ours.get_seq_length() == 12 and next(iter(ours))[0].shape == (2, 2, 12, 16)
    _step(model, ours, ref, prompt_ids(2, 1, seed=1))
    _step(model, ours, ref, prompt_ids(2, 3, seed=2))
    assert ours.get_seq_length() == 16


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_layers_read_as_dequantized_storage(model, quant):
    """``layers[i].keys`` of a quantized cache is what attention is given for the past: the stored codes dequantized."""
    ids = prompt_ids(1, 20)
    for cache in (
        # fused=False: a fused decode step hands attention only the new tokens (the past is read from the codes)
        MixedPrecisionCache(model, quant, group_size=16, fused=False),
        CompressedCache(
            model, selector="q2c", retention=0.5, question_len=QLEN, quant=quant, group_size=16, fused=False
        ),
    ):
        _forward(model, ids, cache)
        seen = {}
        new = torch.randn(1, 2, 1, 16)
        for i, layer in enumerate(cache.layers):
            stored_k, stored_v = layer.keys, layer.values
            assert stored_k.shape[-2] == layer.get_mask_sizes(0)[0]  # one row per stored slot
            k, v = layer.update(new, new)  # what attention sees: the stored past, then the new token
            seen[i] = (stored_k, stored_v)
            assert torch.equal(k[..., :-1, :], stored_k) and torch.equal(v[..., :-1, :], stored_v)
        # the reads are quantized values, not the model's own states
        full = DynamicCache(config=model.config)
        _forward(model, ids, full)
        if isinstance(cache, MixedPrecisionCache):
            assert not torch.equal(seen[1][0], full.layers[1].keys)


def test_compressed_layer_reads_its_kept_slots(model):
    ids = prompt_ids(1, 20)
    cache, full = CompressedCache(model, selector="q2c", retention=0.5, question_len=QLEN), DynamicCache()
    _forward(model, ids, cache)
    _forward(model, ids, full)
    for i, layer in enumerate(cache.layers):
        kept = cache.kept_positions(i)[0, 0]
        assert layer.keys.shape[-2] == len(kept) == 12  # ceil(0.5 * 17) context tokens + 3 question tokens
        assert torch.equal(layer.keys, full.layers[i].keys[:, :, kept])
        assert torch.equal(layer.values, full.layers[i].values[:, :, kept])
        assert cache.get_mask_sizes(1, i) == (13, 8)  # stored slots + the query; kv_offset = logical - stored
    assert cache.get_seq_length() == 20


@pytest.mark.parametrize("make", [_mixed_residual, _compressed, _lowrank, _compressed_lowrank])
def test_states_are_read_only(model, make):
    cache = make(model, prompt_ids(1, 8), None)
    _forward(model, prompt_ids(1, 8), cache)
    with pytest.raises(AttributeError, match="read-only"):
        cache.layers[0].keys = torch.zeros(1, 2, 8, 16)


def test_sliding_window_layers_read_as_transformers_own():
    model = tiny_model("gemma3")
    ids = prompt_ids(1, 24)
    cache = MixedPrecisionCache(model, "int8", group_size=16, residual_length=1 << 20)
    compressed = CompressedCache(model, selector="q2c", retention=1.0, question_len=QLEN)
    lowrank = LowRankCache(model, rank=head_dim(model.config))  # within LOWRANK_TOL
    for ours in (cache, compressed, lowrank):
        ref = DynamicCache(config=model.config)
        assert torch.equal(_forward(model, ids, ours), _forward(model, ids, ref))
        assert_reads_like(ours, ref)
        _step(model, ours, ref, prompt_ids(1, 2, seed=3))


# -------------------------------------------------------------------------------------------------- edits


@pytest.mark.parametrize("name", CACHES)
def test_crop_follows_dynamic_layer(model, name):
    ids = prompt_ids(1, 10)
    ours, ref = _pair(model, name, ids)
    _step(model, ours, ref, prompt_ids(1, 4, seed=1))
    for n in (-3, -1):
        ours.crop(n)
        ref.crop(n)
        assert_reads_like(ours, ref)
    assert ours.get_seq_length() == 10
    # n >= 0 means what the installed transformers' DynamicLayer makes of it: a length to keep (5.4: crop(12) keeps
    # all, crop(8) keeps 8, crop(0) empties) or, from 5.23 on, an error (n > 0) and a no-op (0)
    for n in (12, 8, 0):
        try:
            ref.crop(n)
        except ValueError as err:
            assert "positive" in str(err)
            with pytest.raises(ValueError, match="positive"):
                ours.crop(n)
        else:
            ours.crop(n)
        assert_reads_like(ours, ref)
    _step(model, ours, ref, prompt_ids(1, 2, seed=2))  # generation continues exactly after the crop


@pytest.mark.parametrize("name", OURS)
def test_reorder_select_and_repeat_like_dynamic_cache(model, name):
    ids = prompt_ids(3, 9)
    ours, ref = _pair(model, name, ids)
    beam_idx = torch.tensor([2, 0, 0])
    ours.reorder_cache(beam_idx)
    ref.reorder_cache(beam_idx)
    assert_reads_like(ours, ref)
    _step(model, ours, ref, prompt_ids(3, 1, seed=1))
    ours.batch_repeat_interleave(2)
    ref.batch_repeat_interleave(2)
    assert_reads_like(ours, ref)
    assert ours.layers[0].keys.shape[0] == 6
    _step(model, ours, ref, prompt_ids(6, 1, seed=2))
    keep = torch.tensor([5, 1, 2])
    ours.batch_select_indices(keep)
    ref.batch_select_indices(keep)
    assert_reads_like(ours, ref)
    _step(model, ours, ref, prompt_ids(3, 2, seed=3))


@pytest.mark.parametrize("name", OURS)
def test_reset_empties_and_the_cache_serves_again(model, name):
    ids = prompt_ids(1, 10)
    ours, ref = _pair(model, name, ids)
    ours.reset()
    ref.reset()
    for layer, ref_layer in zip(ours.layers, ref.layers):
        if type(layer) is DynamicLayer:  # transformers' own: 5.4's reset zeroes the states and keeps their length
            assert layer.get_seq_length() == ref_layer.get_seq_length()
            continue
        assert layer.get_seq_length() == 0
        _same(layer.keys, None)
        _same(layer.values, None)
    if ours.get_seq_length():
        return
    fresh = DynamicCache(config=model.config)
    _close(_forward(model, ids, ours), _forward(model, ids, fresh), _tol(ours))
    assert_reads_like(ours, fresh)


@pytest.mark.parametrize("name", OURS)
def test_deepcopy_is_independent(model, name):
    """transformers' cache-copy recipe: prefill a shared prefix once, deepcopy it for every continuation."""
    ids = prompt_ids(1, 10)
    ours, ref = _pair(model, name, ids)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in ours.layers]
    for seed in (1, 2):
        mine, theirs = copy.deepcopy(ours), copy.deepcopy(ref)
        _step(model, mine, theirs, prompt_ids(1, 3, seed=seed))
    for (k, v), layer in zip(before, ours.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
    _step(model, ours, ref, prompt_ids(1, 1, seed=3))


# ---------------------------------------------------------------------------------------------- generation


def _generate(model, ids, cache, mask=None, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    settings = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), **{**settings, **kwargs})


def assert_same_generation(a, b, tol: float = 0) -> None:
    """Same tokens; same scores (within ``tol``)."""
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores)
    for x, y in zip(a.scores, b.scores):
        _close(x, y, tol)


@pytest.mark.parametrize("name", OURS)
def test_generation_continues_on_the_same_cache(model, name):
    ids = prompt_ids(1, 12)
    ours, ref = CACHES[name](model, ids, None), DynamicCache(config=model.config)
    first, first_ref = _generate(model, ids, ours, max_new_tokens=5), _generate(model, ids, ref, max_new_tokens=5)
    assert_same_generation(first, first_ref, _tol(ours))
    follow_up = torch.cat([first.sequences, prompt_ids(1, 4, seed=5)], dim=1)
    second, second_ref = (_generate(model, follow_up, c, max_new_tokens=5) for c in (ours, ref))
    assert_same_generation(second, second_ref, _tol(ours))
    assert_reads_like(ours, ref)


@pytest.mark.parametrize("name", [n for n in OURS if not n.startswith("ScoutMaskedCache")])
def test_prompt_lookup_decoding(model, name):
    """Prompt lookup proposes n-grams from the prompt and crops the rejected ones out of the cache."""
    ids = torch.cat([prompt_ids(1, 6)] * 3, dim=1)
    ours, ref = CACHES[name](model, ids, None), DynamicCache(config=model.config)
    kwargs = dict(max_new_tokens=10, prompt_lookup_num_tokens=3)
    assert_same_generation(_generate(model, ids, ours, **kwargs), _generate(model, ids, ref, **kwargs), _tol(ours))
    assert_reads_like(ours, ref)


def test_prompt_lookup_with_a_scout_selection_is_refused_clearly(model):
    """A scout's selection is made for one prompt length; assisted generation's first forward is the prompt plus the
    first candidates, so the selection cannot be placed. The error says so."""
    ids = torch.cat([prompt_ids(1, 6)] * 3, dim=1)
    with pytest.raises(ValueError, match="assisted generation"):
        _generate(model, ids, _scout(model, ids, None), max_new_tokens=10, prompt_lookup_num_tokens=3)


@pytest.mark.parametrize("name", OURS)
def test_beam_search(model, name):
    ids = prompt_ids(1, 10)
    ours, ref = CACHES[name](model, ids, None), DynamicCache(config=model.config)
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2)
    assert_same_generation(_generate(model, ids, ours, **kwargs), _generate(model, ids, ref, **kwargs), _tol(ours))
    assert_reads_like(ours, ref)


@pytest.mark.parametrize("name", OURS)
def test_left_padded_batch_and_extra_padding(model, name):
    long, short = prompt_ids(1, 12), prompt_ids(1, 8, seed=1)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = (torch.arange(12) >= torch.tensor([[0], [4]])).long()
    ours, ref = CACHES[name](model, ids, mask), DynamicCache(config=model.config)
    out = _generate(model, ids, ours, mask, max_new_tokens=6)
    assert_same_generation(out, _generate(model, ids, ref, mask, max_new_tokens=6), _tol(ours))
    # transformers' extra-left-padding check: more padding in front of the short prompt changes nothing
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)
    padded_mask = (torch.arange(13) >= 5).long().unsqueeze(0)
    alone = _generate(model, padded, CACHES[name](model, padded, padded_mask), padded_mask, max_new_tokens=6)
    assert torch.equal(alone.sequences[0, -6:], out.sequences[1, -6:])
