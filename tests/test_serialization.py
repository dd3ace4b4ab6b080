"""Save, load and send caches: exact round trips, exact continuation, reuse, and every error case."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, prompt_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_plugins import (
    CompressedCache,
    LowRankCache,
    MixedPrecisionCache,
    Scout,
    ScoutMaskedCache,
    cache_kwargs,
    load_cache,
)
from kvcache_plugins.layers.ragged import RaggedLayer
from kvcache_plugins.persist.container import cache_from_bytes
from kvcache_plugins.quant import QuantizedTensor
from kvcache_plugins.selection.budget import AdaKV, Pyramid

MODEL = tiny_model("llama", layers=2)
QLEN = 4


def _fill(cache, ids, model=MODEL, steps=3):
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, cache))
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            token = model(token, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
    return cache


def _states(cache):
    """Every layer's keys and values as the attention would see them (dequantized, stored slots)."""
    out = []
    for layer in cache.layers:
        if hasattr(layer, "materialize"):
            out.append(layer.materialize())
        elif hasattr(layer, "stored_keys"):
            deq = lambda t: t.dequantize(torch.float32) if isinstance(t, QuantizedTensor) else t  # noqa: E731
            out.append((deq(layer.stored_keys), deq(layer.stored_values), layer.positions))
            if isinstance(layer, RaggedLayer) and layer.ragged:  # the per-head prompt part
                out.append((deq(layer.flat_keys), deq(layer.flat_values), layer.flat_positions, layer.counts))
        else:
            out.append((layer.keys, layer.values))
    return out


def _same_states(a, b):
    for sa, sb in zip(_states(a), _states(b)):
        for x, y in zip(sa, sb):
            assert (x is None and y is None) or torch.equal(x, y)


def _continue(model, cache, ids, extra):
    full = torch.cat([ids, extra], dim=1)
    return model.generate(
        full, attention_mask=torch.ones_like(full), **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )


def _scout_cache(model, ids, tok, **kw):
    selection = Scout(tiny_model("llama", layers=1, seed=7), tok, "q2c", 0.5).select(ids, question_len=QLEN)
    return ScoutMaskedCache(selection, model, tokenizer=tok, **kw)


CACHES = {
    "mixed int4": lambda m, ids, tok: MixedPrecisionCache(m, "int4", group_size=16),
    "mixed kivi": lambda m, ids, tok: MixedPrecisionCache(m, "kivi2", group_size=4, residual_length=8),
    "mixed sinks": lambda m, ids, tok: MixedPrecisionCache(m, {0: 3, "default": {"key": 8, "value": 16}}, group_size=8, residual_length=3, sink_tokens=2),
    "compressed q2c": lambda m, ids, tok: CompressedCache(m, selector="q2c", retention=0.5, question_len=QLEN),
    "compressed head int4": lambda m, ids, tok: CompressedCache(m, selector="snapkv", retention=0.4, question_len=QLEN, granularity="head", quant="int4", group_size=16),
    "compressed h2o budget": lambda m, ids, tok: CompressedCache(m, selector="h2o", max_tokens=20, question_len=QLEN, decode_policy="h2o", evict_every=2),
    "compressed adakv ragged": lambda m, ids, tok: CompressedCache(m, selector="snapkv", retention=0.4, question_len=QLEN, granularity="head", budget="adakv", window=4),
    "compressed adakv ragged int8": lambda m, ids, tok: CompressedCache(m, selector="h2o", retention=0.3, question_len=[QLEN, 2], granularity="head", budget=AdaKV(floor=0.5), quant="int8", group_size=16),
    "compressed pyramid int4": lambda m, ids, tok: CompressedCache(m, selector="keydiff", retention=0.5, question_len=QLEN, budget=Pyramid(beta=4), quant="int4", group_size=16),
    "scout": lambda m, ids, tok: _scout_cache(m, ids, tok),
    "scout construction mixed_l0": lambda m, ids, tok: _scout_cache(m, ids, tok, mode="construction", quant="mixed_l0", group_size=16),
    "lowrank pre-RoPE": lambda m, ids, tok: LowRankCache(m, {0: (4, 8), "default": 6}),
    "lowrank post-RoPE int4": lambda m, ids, tok: LowRankCache(m, (4, None), quant="int4", keys="post_rope", group_size=16),
    "compressed q2c lowrank int8": lambda m, ids, tok: CompressedCache(m, selector="q2c", retention=0.5, question_len=QLEN, quant="int8", group_size=16, lowrank=6),
    "compressed head lowrank": lambda m, ids, tok: CompressedCache(m, selector="snapkv", retention=0.4, question_len=QLEN, granularity="head", lowrank=(None, 4)),
    "scout construction lowrank": lambda m, ids, tok: _scout_cache(m, ids, tok, mode="construction", lowrank=4),
}


