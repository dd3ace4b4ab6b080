"""The cache-spec grammar shared by Python, the benchmark and lm-eval."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, prompt_ids, tiny_model
from transformers import DynamicCache

from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins import CompressedCache, MixedPrecisionCache, ScoutMaskedCache
from kvcache_plugins.specs import load_scout, make_cache, parse_spec


@pytest.mark.parametrize(
    "text, kind, preset, selector, retention, granularity",
    [
        ("full", "full", None, None, None, "layer"),
        ("int4", "quant", "int4", None, None, "layer"),
        ("mixed_l0", "quant", "mixed_l0", None, None, "layer"),
        ("kivi2", "quant", "kivi2", None, None, "layer"),
        ("q2c:0.5", "select", None, "q2c", 0.5, "layer"),
        ("snapkv:0.25:global", "select", None, "snapkv", 0.25, "global"),
        ("h2o:0.75:head+int8", "select", "int8", "h2o", 0.75, "head"),
        ("q2c:0.5+mixed_l0", "select", "mixed_l0", "q2c", 0.5, "layer"),
        ("scout=embedded:q2c:0.5", "scout", None, "q2c", 0.5, "global"),
        ("scout=org/name-3B:snapkv:0.25:layer+int4", "scout", "int4", "snapkv", 0.25, "layer"),
        ("q2c:0.25:global@construction", "select", None, "q2c", 0.25, "global"),
        ("random:0.5+int8@construction", "select", "int8", "random", 0.5, "layer"),
        ("scout=embedded:q2c:0.5@construction", "scout", None, "q2c", 0.5, "global"),
        ("scout=/models/v1@best:q2c:0.5", "scout", None, "q2c", 0.5, "global"),  # '@' inside a path is no suffix
        ("int4@construction", "quant", "int4", None, None, "layer"),  # the transmission protocol
        ("kivi2@construction", "quant", "kivi2", None, None, "layer"),
        ("full@construction", "full", None, None, None, "layer"),
    ],
)
def test_parse(text, kind, preset, selector, retention, granularity):
    spec = parse_spec(text)
    assert (spec.kind, spec.preset, spec.selector, spec.retention, spec.granularity) == (
        kind, preset, selector, retention, granularity,
    )
    assert spec.prefill == ("construction" if text.endswith("@construction") else "post_hoc")
    if spec.kind == "scout":
        assert "@construction" not in spec.scout and spec.scout in text
    # the transmission protocol (compressing caches @construction) splits the prompt at the question
    assert spec.transmits == (spec.prefill == "construction" and kind in ("full", "quant"))
    assert spec.needs_question == (selector == "q2c" or spec.transmits)


@pytest.mark.parametrize(
    "text, why",
    [
        ("int5", "unknown preset or selector 'int5'"),
        ("q2c:1.5", r"retention 1.5 is outside \(0, 1\]"),
        ("q2c:abc", "not a number"),
        ("tova2:0.5", "unknown selector 'tova2'"),
        ("q2c:0.5:token", "unknown granularity 'token'"),
        ("q2c:0.5+int5", "unknown quantization preset 'int5'"),
        ("q2c:0.5+kivi4", "kivi presets"),
        ("int4+int8", "follows a selection"),
        ("scout=:q2c:0.5", "scout=<model id or path>"),
        ("scout=x:q2c:0.5:head", "not per-head"),
        ("q2c:0.5,int4", "commas"),
        ("q2c:0.5@prefill", "unknown prefill mode 'prefill'"),
        ("int5@construction", "follows a selection, scout or quantization spec"),
        ("q2c:0.5:head@construction", "not per-head"),
        ("q2c:0.5:global:pyramid", "budget 'pyramid' works with granularity layer or head"),
        ("q2c:0.5:layer:adakv", "budget 'adakv' works with granularity head"),
        ("q2c:0.5:pyramid@construction", "budget allocators apply to plain ones"),
        ("scout=x:q2c:0.5:layer:pyramid", "not to a scout's"),
        ("q2c:0.5:head:pyramid:adakv", r"<selector>:<retention>\[:<granularity>\]\[:<budget>\]"),
        ("", "empty spec"),
    ],
)
def test_bad_specs_name_the_valid_forms(text, why):
    with pytest.raises(ValueError, match=why) as err:
        parse_spec(text)
    assert "Valid forms: full;" in str(err.value) and "q2c" in str(err.value)


def test_make_cache_builds_each_kind():
    model = tiny_model("llama")
    ids = prompt_ids(1, 24)
    assert type(make_cache("full", model)) is DynamicCache
    assert isinstance(make_cache("int4", model), MixedPrecisionCache)
    kivi = make_cache("kivi4", model)
    assert kivi.layer_specs[0].key.axis == "channel" and kivi.layer_specs[0].residual_length >= 16
    cache = make_cache("q2c:0.5+int8", model, question_len=4)
    assert isinstance(cache, CompressedCache) and cache.layer_specs[0].key.bits == 8
    with pytest.raises(ValueError, match="needs question_len"):
        make_cache("q2c:0.5", model)
    assert isinstance(make_cache("snapkv:0.5", model), CompressedCache)  # question-agnostic: no span needed
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    direct = {
        "full": DynamicCache(config=model.config),
        "int8": MixedPrecisionCache(model, "int8", group_size=16),
        "q2c:0.5:global": CompressedCache(model, selector="q2c", retention=0.5, question_len=4, granularity="global",
                                          group_size=16),
    }
    for text, cache in direct.items():  # a spec builds the cache its name says, with the same result
        c = make_cache(text, model, question_len=4)
        ours, direct_out = (model.generate(ids, **cache_kwargs(model, x), **kw) for x in (c, cache))
        assert torch.equal(ours, direct_out), text


def test_make_cache_with_a_local_scout(tmp_path):
    tok = make_tokenizer()
    scout = tiny_model("llama", layers=1, seed=3)
    scout.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = tiny_model("llama")
    ids = prompt_ids(1, 24)
    with pytest.raises(ValueError, match="needs tokenizer= and input_ids="):
        make_cache(f"scout={tmp_path}:q2c:0.5", model, question_len=4)
    cache = make_cache(f"scout={tmp_path}:q2c:0.5+int8", model, question_len=4, tokenizer=tok, input_ids=ids)
    assert isinstance(cache, ScoutMaskedCache) and cache.selection.rows == 1
    assert load_scout(str(tmp_path), device=ids.device)[0] is load_scout(str(tmp_path), device=ids.device)[0]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    out = model.generate(ids, **cache_kwargs(model, cache), **kw)
    assert out.shape[1] == 27
    # the scout's own selection applied directly gives the same tokens
    from kvcache_plugins import Scout

    chosen = Scout(load_scout(str(tmp_path), device=ids.device)[0], tok, "q2c", 0.5).select(ids, question_len=4)
    assert cache.selection.to_bytes() == chosen.to_bytes()
    direct = ScoutMaskedCache(chosen, model, tokenizer=tok, quant="int8", group_size=16)
    assert torch.equal(out, model.generate(ids, **cache_kwargs(model, direct), **kw))


def test_construction_spec_is_the_models_own_selection_applied_during_prefill():
    from kvcache_plugins import Scout

    tok = make_tokenizer()
    model = tiny_model("qwen2")
    ids = prompt_ids(2, 24)
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match="scores the prompt before its prefill: it needs tokenizer= and input_ids="):
        make_cache("q2c:0.5:global@construction", model, question_len=4)
    cache = make_cache("q2c:0.5:global@construction", model, question_len=4, tokenizer=tok, input_ids=ids,
                       attention_mask=mask)
    own = Scout(model, tok, "q2c", 0.5, granularity="global").select(ids, mask, question_len=4)
    assert isinstance(cache, ScoutMaskedCache) and cache.mode == "construction"
    assert cache.selection.to_bytes() == own.to_bytes()
    direct = ScoutMaskedCache(own, model, tokenizer=tok, mode="construction")
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, **cache_kwargs(model, cache), **kw), model.generate(ids, **cache_kwargs(model, direct), **kw))
    # the post-hoc spec keeps the same positions but prefills with every token visible: the logits differ
    post = make_cache("q2c:0.5:global", model, question_len=4)
    a = model(ids, attention_mask=mask, **cache_kwargs(model, post)).logits[:, -1]
    b = model(ids, attention_mask=mask, **cache_kwargs(model, make_cache(
        "q2c:0.5:global@construction", model, question_len=4, tokenizer=tok, input_ids=ids, attention_mask=mask))).logits[:, -1]
    assert not torch.allclose(a, b)
