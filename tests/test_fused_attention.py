"""Attention straight from packed codes: the fused decode path equals the reference path (dequantize, then sdpa).

Most tests run the kernels' math eagerly (``KVCACHE_PLUGINS_COMPILE=0``, set in conftest): that is the very code
inductor compiles. ``test_compiled_*`` compile it (one shared kernel per layout, tens of seconds each on two cores).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import CORE_ARCHITECTURES, prompt_ids, tiny_model

from kvcache_plugins import CompressedCache, MixedPrecisionCache
from kvcache_plugins import compiler as compiled
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.attention import fused
from kvcache_plugins.quant.groupwise import quantize
from kvcache_plugins.quant.growable import GrowableQuantized

LOW = torch.finfo(torch.float32).min


def reference_attention(q, k, v, mask, scaling, softcap=None):
    """Plain attention: ``q [B, Hq, n, D]``, ``k/v [B, H, L, D]``, additive ``mask [B, 1, n, L]``.

    Returns ``[B, n, Hq, D]``."""
    R = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)
    s = q.float() @ k.float().transpose(-1, -2) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    p = torch.softmax(s + mask, dim=-1)
    return (p @ v.float()).transpose(1, 2)


def _padded(q, chunk):
    g = GrowableQuantized(q)
    g.reserve(max(2 * chunk, q.num_tokens), chunk)
    return g.buffers()


LAYOUTS = [
    (8, "token", 8, "token"),
    (4, "token", 4, "token"),
    (3, "token", 3, "token"),
    (2, "token", 2, "token"),
    (4, "channel", 4, "token"),  # KIVI: keys per channel
    (2, "channel", 2, "channel"),
    (8, "token", 3, "token"),
]


@pytest.mark.parametrize("kb,kaxis,vb,vaxis", LAYOUTS)
@pytest.mark.parametrize("queries,softcap", [(1, None), (3, None), (2, 30.0)])
def test_kernel_matches_dequantize_then_attend(kb, kaxis, vb, vaxis, queries, softcap):
    gen = torch.Generator().manual_seed(kb * 10 + vb + queries)
    B, H, R, D, T, F, g = 2, 2, 3, 32, 200, 5, 8  # GQA: 3 query heads per KV head
    k, v = torch.randn(B, H, T, D, generator=gen), torch.randn(B, H, T, D, generator=gen) * 3
    qk, qv = quantize(k, kb, g, kaxis), quantize(v, vb, g, vaxis)
    fk, fv = torch.randn(B, H, F, D, generator=gen), torch.randn(B, H, F, D, generator=gen)
    q = torch.randn(B, H * R, queries, D, generator=gen)
    mask = torch.zeros(B, 1, queries, T + F)
    mask[0, ..., :7] = LOW  # a left-padded row
    mask[1, ..., 50:60] = LOW  # unused slots in the middle
    chunk = max(fused.chunk_tokens(fused.Layout(kb, g, kaxis, D)), fused.chunk_tokens(fused.Layout(vb, g, vaxis, D)))
    pk, pv = _padded(qk, chunk), _padded(qv, chunk)
    Tp = pk.num_tokens
    assert Tp % chunk == 0 and Tp >= T
    kernel_mask = torch.cat([mask[..., :T], mask.new_full((B, 1, queries, Tp - T), LOW), mask[..., T:]], dim=-1)
    out, probs = fused.fused_attention(q, pk, pv, fk, fv, kernel_mask, D**-0.5, softcap, weights=True, compiled=False)
    K = torch.cat([qk.dequantize(torch.float32), fk], dim=-2)
    V = torch.cat([qv.dequantize(torch.float32), fv], dim=-2)
    expected = reference_attention(q, K, V, mask, D**-0.5, softcap)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert probs.shape == (B, H * R, queries, Tp + F)
    assert float(probs[..., T:Tp].abs().max()) == 0.0  # padding gets no weight
    assert float(probs[0, ..., :7].abs().max()) == 0.0


def test_additive_mask_from_what_transformers_passes():
    none = fused.additive_mask(None, 2, 3, 6, torch.device("cpu"))
    assert none.shape == (2, 1, 3, 6)
    assert (none[0, 0] == 0).tolist() == [[True] * 4 + [False] * 2, [True] * 5 + [False], [True] * 6]
    boolean = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    boolean[..., :2] = False
    m = fused.additive_mask(boolean, 1, 1, 6, torch.device("cpu"))
    assert (m == 0).flatten().tolist() == [False, False, True, True, True, True]


def _decode(model, cache, ids, steps, attention_mask=None):
    logits = []
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, **cache_kwargs(model, cache))
        for _ in range(steps):
            logits.append(out.logits[:, -1].float())
            token = out.logits[:, -1:].argmax(-1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            out = model(token, attention_mask=attention_mask, **cache_kwargs(model, cache))
    return torch.stack(logits)


SPECS = {
    "int8": dict(spec="int8", group_size=8),
    "int4": dict(spec="int4", group_size=16),
    "int3": dict(spec="int3", group_size=8),
    "int2": dict(spec="int2", group_size=16),
    "mixed_l0": dict(spec="mixed_l0", group_size=16),
    "kv differ": dict(spec={"default": {"key": 8, "value": 2}}, group_size=8),
    "channel keys": dict(spec="int4", group_size=4, key_axis="channel", residual_length=6),
    "channel both": dict(spec="int2", group_size=8, key_axis="channel", value_axis="channel", residual_length=8),
    "residual+sinks": dict(spec="int4", group_size=16, residual_length=5, sink_tokens=3),
    "kivi2": dict(spec="kivi2", group_size=8, residual_length=8),
}


def _reference_copy(cache: MixedPrecisionCache) -> MixedPrecisionCache:
    """The same cache state, decoding through the reference path."""
    twin = copy.deepcopy(cache)
    twin.fused = False
    for layer in twin._quantized_layers():
        layer.fused = False
    return twin


def _stepwise(model, cache, ids, steps, attention_mask=None, new_tokens=1):
    """Decode from ``cache`` and at every step also run the reference path from an identical copy of the cache.

    Comparing two whole generations would compare two caches whose contents drift apart: a difference of 1e-7 in
    a hidden state can move a value across a rounding boundary of the quantizer, and the two caches then store
    codes one step apart. Step by step, both paths attend to the very same stored codes.
    """
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, **cache_kwargs(model, cache))
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            if new_tokens > 1:  # a multi-token step (assisted-generation verification, a follow-up turn)
                token = torch.cat([token, torch.randint(3, 90, (ids.shape[0], new_tokens - 1), generator=gen)], 1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            twin = _reference_copy(cache)
            before = cache.fused_steps
            out = model(token, attention_mask=attention_mask, **cache_kwargs(model, cache))
            expected = model(token, attention_mask=attention_mask, **cache_kwargs(model, twin))
            torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-4)
            assert torch.equal(out.logits.argmax(-1), expected.logits.argmax(-1))
            assert cache.fused_steps > before == twin.fused_steps  # the twin ran no fused step
            assert cache.memory_footprint() == twin.memory_footprint()


@pytest.mark.parametrize("arch", [*CORE_ARCHITECTURES, "qwen3"])
@pytest.mark.parametrize("case", list(SPECS))
def test_fused_decode_matches_reference_path(arch, case):
    model = tiny_model(arch)
    ids = prompt_ids(2, 37)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    cache = MixedPrecisionCache(model, **SPECS[case])
    assert cache.fused and not MixedPrecisionCache(model, **SPECS[case], fused=False).fused
    _stepwise(model, cache, ids, 10, mask)
    _stepwise(model, cache, ids[:, :5], 2, torch.cat([mask, torch.ones(2, 10 + 5)], 1).long(), new_tokens=4)


def test_follow_up_turns_and_reset_run_fused():
    model = tiny_model("qwen2")
    ours = MixedPrecisionCache(model, "int4", group_size=16, residual_length=4)
    ref = MixedPrecisionCache(model, "int4", group_size=16, residual_length=4, fused=False)
    for cache in (ours, ref):
        cache.turns = []
        for _ in range(2):  # the second round runs after reset()
            cache.reset()
            ids = prompt_ids(1, 30)
            for turn in range(3):  # follow-up turns of 5 tokens: multi-query fused steps
                generated = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, **cache_kwargs(model, cache),
                )
                cache.turns.append(torch.stack(generated.logits))
                ids = torch.cat([generated.sequences, prompt_ids(1, 5, seed=turn + 1)], dim=1)
    for a, b in zip(ref.turns, ours.turns):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert ours.fused_steps > 0


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_beam_search_sampling_and_assisted_generation(arch):
    model = tiny_model(arch)
    ids = prompt_ids(2, 20)
    make = lambda fused: MixedPrecisionCache(model, "int4", group_size=8, residual_length=3, fused=fused)  # noqa: E731
    for kwargs in (
        dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False),
        dict(do_sample=True, top_k=20, max_new_tokens=8),
    ):
        torch.manual_seed(3)
        a = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, make(False)), **kwargs)
        torch.manual_seed(3)
        cache = make(True)
        b = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), **kwargs)
        assert torch.equal(a, b) and cache.fused_steps > 0
    one = ids[:1]
    kwargs = dict(assistant_model=tiny_model(arch, seed=5), max_new_tokens=12, do_sample=False)
    a = model.generate(one, attention_mask=torch.ones_like(one), **cache_kwargs(model, make(False)), **kwargs)
    cache = make(True)
    b = model.generate(one, attention_mask=torch.ones_like(one), **cache_kwargs(model, cache), **kwargs)
    assert torch.equal(a, b) and cache.fused_steps > 0


def test_config_only_and_opt_out_take_the_reference_path():
    model = tiny_model("llama")
    assert not MixedPrecisionCache(model.config, "int4", group_size=16).fused
    assert not MixedPrecisionCache(model, "int4", group_size=16, fused=False).fused
    with pytest.raises(TypeError, match="fused must be True or False"):
        MixedPrecisionCache(model, "int4", group_size=16, fused="yes")


def test_a_step_never_attended_is_an_error():
    """A cache built for one model, used with another whose attention is not routed: fail loudly, never silently."""
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    cache = MixedPrecisionCache(model, "int4", group_size=16)
    ids = prompt_ids(1, 20)
    with torch.no_grad():
        other(ids, **cache_kwargs(other, cache))
        with pytest.raises(RuntimeError, match="never attended"):
            other(ids[:, :1], **cache_kwargs(other, cache))


def test_growable_buffers_grow_in_place_and_report_capacity_apart():
    model = tiny_model("llama")
    cache = MixedPrecisionCache(model, "int4", group_size=16)
    ref = MixedPrecisionCache(model, "int4", group_size=16, fused=False)
    ids = prompt_ids(1, 20)
    _decode(model, cache, ids, 40)
    _decode(model, ref, ids, 40)
    stream = cache.layers[0].streams[0]
    assert stream.grown.capacity > stream.body_len == 60
    used = cache.memory_footprint()
    assert used == ref.memory_footprint()  # stored bytes only, whatever the capacity
    assert cache.memory_reserved() == sum(
        sum(t.numel() * t.element_size() for t in (s.grown.codes, s.grown.scale, s.grown.zero))
        for layer in cache.layers for s in layer.streams
    ) - (used.codes + used.scales + used.zeros)
    buffer = stream.grown.codes
    with torch.no_grad():
        model(ids[:, :1], **cache_kwargs(model, cache))
    assert stream.grown.codes is buffer  # appended in place, no reallocation


def test_compiler_failure_warns_once_and_falls_back(monkeypatch):
    model = tiny_model("llama")
    ids = prompt_ids(1, 20)
    expected = _decode(model, MixedPrecisionCache(model, "int4", group_size=16, fused=False), ids, 4)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "COMPILE", True)
    monkeypatch.setattr(compiled, "_broken", [])
    monkeypatch.setattr(compiled, "compile_seconds", {})
    monkeypatch.setattr(fused, "_kernel", lambda *statics: broken)
    cache = MixedPrecisionCache(model, "int4", group_size=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _decode(model, cache, ids, 4)
    messages = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]
    assert torch.equal(got, expected) and cache.fused_steps == 0


# ---------------------------------------------------------------------------------------------- compiled kernels
@torch.no_grad()
def _compiled_case(kb, kaxis, vb, vaxis, B, n, lengths):
    """Compile once, then run growing lengths (crossing 4096) without a recompile; compare with the eager math."""
    D, H, R, g, F = 64, 2, 2, 32, 3
    torch._dynamo.reset()
    compiled.compile_seconds.clear()
    fused._kernel.cache_clear()
    outs = []
    for i, T in enumerate(lengths):
        gen = torch.Generator().manual_seed(T)
        qk = quantize(torch.randn(B, H, T, D, generator=gen), kb, g, kaxis)
        qv = quantize(torch.randn(B, H, T, D, generator=gen), vb, g, vaxis)
        chunk = max(fused.chunk_tokens(fused.Layout(b, g, a, D)) for b, a in ((kb, kaxis), (vb, vaxis)))
        pk, pv = _padded(qk, chunk), _padded(qv, chunk)
        fk, fv = torch.randn(B, H, F, D, generator=gen), torch.randn(B, H, F, D, generator=gen)
        q = torch.randn(B, H * R, n, D, generator=gen)
        mask = torch.zeros(B, 1, n, pk.num_tokens + F)
        mask[..., T : pk.num_tokens] = LOW
        args = (q, pk, pv, fk, fv, mask, D**-0.5)
        if i == 0:
            got = fused.fused_attention(*args, compiled=True)
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                got = fused.fused_attention(*args, compiled=True)
        assert got is not None, fused.compiler_broken()
        eager = fused.fused_attention(*args, compiled=False)
        torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-5)
        # a signature seen before runs the compiled code straight (no guards): the very same output as dynamo's
        kernel = compiled.Kernel._all[-1]  # the attention kernel made by this case
        guarded = kernel.guarded_calls
        again = fused.fused_attention(*args, compiled=True)
        assert kernel.guarded_calls == guarded and kernel._direct
        with compiled.no_direct_calls():
            through_dynamo = fused.fused_attention(*args, compiled=True)
        assert torch.equal(again[0], through_dynamo[0]) and torch.equal(again[0], got[0])
        outs.append(got[0])
    assert len(compiled.compile_seconds) == 1
    return outs


def test_compiled_kernel_never_recompiles_as_the_cache_grows():
    _compiled_case(4, "token", 4, "token", B=1, n=1, lengths=[300, 4100, 5000, 9000])


def test_compiled_decode_through_the_model(monkeypatch):
    """Compiled end to end (attention and quantize-and-append): the same greedy tokens as the reference path,
    logits within 1e-4, and after the first steps the kernels run without dynamo's per-call guards."""
    monkeypatch.setattr(compiled, "COMPILE", True)
    model = tiny_model("qwen2")
    ids = prompt_ids(2, 150)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    expected = _decode(model, MixedPrecisionCache(model, "int4", group_size=16, fused=False), ids, 12, mask)
    guarded = {k: k.guarded_calls for k in compiled.Kernel._all}
    cache = MixedPrecisionCache(model, "int4", group_size=16)
    got = _decode(model, cache, ids, 12, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert cache.fused_steps == 12 * model.config.num_hidden_layers
    for name in ("_attend_", "quantize_4b_g16_token"):
        kernel = [k for k in compiled.Kernel._all if k.name.startswith(name)][-1]
        # 12 steps x 2 layers called it; dynamo saw only the first call of each new signature
        assert kernel._direct and kernel.guarded_calls - guarded.get(kernel, 0) <= 3, (name, kernel.guarded_calls)


@pytest.mark.slow
@pytest.mark.parametrize("kb,kaxis,vb,vaxis", [(2, "channel", 3, "token"), (8, "token", 8, "token")])
def test_compiled_kernels_of_other_layouts(kb, kaxis, vb, vaxis):
    _compiled_case(kb, kaxis, vb, vaxis, B=3, n=4, lengths=[256, 4352])
    assert math.isfinite(next(iter(compiled.compile_seconds.values())))


# ------------------------------------------------------------------ CompressedCache with quantized kept tokens
def _compressed_reference_copy(cache: CompressedCache) -> CompressedCache:
    """The same CompressedCache state, decoding through the reference path (dequantize, then attend)."""
    twin = copy.deepcopy(cache)
    twin.fused = False
    return twin


def _compressed_stepwise(model, cache, ids, mask, steps, new_tokens=1, each_step=None):
    """As :func:`_stepwise`: every step runs fused and, from an identical copy, on the reference path
    (``each_step(cache, twin)`` checks more after each step)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **cache_kwargs(model, cache))
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            if new_tokens > 1:
                token = torch.cat([token, torch.randint(3, 90, (ids.shape[0], new_tokens - 1), generator=gen)], 1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            twin = _compressed_reference_copy(cache)
            before = cache.fused_steps
            out = model(token, attention_mask=mask, **cache_kwargs(model, cache))
            expected = model(token, attention_mask=mask, **cache_kwargs(model, twin))
            torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-4)
            assert torch.equal(out.logits.argmax(-1), expected.logits.argmax(-1))
            assert cache.fused_steps - before == len(cache.compressed_layers) and twin.fused_steps == before
            assert cache.memory_footprint() == twin.memory_footprint()
            for i in cache.compressed_layers:  # the very same stored codes after the step
                a, b = cache.layers[i].stored_keys, twin.layers[i].stored_keys
                assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale)
            if each_step is not None:
                each_step(cache, twin)
    return mask


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("quant", ["int8", "int4", "int2"])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_compressed_cache_fused_decode_matches_reference_path(arch, quant, granularity):
    model = tiny_model(arch)
    ids = prompt_ids(3, 40)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    mask[2, :3] = 0
    cache = CompressedCache(
        model, selector="q2c", retention=0.4, question_len=[4, 7, 5], sink_tokens=2, granularity=granularity,
        quant=quant, group_size=16,
    )
    assert cache.fused
    mask = _compressed_stepwise(model, cache, ids, mask, 8)
    assert cache.layers[cache.compressed_layers[0]].valid_slots() is not None  # unused slots were masked
    _compressed_stepwise(model, cache, ids[:, :1], mask, 2, new_tokens=4)  # multi-token steps


def test_compressed_cache_fused_streaming_eviction_and_generate():
    model = tiny_model("qwen2")
    ids = prompt_ids(2, 36)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    make = lambda fused: CompressedCache(  # noqa: E731
        model, selector="snapkv", max_tokens=20, question_len=[4, 6], quant="int4", group_size=16,
        decode_policy="streaming", evict_every=4, fused=fused,
    )
    cache = make(True)
    _compressed_stepwise(model, cache, ids, mask, 12)  # evicts every 4 steps, fused throughout
    ref, ours = make(False), make(True)
    assert not ref.fused and ours.fused
    a = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(model, ref))
    b = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **cache_kwargs(model, ours))
    assert torch.equal(a, b) and ours.fused_steps > 0 == ref.fused_steps


def test_compressed_cache_reference_path_where_fused_does_not_apply():
    model = tiny_model("llama")
    common = dict(selector="q2c", retention=0.5, question_len=4)
    assert not CompressedCache(model, **common).fused  # 16-bit kept tokens
    assert not CompressedCache(model, **common, quant="int4", group_size=16, fused=False).fused
    ragged = CompressedCache(model, **common, quant="int4", group_size=16, granularity="head", budget="adakv")
    assert not ragged.fused
    with pytest.raises(TypeError, match="fused must be True or False"):
        CompressedCache(model, **common, quant="int4", fused=1)
    ids = prompt_ids(1, 30)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                   **cache_kwargs(model, ragged))
    assert ragged.fused_steps == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compressed_cache_fused_h2o_accumulates_the_kernels_attention(arch):
    """decode_policy="h2o" decodes fused: the kernel's probabilities feed the accumulated attention, equal to what
    the reference path recomputes from the dequantized keys, so the same slots are evicted."""
    model = tiny_model(arch)
    ids = prompt_ids(2, 36)
    cache = CompressedCache(
        model, selector="snapkv", max_tokens=24, question_len=4, quant="int4", group_size=16,
        decode_policy="h2o", evict_every=3,
    )
    assert cache.fused

    def same_attention_and_slots(cache, twin):
        for i in cache.compressed_layers:
            a, b = cache.layers[i], twin.layers[i]
            torch.testing.assert_close(a.acc, b.acc, rtol=1e-5, atol=1e-5)
            assert torch.equal(a.positions, b.positions)  # the same slots kept after every eviction

    _compressed_stepwise(model, cache, ids, torch.ones_like(ids), 10, each_step=same_attention_and_slots)
    assert cache.layers[cache.compressed_layers[0]].stored <= 24 + 3
    # the kept slots grew in place: spare capacity is reported apart from the stored bytes
    assert 0 < cache.memory_reserved() and cache.memory_footprint().total > 0


@pytest.mark.parametrize("mode", ["post_hoc", "construction"])
def test_scout_masked_cache_fused_decode_matches_reference_path(mode):
    """A ScoutMaskedCache with quantized kept tokens decodes fused (it is a CompressedCache), step by step equal to
    the reference path from the same stored codes; ``fused=False`` opts out."""
    from conftest import make_tokenizer

    from kvcache_plugins import Scout, ScoutMaskedCache

    model, tok = tiny_model("llama"), make_tokenizer()
    ids = prompt_ids(2, 40)
    selection = Scout(tiny_model("llama", layers=1, seed=7), tok, "q2c", 0.5).select(ids, question_len=4)
    cache = ScoutMaskedCache(selection, model, tokenizer=tok, mode=mode, quant="int4", group_size=16)
    assert cache.fused
    _compressed_stepwise(model, cache, ids, torch.ones_like(ids), 6)
    assert not ScoutMaskedCache(selection, model, tokenizer=tok, quant="int4", group_size=16, fused=False).fused


def test_warmup_compiles_before_the_first_generate(monkeypatch):
    """warmup() compiles what the first generate needs, so that generate compiles nothing; the cache stays unused;
    a used cache is refused; a cache that does not decode fused has nothing to warm up."""
    monkeypatch.setattr(compiled, "COMPILE", True)
    model = tiny_model("llama")
    cache = MixedPrecisionCache(model, "int8", group_size=16, residual_length=8)
    seconds = cache.warmup(model, batch_size=2)
    assert seconds > 0 and cache.get_seq_length() == 0
    seen = dict(compiled.compile_seconds)
    ids = prompt_ids(2, 70)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                   **cache_kwargs(model, cache))
    assert cache.fused_steps > 0 and compiled.compile_seconds == seen  # no kernel compiled during generate
    with pytest.raises(ValueError, match="unused cache"):
        cache.warmup(model)
    assert MixedPrecisionCache(model, "int8", group_size=16, fused=False).warmup(model) == 0.0
    with pytest.raises(ValueError, match="batch_size must be an int"):
        MixedPrecisionCache(model, "int8", group_size=16).warmup(model, batch_size=0)
    compressed = CompressedCache(model, selector="snapkv", retention=0.5, question_len=4, quant="int4", group_size=16)
    assert compressed.warmup(model) > 0 and compressed.get_seq_length() == 0

    from conftest import make_tokenizer

    from kvcache_plugins import Scout, ScoutMaskedCache

    tok = make_tokenizer()
    selection = Scout(tiny_model("llama", layers=1, seed=7), tok, "q2c", 0.5).select(ids[:1], question_len=4)
    scout = ScoutMaskedCache(selection, model, tokenizer=tok, quant="int4", group_size=16)
    assert scout.warmup(model) > 0
    seen = dict(compiled.compile_seconds)
    model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=4, do_sample=False,
                   **cache_kwargs(model, scout))
    assert scout.fused_steps > 0 and compiled.compile_seconds == seen
