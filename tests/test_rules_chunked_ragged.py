"""Bookkeeping rules of chunked prefill and of the batch-row edits of ragged (adakv) layers.

* ``cache.prefill(model, ids, chunk_size=N)`` with a query-agnostic scorer and no question, then ``generate``:
  each row keeps exactly what the unchunked cache keeps, ``sinks + ceil(r * |context|)`` with ``|context|`` the
  row's real tokens after the sinks, the held-back last prompt token included (it is a context token, always kept,
  so it takes one slot of the budget).
* ``batch_repeat_interleave(k)`` repeats every row ``k`` times consecutively (``torch.repeat_interleave`` on the
  batch), what beam search and ``num_return_sequences`` expect; so ``generate(num_beams=..., num_return_sequences=...)``
  on a left-padded batch equals generating for each row alone.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import prompt_ids, tiny_model

from kvcache_plugins import CompressedCache
from kvcache_plugins._compat import cache_kwargs

_MODELS: dict[str, object] = {}


def _model(arch: str = "qwen2", layers: int = 2):
    key = f"{arch}:{layers}"
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, layers=layers)
    return _MODELS[key]


def _left_padded(n: int, pads: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = prompt_ids(len(pads), n, seed=seed)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _kept_per_row(cache: CompressedCache, idx: int) -> list[torch.Tensor]:
    kept = cache.kept_positions(idx)  # [B, H_s, S], -1 = unused
    return [kept[row][kept[row] >= 0].view(kept.shape[1], -1) for row in range(kept.shape[0])]


@pytest.mark.parametrize(
    "selector,n,chunk,retention,sinks,pads",
    [
        ("knorm", 23, 4, 0.3, 0, [0, 3]),  # 0.3 * 23 = 6.9 -> 7; 0.3 * 20 = 6 exactly
        ("knorm", 40, 7, 0.25, 0, [0, 0]),  # 10 exactly: the held-back token must fit in the 10
        ("streaming", 31, 5, 0.5, 2, [0, 4]),
        ("streaming", 18, 17, 0.2, 1, [2, 0]),  # one chunk plus the held-back token
        ("random", 29, 6, 0.34, 0, [0, 5]),
        ("random", 50, 3, 0.1, 3, [1, 0]),
    ],
)
def test_prefill_in_chunks_without_question_keeps_the_unchunked_count(selector, n, chunk, retention, sinks, pads):
    model = _model()
    ids, mask = _left_padded(n, pads, seed=n)
    kw = dict(selector=selector, retention=retention, question_len=0, sink_tokens=sinks, granularity="head")
    chunked = CompressedCache(model, **kw)
    chunked.prefill(model, ids, mask, chunk_size=chunk)
    model.generate(ids, attention_mask=mask, **cache_kwargs(model, chunked), max_new_tokens=1, do_sample=False)
    whole = CompressedCache(model, **kw)
    model.generate(ids, attention_mask=mask, **cache_kwargs(model, whole), max_new_tokens=1, do_sample=False)
    for idx in chunked.compressed_layers:
        ours, theirs = _kept_per_row(chunked, idx), _kept_per_row(whole, idx)
        for row, pad in enumerate(pads):
            expected = sinks + math.ceil(retention * (n - pad - sinks) - 1e-9)
            assert ours[row].shape[-1] == theirs[row].shape[-1] == expected, (idx, row)
            assert bool((ours[row] >= pad).all())
            assert bool((ours[row][:, -1] == n - 1).all())  # the held-back last token is kept
            assert bool((ours[row][:, :sinks] == torch.arange(pad, pad + sinks)).all())
            if selector == "streaming":  # scores are positions: the chunks keep what the whole prompt keeps
                assert torch.equal(ours[row], theirs[row])


def _adakv(model, **kw) -> CompressedCache:
    return CompressedCache(
        model, selector="knorm", retention=0.4, question_len=3, budget="adakv", granularity="head", **kw
    )


def test_batch_repeat_interleave_of_a_ragged_layer_repeats_each_row_consecutively():
    model = _model()
    ids, mask = _left_padded(26, [0, 6], seed=4)
    cache = _adakv(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, cache))
        step = torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], dim=1)
        model(prompt_ids(2, 2, seed=9), attention_mask=step, **cache_kwargs(model, cache))  # a generated part
    layers = [cache.layers[i] for i in cache.compressed_layers]
    assert all(layer.ragged and layer.generated == 2 for layer in layers)
    assert any(bool((layer.counts[0] != layer.counts[1]).any()) for layer in layers)  # rows really differ
    before = [(cache.kept_positions(i), layer.keys, layer.values, layer.counts)
              for i, layer in zip(cache.compressed_layers, layers)]
    cache.batch_repeat_interleave(3)
    for i, layer, old in zip(cache.compressed_layers, layers, before):
        now = (cache.kept_positions(i), layer.keys, layer.values, layer.counts)
        for a, b in zip(now, old):
            assert torch.equal(a, b.repeat_interleave(3, dim=0))  # rows 0, 0, 0, 1, 1, 1
    cache.batch_select_indices(torch.tensor([True, False, False, False, False, True]))  # rows 0 and 5: 0, 1
    cache.batch_select_indices(torch.tensor([1, 0]))
    for i, layer, old in zip(cache.compressed_layers, layers, before):
        now = (cache.kept_positions(i), layer.keys, layer.values, layer.counts)
        for a, b in zip(now, old):
            assert torch.equal(a, b.flip(0))


def test_beam_search_with_adakv_on_a_padded_batch_equals_each_row_alone():
    model = _model()
    n, pads = 24, [0, 7]
    ids, mask = _left_padded(n, pads, seed=11)
    kw = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False)
    both = model.generate(ids, attention_mask=mask, **cache_kwargs(model, _adakv(model)), **kw)
    assert both.shape[0] == 4
    for row, pad in enumerate(pads):
        one = ids[row : row + 1, pad:]
        alone = model.generate(one, attention_mask=torch.ones_like(one), **cache_kwargs(model, _adakv(model)), **kw)
        assert torch.equal(both[2 * row : 2 * row + 2, n:], alone[:, n - pad :]), row


def test_batch_repeat_interleave_of_a_dense_compressed_layer_repeats_each_row_consecutively():
    model = _model()
    ids, mask = _left_padded(26, [0, 6], seed=4)
    cache = CompressedCache(model, selector="knorm", retention=0.4, question_len=3, quant="int8", group_size=8)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    before = [(cache.kept_positions(i), cache.layers[i].keys, cache.layers[i].values) for i in cache.compressed_layers]
    cache.batch_repeat_interleave(3)
    for i, old in zip(cache.compressed_layers, before):
        now = (cache.kept_positions(i), cache.layers[i].keys, cache.layers[i].values)
        for a, b in zip(now, old):
            assert torch.equal(a, b.repeat_interleave(3, dim=0))
