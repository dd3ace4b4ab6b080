"""MixedPrecisionCache inside real transformers models: equivalence, oracle agreement, every generate() mode."""

from __future__ import annotations

import pytest
import torch
from conftest import CORE_ARCHITECTURES, prompt_ids, tiny_model
from reference import reference_cache
from transformers import DynamicCache

import kvcache_plugins.layers.stream as layers_module
from kvcache_plugins import LayerQuantSpec, MixedPrecisionCache, TensorQuantSpec
from kvcache_plugins._compat import cache_kwargs, crop_count
from kvcache_plugins.layers.mixed import MixedPrecisionLayer

GREEDY = dict(do_sample=False, max_new_tokens=8, output_logits=True, return_dict_in_generate=True)


def _generate(model, cache, ids, **kwargs):
    args = {**GREEDY, **kwargs}
    attention_mask = args.pop("attention_mask", torch.ones_like(ids))
    return model.generate(ids, attention_mask=attention_mask, **cache_kwargs(model, cache), **args)


def _assert_same_generation(a, b, exact: bool):
    assert torch.equal(a.sequences, b.sequences)
    for la, lb in zip(a.logits, b.logits):
        if exact:
            assert torch.equal(la, lb)
        else:
            torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
@pytest.mark.parametrize("spec", ["full", {"default": 16}, [16, 16]])
def test_sixteen_bits_is_bit_identical_to_dynamic_cache(arch, attn, spec):
    model = tiny_model(arch, attn)
    ids = prompt_ids(2, 20)
    ref = _generate(model, DynamicCache(config=model.config), ids)
    ours = _generate(model, MixedPrecisionCache(model, spec, group_size=16), ids)
    _assert_same_generation(ref, ours, exact=True)


SPECS = {
    "int4": dict(spec="int4", group_size=16),
    "int8": dict(spec="int8", group_size=8),
    "int3": dict(spec="int3", group_size=8),
    "int2": dict(spec="int2", group_size=16),
    "mixed_l0": dict(spec="mixed_l0", group_size=16),
    "per-layer dict": dict(spec={0: 8, 1: 3, "default": 16}, group_size=8),
    "kv differ": dict(spec={"default": {"key": 8, "value": 4}}, group_size=16),
    "channel keys": dict(spec="int4", group_size=4, key_axis="channel", residual_length=6),
    "residual+sinks": dict(spec="int4", group_size=16, residual_length=5, sink_tokens=3),
    "kivi2": dict(spec="kivi2", group_size=8, residual_length=8),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
@pytest.mark.parametrize("case", list(SPECS))
def test_quantized_cache_matches_reference(arch, attn, case):
    model = tiny_model(arch, attn)
    ids = prompt_ids(2, 21)
    cache = MixedPrecisionCache(model, **SPECS[case])
    ref = _generate(model, reference_cache(model, cache.layer_specs), ids)
    ours = _generate(model, cache, ids)
    _assert_same_generation(ref, ours, exact=False)
    assert cache.get_seq_length() == ids.shape[1] + 7  # the last token is never fed back


def _pair(arch="llama", attn="sdpa", **spec):
    model = tiny_model(arch, attn)
    spec = spec or dict(spec="int4", group_size=16)
    make = lambda: MixedPrecisionCache(model, **spec)  # noqa: E731
    return model, make, (lambda: reference_cache(model, make().layer_specs))


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_sampling(arch):
    model, ours, ref = _pair(arch)
    ids = prompt_ids(2, 16)
    kwargs = dict(do_sample=True, top_k=20, temperature=0.9, max_new_tokens=10)
    torch.manual_seed(123)
    a = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ref()), **kwargs)
    torch.manual_seed(123)
    b = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ours()), **kwargs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_beam_search(arch):
    model, ours, ref = _pair(arch, spec="int4", group_size=8, residual_length=3, sink_tokens=2)
    ids = prompt_ids(2, 16)
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=False)
    a = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ref()), **kwargs)
    b = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ours()), **kwargs)
    assert torch.equal(a, b)
    full = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, DynamicCache(config=model.config)), **kwargs)
    same = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, MixedPrecisionCache(model, "full")), **kwargs)
    assert torch.equal(full, same)


