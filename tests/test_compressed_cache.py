"""CompressedCache: eviction equals masking (the oracle), selection scores equal the model's attention, budgets,
granularities, quantization, every generate() mode, and the observer's promises."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import ARCHITECTURES, prompt_ids, tiny_model
from reference import VISIBILITY, oracle_model, reference_cache
from transformers import DynamicCache

from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins import CompressedCache
from kvcache_plugins.attention import observer
from kvcache_plugins.layers.slots import CompressedLayer
from kvcache_plugins.selection import Q2C, H2O, TOVA, ScoreContext, SnapKV, selector_names

ATTN = {arch: (("eager",) if arch == "gemma2" else ("sdpa", "eager")) for arch in ARCHITECTURES}
ARCH_ATTN = [(a, i) for a in ARCHITECTURES for i in ATTN[a]]
SELECTORS = ("q2c", "snapkv", "h2o", "random", "streaming", "knorm")
QLEN = 6


def _hide_evicted(cache: CompressedCache, prompt_len: int, total: int) -> None:
    """Point the oracle at the positions ``cache`` evicted from its prompt, layer by layer (and head by head)."""
    VISIBILITY.__init__()
    VISIBILITY.prompt_len = prompt_len
    for idx in cache.compressed_layers:
        kept = cache.kept_positions(idx)  # [B, Hs, S]
        B, Hs, _ = kept.shape
        keep = torch.zeros(B, Hs, total, dtype=torch.bool)
        keep.scatter_(2, kept.clamp(min=0), kept >= 0)
        keep[..., prompt_len:] = True
        VISIBILITY.hidden[idx] = ~keep


def _generate(model, cache, ids, mask=None, **kwargs):
    args = dict(do_sample=False, max_new_tokens=8, output_logits=True, return_dict_in_generate=True)
    args.update(kwargs)
    return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **cache_kwargs(model, cache), **args)


def _assert_oracle(model, cache_kwargs, ids, mask=None, quant_reference=False, seed=0, **gen):
    oracle = oracle_model(model)
    cache = CompressedCache(model, **cache_kwargs)
    torch.manual_seed(seed)
    ours = _generate(model, cache, ids, mask, **gen)
    _hide_evicted(cache, ids.shape[1], ours.sequences.shape[1])
    ref_cache = reference_cache(oracle, cache.layer_specs) if quant_reference else DynamicCache(config=oracle.config)
    torch.manual_seed(seed)
    ref = _generate(oracle, ref_cache, ids, mask, **gen)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits or (), ref.logits or ()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    return cache, ours


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
@pytest.mark.parametrize("selector", SELECTORS)
def test_eviction_equals_masking_every_selector_and_architecture(arch, attn, selector):
    model = tiny_model(arch, attn)
    cache, _ = _assert_oracle(model, dict(selector=selector, retention=0.4, question_len=QLEN), prompt_ids(2, 30))
    kept = cache.kept_positions()
    sinks = cache.sink_tokens
    assert kept.shape[-1] == sinks + QLEN + -(-0.4 * (30 - QLEN - sinks) // 1) + 7


@pytest.mark.parametrize("granularity", ["layer", "global", "head"])
@pytest.mark.parametrize("arch,attn", [("qwen2", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa"), ("phi3", "sdpa")])
def test_eviction_equals_masking_every_granularity(granularity, arch, attn):
    model = tiny_model(arch, attn, layers=3)
    for selector in ("q2c", "snapkv", "h2o"):
        cache, _ = _assert_oracle(
            model, dict(selector=selector, retention=0.5, question_len=QLEN, granularity=granularity), prompt_ids(2, 28)
        )
        kept = [cache.kept_positions(i) for i in cache.compressed_layers]
        if granularity == "global":
            assert all(torch.equal(k, kept[0]) for k in kept)
        if granularity == "head":
            assert kept[0].shape[1] == model.config.num_key_value_heads
        else:
            assert kept[0].shape[1] == 1


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("qwen3", "eager"), ("mistral", "sdpa"), ("gpt_neox", "sdpa")])
@pytest.mark.parametrize("selector", ["q2c", "random"])
def test_left_padded_batches_keep_per_row_budgets(arch, attn, selector):
    model = tiny_model(arch, attn)
    ids = prompt_ids(3, 26)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    cache, _ = _assert_oracle(model, dict(selector=selector, retention=0.5, question_len=[4, 6, 5]), ids, mask)
    kept = cache.kept_positions()[:, 0, :26 - 9 - 0]
    real = [26 - 9, 26, 26 - 4]
    for row, (n, q) in enumerate(zip(real, [4, 6, 5])):
        held = (cache.kept_positions()[row, 0] >= 0).sum() - 7  # minus the generated tokens
        assert int(held) == q + -(-(n - q) // 2)
    assert kept.shape[0] == 3


@pytest.mark.parametrize("quant", ["int8", "int4", "mixed_l0", {0: 3, "default": 16}])
def test_quantized_kept_tokens_equal_masked_quantized_reference(quant):
    model = tiny_model("qwen2")
    _assert_oracle(
        model, dict(selector="q2c", retention=0.5, question_len=QLEN, quant=quant, group_size=8), prompt_ids(2, 30),
        quant_reference=True,
    )


@pytest.mark.parametrize("arch,attn", ARCH_ATTN)
def test_full_retention_is_bit_identical_to_dynamic_cache(arch, attn):
    model = tiny_model(arch, attn)
    ids = prompt_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    ref = _generate(model, DynamicCache(config=model.config), ids, mask)
    for selector in ("q2c", "h2o", "random"):
        ours = _generate(model, CompressedCache(model, selector=selector, retention=1.0, question_len=4), ids, mask)
        assert torch.equal(ref.sequences, ours.sequences)
        assert all(torch.equal(a, b) for a, b in zip(ref.logits, ours.logits))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_observed_queries_are_the_models_own(arch):
    """Q2C/SnapKV/H2O scores from the observed queries equal the model's own attention probabilities (eager
    attention returns them); this pins q-norm, RoPE, partial rotary, scaling and soft-capping per architecture."""
    model = tiny_model(arch, "eager")
    ids = prompt_ids(2, 24)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    seen: dict[int, ScoreContext] = {}

    class Recording(Q2C):
        name = "recording-q2c"

        def score(self, ctx):
            seen[ctx.layer_idx] = ctx
            return super().score(ctx)

    cache = CompressedCache(model, selector=Recording(), retention=0.5, question_len=5)
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, cache))
        probs = model(ids, attention_mask=mask, output_attentions=True).attentions
    for layer, ctx in seen.items():
        p = probs[layer].float()  # [B, Hq, n, n]
        G = p.shape[1] // ctx.num_kv_heads
        grouped = p.view(p.shape[0], ctx.num_kv_heads, G, 24, 24)
        expected_q2c = grouped[:, :, :, -5:, :].mean(dim=(2, 3))
        torch.testing.assert_close(Q2C().score(ctx), expected_q2c, rtol=1e-4, atol=1e-5)
        expected_snap = grouped[:, :, :, -8:, :].mean(dim=(2, 3))  # every row has at least 8 real tokens
        snap = SnapKV(window=8, kernel=1).score(ctx)
        torch.testing.assert_close(snap[..., :-8], expected_snap[..., :-8], rtol=1e-4, atol=1e-5)
        assert bool((snap[..., -8:] > 2).all())  # the observation window itself is always kept
        torch.testing.assert_close(TOVA().score(ctx), grouped[:, :, :, -1, :].mean(2), rtol=1e-4, atol=1e-5)
        real = mask.bool()
        seen_by = torch.stack([torch.arange(24, 0, -1)] * 2).float()
        h2o = (grouped * real.view(2, 1, 1, 24, 1)).sum(dim=(2, 3)) / (seen_by.view(2, 1, 24) * G)
        torch.testing.assert_close(H2O(chunk=5).score(ctx)[real.unsqueeze(1).expand(2, ctx.num_kv_heads, 24)],
                                   h2o[real.unsqueeze(1).expand(2, ctx.num_kv_heads, 24)], rtol=1e-4, atol=1e-5)


def test_snapkv_pools_along_the_sequence():
    ctx_keys = torch.randn(1, 2, 20, 16)
    q = torch.randn(1, 4, 20, 16)
    from kvcache_plugins.selection import PromptLayout

    layout = PromptLayout(20, torch.zeros(1, dtype=torch.long), torch.tensor([4]), torch.zeros(1, dtype=torch.long))
    ctx = ScoreContext(0, ctx_keys, q, 0.25, None, layout)
    window = PromptLayout(20, layout.pad, torch.tensor([6]), layout.sinks)
    raw = Q2C().score(ScoreContext(0, ctx_keys, q, 0.25, None, window))  # the window's attention, unpooled
    pooled = SnapKV(window=6, kernel=5).score(ctx)
    expected = torch.nn.functional.avg_pool1d(raw.view(2, 1, 20), 5, 1, 2, count_include_pad=False).view(1, 2, 20)
    torch.testing.assert_close(pooled[..., :-6], expected[..., :-6])
    torch.testing.assert_close(pooled[0, :, -6:], (2 + torch.arange(14, 20) / 20).expand(2, 6))  # window kept


def test_h2o_memory_is_linear_in_the_prompt():
    """The scoring never materializes an n x n matrix: every softmax runs on chunk x n scores."""
    from torch.profiler import profile

    from kvcache_plugins.selection import PromptLayout

    shapes = []
    for n in (64, 256):
        layout = PromptLayout(n, torch.zeros(1, dtype=torch.long), torch.tensor([4]), torch.zeros(1, dtype=torch.long))
        ctx = ScoreContext(0, torch.randn(1, 2, n, 8), torch.randn(1, 4, n, 8), 0.3, None, layout)
        with profile(record_shapes=True) as prof:
            H2O(chunk=16).score(ctx)
        shapes += [e.input_shapes[0] for e in prof.events() if e.name == "aten::_softmax"]
    assert shapes and all(s[-2] == 16 for s in shapes)  # query rows per chunk
    assert {s[-1] for s in shapes} == {64, 256}
    assert len(shapes) == 64 // 16 + 256 // 16


def test_memory_is_freed_and_accounted():
    model = tiny_model("llama", layers=3)
    ids = prompt_ids(2, 40)
    cache = CompressedCache(model, selector="q2c", retention=0.25, question_len=4)
    _generate(model, cache, ids, max_new_tokens=5)
    for idx in cache.compressed_layers:
        layer = cache.layers[idx]
        assert layer.pending is None
        kept = 4 + -(-(40 - 4) // 4) + 4
        assert layer.stored == kept and layer.stored_keys.shape == (2, 2, kept, 16)
    fp = cache.memory_footprint()
    assert fp.full_precision == 3 * 2 * 2 * 2 * kept * 16 * 4
    assert fp.indices == 3 * 2 * kept * 4  # int32 position per slot
    assert fp.reference == 3 * 2 * 2 * 2 * 44 * 16 * 2
    assert cache.get_seq_length() == 44


def test_peak_prefill_memory_is_compressed_plus_one_layer():
    model = tiny_model("llama", layers=4)
    ids = prompt_ids(1, 64)
    peaks = {}
    for granularity in ("layer", "global"):
        cache = CompressedCache(model, selector="q2c", retention=0.25, question_len=4, granularity=granularity)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
        peaks[granularity] = (cache.peak_prefill_bytes, cache.memory_footprint().total)
    full_layer = 2 * 2 * 64 * 16 * 4
    peak, final = peaks["layer"]
    assert peak <= final + full_layer
    assert peaks["global"][0] >= 4 * full_layer  # global selection needs every layer's prompt first


def test_max_tokens_budget_at_prefill():
    model = tiny_model("mistral")
    ids = prompt_ids(1, 40)
    cache, out = _assert_oracle(model, dict(selector="snapkv", max_tokens=16, question_len=5), ids)
    assert cache.layers[0].stored == 16 + 7


@pytest.mark.parametrize("policy", ["h2o", "streaming"])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_decode_budget_keeps_cache_bounded_and_equals_masking(policy, granularity):
    model = tiny_model("llama")
    oracle = oracle_model(model)
    ids = prompt_ids(2, 24)
    cache = CompressedCache(
        model, selector="q2c", max_tokens=18, question_len=4, decode_policy=policy, evict_every=4, recent_tokens=3,
        sink_tokens=2, granularity=granularity,
    )
    full = DynamicCache(config=oracle.config)
    VISIBILITY.__init__()
    VISIBILITY.prompt_len = ids.shape[1]
    with torch.no_grad():
        a = model(ids, **cache_kwargs(model, cache)).logits[:, -1]
        b = oracle(ids, **cache_kwargs(oracle, full)).logits[:, -1]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        token = a.argmax(-1, keepdim=True)
        sizes = []
        for step in range(30):
            pos = ids.shape[1] + step
            for idx in cache.compressed_layers:
                kept = cache.kept_positions(idx)
                vis = torch.zeros(2, kept.shape[1], pos + 1, dtype=torch.bool)
                vis.scatter_(2, kept.clamp(min=0), kept >= 0)
                vis[..., pos] = True
                VISIBILITY.per_query[idx] = vis
            a = model(token, **cache_kwargs(model, cache)).logits[:, -1]
            b = oracle(token, **cache_kwargs(oracle, full)).logits[:, -1]
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            token = a.argmax(-1, keepdim=True)
            sizes.append(cache.layers[0].stored)
    assert max(sizes) <= 18 + 4 and min(sizes[10:]) >= 18
    assert cache.get_seq_length() == 24 + 30
    kept = cache.kept_positions()
    assert bool((kept[..., :2] == torch.tensor([0, 1])).all())  # sinks survive
    assert bool((kept[..., -3:] == torch.arange(51, 54)).all())  # the newest tokens survive
    VISIBILITY.__init__()


# ---------------------------------------------------------------------------------------- generate() modes


def _pair(**kwargs):
    model = tiny_model("qwen2")
    base = dict(selector="q2c", retention=0.5, question_len=QLEN)
    base.update(kwargs)
    return model, base


def test_sampling_matches_oracle():
    model, kw = _pair()
    _assert_oracle(model, kw, prompt_ids(2, 24), seed=3, do_sample=True, top_k=10)


def test_sampling_with_num_return_sequences_matches_oracle():
    model, kw = _pair(selector="snapkv", question_len=[4, 6])
    cache, out = _assert_oracle(model, kw, prompt_ids(2, 24), seed=5, do_sample=True, num_return_sequences=3)
    assert out.sequences.shape[0] == 6
    assert cache.layout.question_len.tolist() == [4, 4, 4, 6, 6, 6]  # per-row spans follow generate's expansion


def test_beam_search_and_num_return_sequences_match_oracle():
    model, kw = _pair(selector="h2o")
    _assert_oracle(model, kw, prompt_ids(2, 24), num_beams=3, num_return_sequences=2, output_logits=False)


def test_assisted_generation_matches_oracle():
    model, kw = _pair()
    assistant = tiny_model("qwen2", seed=3)
    ids = prompt_ids(1, 24)
    cache = CompressedCache(model, **kw)
    ours = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), assistant_model=assistant,
                          max_new_tokens=10, do_sample=False)
    oracle = oracle_model(model)
    # the main model's first forward held the prompt and the assistant's first candidates: that is the "prompt"
    # the cache selected from (the candidates sit in its protected tail, so rejected ones crop exactly)
    first_forward = cache.layout.length
    assert 24 < first_forward <= 24 + QLEN
    _hide_evicted(cache, first_forward, ours.shape[1])
    ref = oracle.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(oracle, DynamicCache(config=oracle.config)),
                          max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, ref)


def test_follow_up_turn_and_reset():
    model, kw = _pair(selector="snapkv")
    ids = prompt_ids(1, 24)
    cache = CompressedCache(model, **kw)
    first = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=5, do_sample=False)
    follow = torch.cat([first, prompt_ids(1, 6, seed=9)], dim=1)
    second = model.generate(follow, attention_mask=torch.ones_like(follow), **cache_kwargs(model, cache), max_new_tokens=5, do_sample=False)
    oracle = oracle_model(model)
    _hide_evicted(cache, 24, second.shape[1])
    ref = oracle.generate(follow, attention_mask=torch.ones_like(follow), **cache_kwargs(oracle, DynamicCache(config=oracle.config)),
                          max_new_tokens=5, do_sample=False)
    # the oracle replays the first answer as prompt; hidden positions stay hidden for everything after the prompt
    assert torch.equal(second, ref)
    assert cache.get_seq_length() == second.shape[1] - 1
    cache.reset()
    again = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=5, do_sample=False)
    assert torch.equal(again, first)


def test_crop_only_where_every_newest_position_is_stored():
    model, kw = _pair()
    cache = CompressedCache(model, **kw)
    ids = prompt_ids(1, 24)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
        model(ids[:, :3], **cache_kwargs(model, cache))
    cache.crop(-2)
    assert cache.get_seq_length() == 25
    cache.crop(-1 - QLEN)  # the last decoded token and the whole question span: all still stored
    assert cache.get_seq_length() == 24 - QLEN
    kept = set(cache.kept_positions()[0, 0].tolist())
    last_evicted = max(p for p in range(24 - QLEN) if p not in kept)
    with pytest.raises(ValueError, match="not all stored"):
        cache.crop(-(24 - QLEN - last_evicted))
    if 24 - QLEN - last_evicted - 1:  # crop(0) empties a cache on transformers 5.4 (a length to keep)
        cache.crop(-(24 - QLEN - last_evicted - 1))  # up to, not including, the evicted one
    assert cache.get_seq_length() == last_evicted + 1


# --------------------------------------------------------------------------------------------------- errors


class TestBadInput:
    model = tiny_model("llama")

    def test_q2c_needs_a_question_span(self):
        with pytest.raises(ValueError, match="give question_len"):
            CompressedCache(self.model, selector="q2c", retention=0.5)

    def test_retention_range(self):
        for bad in (0, 1.5, -0.1, float("nan")):
            with pytest.raises(ValueError, match=r"retention must be in \(0, 1\]"):
                CompressedCache(self.model, selector="random", retention=bad)
        for bad in (True, "0.5"):  # issue 14: booleans and strings are not numbers
            with pytest.raises(TypeError, match=r"retention must be in \(0, 1\] \(a number\)"):
                CompressedCache(self.model, selector="random", retention=bad)
        with pytest.raises(ValueError, match="give a budget"):
            CompressedCache(self.model, selector="random")

    def test_unknown_selector_and_granularity(self):
        with pytest.raises(ValueError, match=r"unknown selector 'tova2'; choose one of \['expected_attention', 'h2o', 'keydiff', 'knorm', 'lagkv', 'q2c', 'random', 'snapkv', 'streaming', 'tova'\]"):
            CompressedCache(self.model, selector="tova2", retention=0.5)
        with pytest.raises(ValueError, match=r"unknown granularity 'token'; choose one of \('layer', 'global', 'head'\)"):
            CompressedCache(self.model, selector="random", retention=0.5, granularity="token")

    def test_budget_smaller_than_protected_tokens(self):
        cache = CompressedCache(self.model, selector="q2c", max_tokens=5, question_len=8)
        with pytest.raises(ValueError, match=r"max_tokens=5 is smaller than the tokens that are always kept \(8"):
            self.model(prompt_ids(1, 20), **cache_kwargs(self.model, cache))

    def test_question_longer_than_prompt(self):
        cache = CompressedCache(self.model, selector="q2c", retention=0.5, question_len=30)
        with pytest.raises(ValueError, match=r"question span \(30 tokens\) plus sinks \(0\) is longer than the prompt \(20"):
            self.model(prompt_ids(1, 20), **cache_kwargs(self.model, cache))

    def test_query_selectors_need_the_model(self):
        with pytest.raises(ValueError, match="needs the model's queries"):
            CompressedCache(config=self.model.config, selector="snapkv", retention=0.5)
        with pytest.raises(TypeError, match="needs the model it will serve"):
            CompressedCache(selector="random", retention=0.5)

    def test_decode_policy_needs_budget_and_model(self):
        with pytest.raises(ValueError, match="needs max_tokens"):
            CompressedCache(self.model, selector="random", retention=0.5, decode_policy="h2o")
        with pytest.raises(ValueError, match=r"unknown decode_policy 'lru'"):
            CompressedCache(self.model, selector="random", max_tokens=8, decode_policy="lru")

    def test_channel_quantization_is_refused(self):
        with pytest.raises(ValueError, match="quantizes per token"):
            CompressedCache(self.model, selector="random", retention=0.5, quant="kivi4", group_size=8)

    def test_question_string_needs_tokenizer(self, tiny_tokenizer):
        with pytest.raises(ValueError, match="needs the tokenizer"):
            CompressedCache(self.model, selector="q2c", retention=0.5, question="w1 w2")
        cache = CompressedCache(self.model, selector="q2c", retention=0.5, question="w1 w2 w3", tokenizer=tiny_tokenizer)
        assert cache.question_len == 3

    def test_flash_attention_is_refused_for_observation(self):
        model = tiny_model("llama")
        model.config._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match="Load the model with attn_implementation='sdpa'"):
            CompressedCache(model, selector="q2c", retention=0.5, question_len=2)


# ------------------------------------------------------------------------------------------- no model at all


@pytest.mark.parametrize("selector", ["random", "streaming", "knorm"])
def test_query_free_selectors_work_without_the_model(selector):
    model = tiny_model("qwen2")
    ids = prompt_ids(2, 26)
    ours_cache = CompressedCache(config=model.config, selector=selector, retention=0.5, question_len=4)
    assert not observer.is_attached(model)
    observed = CompressedCache(model, selector=selector, retention=0.5, question_len=4)
    a = _generate(model, ours_cache, ids)
    b = _generate(model, observed, ids)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(ours_cache.kept_positions(), observed.kept_positions())


def test_cache_without_model_refuses_uneven_rows():
    model = tiny_model("qwen2")
    cache = CompressedCache(config=model.config, selector="random", retention=0.5, question_len=[3, 5])
    with pytest.raises(ValueError, match="cannot mask the unused slots"):
        model(prompt_ids(2, 20), **cache_kwargs(model, cache))


# ---------------------------------------------------------------------------------------------- observer


def test_observer_has_no_effect_without_a_compressed_cache_and_detaches_exactly():
    model = tiny_model("gemma3")
    ids = prompt_ids(2, 20)
    before = _generate(model, DynamicCache(config=model.config), ids)
    originals = [m.config for m in observer.attention_modules(model)]
    observer.attach(model)
    observer.attach(model)  # twice is harmless
    assert all(m.config is not c for m, c in zip(observer.attention_modules(model), originals))
    assert model.config._attn_implementation == "sdpa"
    during = _generate(model, DynamicCache(config=model.config), ids)
    assert all(torch.equal(a, b) for a, b in zip(before.logits, during.logits))
    observer.detach(model)
    assert all(m.config is c for m, c in zip(observer.attention_modules(model), originals))
    assert not observer.is_attached(model)


def test_observing_context_manager():
    model = tiny_model("llama")
    with observer.observing(model):
        assert observer.is_attached(model)
    assert not observer.is_attached(model)


def test_threads_and_models_do_not_mix():
    models = [tiny_model("llama", seed=s) for s in (0, 1)]
    ids = [prompt_ids(1, 30, seed=s) for s in (0, 1)]
    kw = dict(selector="q2c", retention=0.4, question_len=5)
    expected = [
        _generate(m, CompressedCache(m, **kw), i, max_new_tokens=12).sequences for m, i in zip(models, ids)
    ] + [_generate(models[0], CompressedCache(models[0], **kw), ids[1], max_new_tokens=12).sequences]
    jobs = [(models[0], ids[0]), (models[1], ids[1]), (models[0], ids[1])] * 3
    results: list = [None] * len(jobs)

    def run(i, m, x):
        results[i] = _generate(m, CompressedCache(m, **kw), x, max_new_tokens=12).sequences

    threads = [threading.Thread(target=run, args=(i, m, x)) for i, (m, x) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        assert torch.equal(r, expected[i % 3])


def test_a_new_selector_is_a_small_change():
    from kvcache_plugins.selection import Selector, register

    @register
    class LastTokens(Selector):
        name = "last-tokens-test"
        needs_queries = False

        def score(self, ctx):
            return torch.arange(ctx.keys.shape[2], dtype=torch.float32).view(1, 1, -1)

    assert "last-tokens-test" in selector_names()
    model = tiny_model("llama")
    cache, _ = _assert_oracle(model, dict(selector="last-tokens-test", retention=0.5, question_len=2), prompt_ids(1, 20))
    assert cache.kept_positions()[0, 0, :11].tolist() == list(range(9, 20))


def test_layers_are_compressed_layers_only_where_attention_is_full():
    model = tiny_model("gemma2", attn="eager")
    cache = CompressedCache(model, selector="q2c", retention=0.5, question_len=3)
    assert cache.compressed_layers == [1]
    assert not isinstance(cache.layers[0], CompressedLayer)