@pytest.mark.parametrize("name", list(CACHES))
def test_round_trip_and_exact_continuation(name, tmp_path):
    tok = make_tokenizer()
    ids = prompt_ids(2, 30)
    cache = _fill(CACHES[name](MODEL, ids, tok), ids)
    path = tmp_path / "cache.safetensors"
    written = cache.save(path)
    loaded = load_cache(path, MODEL, tokenizer=tok)
    assert type(loaded) is type(cache)
    assert loaded.get_seq_length() == cache.get_seq_length()
    _same_states(cache, loaded)
    assert loaded.memory_footprint().total == cache.memory_footprint().total
    header = written - cache.memory_footprint().total
    assert 0 < header < 16_384  # safetensors index + JSON metadata
    extra = prompt_ids(2, 3, seed=5)
    a = _continue(MODEL, cache, ids, extra)
    b = _continue(MODEL, loaded, ids, extra)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


@st.composite
def specs(draw):
    entry = st.sampled_from([16, 8, 4, 3, 2])
    layers = [draw(entry), draw(entry)]
    axis = draw(st.sampled_from(["token", "channel"]))
    residual = draw(st.sampled_from([0, 3, 8])) if axis == "token" else draw(st.sampled_from([8, 12]))
    return dict(spec=layers, group_size=8, key_axis=axis, residual_length=residual, sink_tokens=draw(st.integers(0, 3)))


@settings(max_examples=40, deadline=None)
@given(spec=specs(), batch=st.integers(1, 3), length=st.integers(1, 40), steps=st.integers(0, 4))
def test_mixed_precision_round_trip_property(spec, batch, length, steps):
    cache = _fill(MixedPrecisionCache(MODEL, **spec), prompt_ids(batch, length), steps=steps)
    loaded = MixedPrecisionCache.from_bytes(cache.to_bytes(), MODEL)
    _same_states(cache, loaded)
    assert loaded.layer_specs == cache.layer_specs
    assert loaded.memory_footprint().as_dict() == cache.memory_footprint().as_dict()