def test_num_return_sequences_with_sampling():
    model, ours, ref = _pair("qwen2")
    ids = prompt_ids(2, 16)
    kwargs = dict(do_sample=True, num_return_sequences=3, max_new_tokens=6)
    torch.manual_seed(7)
    a = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ref()), **kwargs)
    torch.manual_seed(7)
    b = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ours()), **kwargs)
    assert a.shape[0] == 6 and torch.equal(a, b)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_left_padded_batch(arch, attn):
    model, ours, ref = _pair(arch, attn)
    ids = prompt_ids(3, 18)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    a = _generate(model, ref(), ids, attention_mask=mask)
    b = _generate(model, ours(), ids, attention_mask=mask)
    _assert_same_generation(a, b, exact=False)
    # 16 bits with padding: still bit-identical to DynamicCache
    c = _generate(model, DynamicCache(config=model.config), ids, attention_mask=mask)
    d = _generate(model, MixedPrecisionCache(model, "full"), ids, attention_mask=mask)
    _assert_same_generation(c, d, exact=True)


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_assisted_generation_crops_exactly(arch):
    model, ours, ref = _pair(arch)
    assistant = tiny_model(arch, seed=5)
    ids = prompt_ids(1, 16)
    kwargs = dict(assistant_model=assistant, max_new_tokens=12, do_sample=False)
    cache = ours()
    a = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ref()), **kwargs)
    b = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), **kwargs)
    assert torch.equal(a, b)
    # at 16 bits assisted decoding reproduces plain greedy decoding
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assisted = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, MixedPrecisionCache(model, "full")), **kwargs)
    assert torch.equal(plain, assisted)


def test_assisted_generation_with_channel_keys_inside_residual():
    model, ours, ref = _pair("llama", spec="kivi4", group_size=4, residual_length=16)
    assistant = tiny_model("llama", seed=5)
    ids = prompt_ids(1, 30)
    kwargs = dict(assistant_model=assistant, max_new_tokens=12, do_sample=False, num_assistant_tokens=5)
    a = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ref()), **kwargs)
    b = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ours()), **kwargs)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_follow_up_turn_on_same_cache(arch):
    model, ours, ref = _pair(arch, spec="int4", group_size=16, residual_length=4)
    first = prompt_ids(1, 14, seed=1)
    outs = []
    for cache in (ref(), ours()):
        turn1 = model.generate(first, attention_mask=torch.ones_like(first), **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False)
        follow = torch.cat([turn1, prompt_ids(1, 5, seed=2)], dim=1)
        turn2 = model.generate(follow, attention_mask=torch.ones_like(follow), **cache_kwargs(model, cache), max_new_tokens=6, do_sample=False)
        outs.append(turn2)
        assert cache.get_seq_length() == turn2.shape[1] - 1
    assert torch.equal(outs[0], outs[1])


def test_reset_makes_cache_reusable():
    model, ours, _ = _pair("mistral")
    ids = prompt_ids(1, 15)
    cache = ours()
    first = _generate(model, cache, ids)
    cache.reset()
    assert cache.get_seq_length() == 0
    again = _generate(model, cache, ids)
    fresh = _generate(model, ours(), ids)
    _assert_same_generation(again, fresh, exact=True)
    _assert_same_generation(first, fresh, exact=True)


def test_manual_forward_loop_and_cache_api():
    model = tiny_model("qwen2")
    ids = prompt_ids(2, 12)
    cache = MixedPrecisionCache(model, "int8", group_size=8)
    ref = reference_cache(model, cache.layer_specs)
    with torch.no_grad():
        a = model(ids, **cache_kwargs(model, cache)).logits
        b = model(ids, **cache_kwargs(model, ref)).logits
        torch.testing.assert_close(a, b)
        step = ids[:, -1:]
        for _ in range(3):
            a = model(step, **cache_kwargs(model, cache)).logits
            b = model(step, **cache_kwargs(model, ref)).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            step = a[:, -1:].argmax(-1)
    assert len(cache) == 2 and cache.get_seq_length() == 15
    keys, values, _ = next(iter(cache))
    assert keys.shape == (2, 2, 15, 16) and values.shape == keys.shape
    cache.crop(-4)
    assert cache.get_seq_length() == 11
    cache.batch_select_indices(torch.tensor([1]))
    assert next(iter(cache))[0].shape[0] == 1


def _closed_form(spec: LayerQuantSpec, B, H, T, D, full_bytes=4, meta_bytes=2) -> int:
    total = 0
    for t in (spec.key, spec.value):
        if not t.quantized:
            total += B * H * T * D * full_bytes
            continue
        q = max(0, T - spec.sink_tokens - spec.residual_length)
        if t.axis == "channel":
            q -= q % t.group_size
        elements = B * H * q * D
        total += elements * t.bits // 8 + 2 * (elements // t.group_size) * meta_bytes
        total += B * H * (T - q) * D * full_bytes
    return total


@pytest.mark.parametrize("case", ["int4", "int3", "int2", "mixed_l0", "residual+sinks", "channel keys", "kivi2"])
def test_bytes_held_equal_closed_form(case):
    model = tiny_model("llama", layers=3)
    cache = MixedPrecisionCache(model, **SPECS[case])
    ids = prompt_ids(2, 33)
    _generate(model, cache, ids, max_new_tokens=9)
    T = cache.get_seq_length()
    fp = cache.memory_footprint()
    expected = sum(_closed_form(s, 2, 2, T, 16) for s in cache.layer_specs)
    assert fp.total == expected
    assert fp.reference == 3 * 2 * 2 * 2 * T * 16 * 2  # layers * K,V * batch * heads * tokens * head_dim * 2 bytes
    dynamic_bytes = 3 * 2 * 2 * 2 * T * 16 * 4
    assert fp.total < dynamic_bytes
    quantized = [layer for layer in cache.layers if isinstance(layer, MixedPrecisionLayer)]
    assert all(stream.body is None or stream.body.codes.dtype == torch.uint8 for layer in quantized for stream in layer.streams)


def test_each_token_is_quantized_once(monkeypatch):
    calls = []

    def counting(real):
        def wrapped(x, *args, **kwargs):
            calls.append(x.shape[-2])
            return real(x, *args, **kwargs)

        return wrapped

    # fused layers quantize decode steps through quantize_step (the compiled kernel), the rest through quantize
    monkeypatch.setattr(layers_module, "quantize", counting(layers_module.quantize))
    monkeypatch.setattr(layers_module, "quantize_step", counting(layers_module.quantize_step))
    model = tiny_model("llama", layers=1)
    cache = MixedPrecisionCache(model, "int4", group_size=16, residual_length=4)
    ids = prompt_ids(1, 40)
    _generate(model, cache, ids, max_new_tokens=20)
    T = cache.get_seq_length()
    # K and V are one stream here: every stored token went through quantize exactly once, minus the residual
    assert sum(calls) == T - 4
    assert calls[0] == 36 and set(calls[1:]) == {1}