@settings(max_examples=30, deadline=None)
@given(
    selector=st.sampled_from(["q2c", "snapkv", "h2o", "random", "knorm"]),
    granularity=st.sampled_from(["layer", "global", "head"]),
    quant=st.sampled_from([None, "int8", "int4", {0: 2, "default": 16}]),
    batch=st.integers(1, 3),
    length=st.integers(QLEN + 2, 40),
    retention=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_compressed_round_trip_property(selector, granularity, quant, batch, length, retention):
    cache = CompressedCache(
        MODEL, selector=selector, retention=retention, question_len=QLEN, granularity=granularity, quant=quant,
        group_size=8,
    )
    _fill(cache, prompt_ids(batch, length))
    loaded = CompressedCache.from_bytes(cache.to_bytes(), MODEL)
    _same_states(cache, loaded)
    assert torch.equal(loaded.kept_positions(), cache.kept_positions())
    assert loaded.layout.pad.tolist() == cache.layout.pad.tolist()


@settings(max_examples=25, deadline=None)
@given(
    selector=st.sampled_from(["q2c", "snapkv", "h2o", "random", "knorm", "tova", "keydiff", "lagkv"]),
    budget=st.sampled_from(["adakv", "pyramid"]),
    quant=st.sampled_from([None, "int8", "int4", {0: 2, "default": 16}]),
    batch=st.integers(1, 3),
    length=st.integers(QLEN + 5, 40),  # lagkv keeps 4 sinks by default: sinks + question + 1
    retention=st.sampled_from([0.25, 0.5, 1.0]),
    steps=st.integers(0, 3),
)
def test_budget_round_trip_property(selector, budget, quant, batch, length, retention, steps):
    """Per-head adaptive (ragged) and per-layer budgets: the loaded cache holds the same states, reports the same
    kept positions and bytes for every layer, and answers the next step identically."""
    cache = CompressedCache(
        MODEL, selector=selector, retention=retention, question_len=QLEN, granularity="head", budget=budget,
        quant=quant, group_size=8,
    )
    ids = prompt_ids(batch, length)
    _fill(cache, ids, steps=steps)
    loaded = CompressedCache.from_bytes(cache.to_bytes(), MODEL)
    assert loaded.budget == cache.budget
    _same_states(cache, loaded)
    for idx in cache.compressed_layers:
        assert torch.equal(loaded.kept_positions(idx), cache.kept_positions(idx))
        assert getattr(loaded.layers[idx], "ragged", False) == getattr(cache.layers[idx], "ragged", False)
    assert loaded.memory_footprint().as_dict() == cache.memory_footprint().as_dict()
    step = prompt_ids(batch, 1, seed=11)
    with torch.no_grad():
        a = MODEL(step, **cache_kwargs(MODEL, cache)).logits
        b = MODEL(step, **cache_kwargs(MODEL, loaded)).logits
    assert torch.equal(a, b)


def test_several_questions_from_one_encoded_context():
    """Encode once, fork per question: each answer equals encoding the context again for that question alone."""
    context = prompt_ids(1, 40)
    questions = [prompt_ids(1, 5, seed=s) for s in (11, 12, 13)]
    for make in (
        lambda: MixedPrecisionCache(MODEL, "int4", group_size=16),
        lambda: CompressedCache(MODEL, selector="snapkv", retention=0.5, question_len=0, window=8),
        lambda: CompressedCache(MODEL, selector="knorm", retention=0.5, question_len=0, quant="int8", group_size=16),
    ):
        encoded = make()
        with torch.no_grad():
            MODEL(context, **cache_kwargs(MODEL, encoded))
        sent = encoded.to_bytes()
        received = type(encoded).from_bytes(sent, MODEL)
        answers = [_continue(MODEL, received.fork(), context, q).sequences for q in questions]
        for q, answer in zip(questions, answers):
            fresh = make()
            with torch.no_grad():
                MODEL(context, **cache_kwargs(MODEL, fresh))
            assert torch.equal(_continue(MODEL, fresh, context, q).sequences, answer)
        assert received.get_seq_length() == 40  # forks never touched the received cache


def test_errors_before_any_tensor_reaches_the_model(tmp_path):
    ids = prompt_ids(1, 20)
    cache = _fill(MixedPrecisionCache(MODEL, "int4", group_size=16), ids)
    data = cache.to_bytes()
    other_depth = tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match=r"saved for another model.*num_layers.*\(2, 3\)"):
        cache_from_bytes(data, other_depth)
    other_rope = tiny_model("llama", layers=2)
    other_rope.config.rope_theta = 1234.0
    with pytest.raises(ValueError, match="saved for another model"):
        cache_from_bytes(data, other_rope)
    with pytest.raises(ValueError, match="truncated"):
        cache_from_bytes(data[: len(data) // 2], MODEL)
    with pytest.raises(ValueError, match="too short"):
        cache_from_bytes(data[:5], MODEL)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    with pytest.raises(ValueError, match="checksum"):
        cache_from_bytes(bytes(flipped), MODEL)
    with pytest.raises(ValueError, match="version '9'"):
        cache_from_bytes(data.replace(b'"version":"2"', b'"version":"9"', 1), MODEL)
    from safetensors.torch import save

    with pytest.raises(ValueError, match="not a kvcache_plugins cache file"):
        cache_from_bytes(save({"x": torch.zeros(2)}), MODEL)
    with pytest.raises(TypeError, match="hold a MixedPrecisionCache, not a CompressedCache"):
        CompressedCache.from_bytes(data, MODEL)
    mid_prefill = CompressedCache(MODEL, selector="random", retention=0.5, question_len=2)
    mid_prefill.layers[0].update(torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16))
    with pytest.raises(ValueError, match="still holds an unselected prompt"):
        mid_prefill.to_bytes()


def test_size_is_byte_accounting_plus_small_header():
    ids = prompt_ids(1, 256)
    text_bytes = len(" ".join(f"w{i}" for i in ids[0].tolist()).encode())
    for cache in (MixedPrecisionCache(MODEL, "int4", group_size=16), CompressedCache(MODEL, selector="snapkv", retention=0.25, question_len=0)):
        _fill(cache, ids, steps=0)
        fp = cache.memory_footprint()
        size = len(cache.to_bytes())
        assert fp.total < size < fp.total + 8192
        assert size < fp.reference  # below the fp16 size of the same cache
        assert text_bytes < size  # the prompt text is always smaller: a cache is worth sending to skip prefill