def test_body_is_never_requantized():
    model = tiny_model("llama", layers=1)
    cache = MixedPrecisionCache(model, "int4", group_size=16)
    ids = prompt_ids(1, 30)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
        stream = cache.layers[0].streams[0]
        before = stream.body.codes.clone(), stream.body.scale.clone()
        step = ids[:, -1:]
        for _ in range(5):
            model(step, **cache_kwargs(model, cache))
        assert torch.equal(stream.body.codes[..., :30, :], before[0])
        assert torch.equal(stream.body.scale[..., :30, :], before[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = tiny_model("qwen2", dtype=dtype)
    ids = prompt_ids(2, 20)
    cache = MixedPrecisionCache(model, "int4", group_size=16)
    ref = reference_cache(model, cache.layer_specs)
    a = _generate(model, ref, ids)
    b = _generate(model, cache, ids)
    assert torch.equal(a.sequences, b.sequences)
    scale = cache.layers[0].streams[0].body.scale
    assert scale.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
    full = _generate(model, DynamicCache(config=model.config), ids)
    same = _generate(model, MixedPrecisionCache(model, "full"), ids)
    _assert_same_generation(full, same, exact=True)


def test_sliding_window_layers_stay_full_precision_and_are_named(caplog):
    model = tiny_model("gemma2", attn="eager")
    with caplog.at_level("WARNING"):
        cache = MixedPrecisionCache(model, "int4", group_size=16)
    assert cache.unquantized_layers == ["layer 0: DynamicSlidingWindowLayer kept at model precision"]
    assert "layer 0: DynamicSlidingWindowLayer" in caplog.text
    assert "model precision (DynamicSlidingWindowLayer)" in cache.describe()
    ids = prompt_ids(1, 30)
    ref = _generate(model, reference_cache(model, cache.layer_specs), ids)
    ours = _generate(model, cache, ids)
    _assert_same_generation(ref, ours, exact=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to place layers on two devices")
def test_layers_on_different_devices():
    model = tiny_model("llama", layers=2)
    model.model.layers[1].to("cuda")
    model.model.norm.to("cuda")
    model.lm_head.to("cuda")
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(model.model.layers[1], AlignDevicesHook(execution_device="cuda", io_same_device=False))
    add_hook_to_module(model.model.norm, AlignDevicesHook(execution_device="cuda"))
    add_hook_to_module(model.lm_head, AlignDevicesHook(execution_device="cuda"))
    cache = MixedPrecisionCache(model, "int4", group_size=16)
    ids = prompt_ids(1, 12)
    model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=4, do_sample=False)
    assert cache.layers[0].streams[0].body.codes.device.type == "cpu"
    assert cache.layers[1].streams[0].body.codes.device.type == "cuda"


class TestBadInput:
    model = tiny_model("llama")

    def test_unsupported_bits(self):
        with pytest.raises(ValueError, match=r"choose one of \(2, 3, 4, 8, 16\)"):
            MixedPrecisionCache(self.model, 5)
        with pytest.raises(ValueError, match=r"choose one of \(2, 3, 4, 8, 16\)"):
            MixedPrecisionCache(self.model, {0: 6})

    def test_group_size_must_divide_head_dim(self):
        with pytest.raises(ValueError, match=r"group_size=32 does not divide head_dim=16.*\[2, 4, 8, 16\]"):
            MixedPrecisionCache(self.model, "int4", group_size=32)

    def test_group_size_must_hold_whole_packing_units(self):
        with pytest.raises(ValueError, match="multiple of 8"):
            MixedPrecisionCache(self.model, "int3", group_size=4)

    def test_layer_index_beyond_model(self):
        with pytest.raises(ValueError, match=r"layer index 2 is beyond the model: valid layer indices are 0..1"):
            MixedPrecisionCache(self.model, {2: 4}, group_size=16)
        with pytest.raises(ValueError, match="exactly 2 entries"):
            MixedPrecisionCache(self.model, [4, 4, 4], group_size=16)

    def test_unknown_preset(self):
        with pytest.raises(ValueError, match=r"unknown preset 'int5'; valid presets: full, int8, int4"):
            MixedPrecisionCache(self.model, "int5")

    def test_bad_types(self):
        with pytest.raises(TypeError, match="unsupported spec of type float"):
            MixedPrecisionCache(self.model, 4.0)
        with pytest.raises(TypeError, match="layer indices"):
            MixedPrecisionCache(self.model, {"0": 4}, group_size=16)
        with pytest.raises(TypeError, match="PreTrainedModel or PretrainedConfig"):
            MixedPrecisionCache("llama", "int4")
        with pytest.raises(ValueError, match="scale_dtype must be one of"):
            MixedPrecisionCache(self.model, "int4", group_size=16, scale_dtype=torch.int8)

    def test_channel_axis_needs_residual(self):
        with pytest.raises(ValueError, match=r"residual window of at least group_size tokens; got residual_length=0"):
            MixedPrecisionCache(self.model, "int4", group_size=16, key_axis="channel")
        with pytest.raises(ValueError, match=r"key_axis must be one of \('token', 'channel'\)"):
            MixedPrecisionCache(self.model, "int4", group_size=16, key_axis="head")

    def test_keys_and_values_of_different_dtype(self):
        cache = MixedPrecisionCache(self.model, "int4", group_size=16)
        k = torch.randn(1, 2, 4, 16)
        with pytest.raises(TypeError, match=r"keys torch.float32 and values torch.float16"):
            cache.update(k, k.half(), 0)
        cache.update(k, k, 0)
        with pytest.raises(TypeError, match="stores torch.float32"):
            cache.update(k.half(), k.half(), 0)

    def test_crop_conventions(self):
        cache = MixedPrecisionCache(self.model, "int4", group_size=16)
        cache.update(torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), 0)
        cache.crop(-2)  # remove two tokens
        assert cache.get_seq_length() == 7
        try:
            crop_count(7, 5)
        except ValueError:  # 5.23 on: positive values are refused, as by transformers' own DynamicLayer
            with pytest.raises(ValueError, match="positive"):
                cache.crop(5)
            cache.crop(0)
            assert cache.get_seq_length() == 7
        else:  # releases whose DynamicLayer.crop takes a length to keep (5.4)
            cache.crop(5)
            assert cache.get_seq_length() == 5
            cache.crop(8)
            assert cache.get_seq_length() == 5


def test_spec_objects_are_accepted():
    model = tiny_model("llama")
    spec = LayerQuantSpec(TensorQuantSpec(4, "channel", 8), TensorQuantSpec(8, "token", 16), residual_length=8)
    cache = MixedPrecisionCache(model, {0: spec, "default": TensorQuantSpec(3, "token", 8)})
    assert cache.layer_specs[0] == spec
    assert cache.layer_specs[1].key == TensorQuantSpec(3, "token", 8)
    assert "int4/channel/g8" in cache.describe() and "int3/token/g8" in cache.describe()


def test_quantization_really_changes_outputs():
    """Guards the oracle tests above: low-bit storage must move the logits away from the full cache."""
    model = tiny_model("llama")
    ids = prompt_ids(2, 24)
    full = _generate(model, DynamicCache(config=model.config), ids)
    int2 = _generate(model, MixedPrecisionCache(model, "int2", group_size=16), ids)
    int8 = _generate(model, MixedPrecisionCache(model, "int8", group_size=16), ids)
    gap2 = max(float((a - b).abs().max()) for a, b in zip(full.logits[1:], int2.logits[1:]))
    gap8 = max(float((a - b).abs().max()) for a, b in zip(full.logits[1:], int8.logits[1:]))
    assert gap2 > 1e-2 and 0 < gap8 < gap2
    # the first new token comes from the prompt's own forward pass, which attends at full precision
    assert torch.equal(full.logits[0], int2.logits[0])
