"""The hand-written CPU decode kernel equals the reference path, and the cache takes the fastest path it can run.

The kernel is built once per machine (a minute on two cores the first time; later runs load it from the torch
extensions directory). Where no C++ compiler works the kernel tests are skipped; the path choice is still tested.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import prompt_ids, tiny_model
from test_fused_attention import LAYOUTS, LOW, _compressed_stepwise, _padded, _stepwise, reference_attention

from kvcache_plugins import CompressedCache, MixedPrecisionCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.attention import cpu_kernel, fused, paths
from kvcache_plugins.quant.groupwise import quantize

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    OP = cpu_kernel.load()
needs_kernel = pytest.mark.skipif(OP is None, reason=f"C++ kernel unavailable: {cpu_kernel.unavailable()}")


@pytest.fixture
def cpp_path(monkeypatch):
    monkeypatch.setenv("KVCACHE_PLUGINS_DECODE_PATH", "cpp")


@needs_kernel
@pytest.mark.parametrize("kb,kaxis,vb,vaxis", LAYOUTS)
@pytest.mark.parametrize("queries,softcap", [(1, None), (3, None), (2, 30.0)])
@pytest.mark.parametrize("meta", [torch.float16, torch.bfloat16, torch.float32])
def test_kernel_matches_dequantize_then_attend(kb, kaxis, vb, vaxis, queries, softcap, meta):
    """Every layout, GQA, several queries, soft-cap, left padding, unused slots in the middle and past the stored
    tokens: the output and the probabilities equal plain attention over the dequantized tensors."""
    gen = torch.Generator().manual_seed(kb * 10 + vb + queries)
    B, H, R, D, T, F, g = 2, 2, 3, 32, 200, 5, 8
    k, v = torch.randn(B, H, T, D, generator=gen), torch.randn(B, H, T, D, generator=gen) * 3
    qk, qv = quantize(k, kb, g, kaxis, meta), quantize(v, vb, g, vaxis, meta)
    fk, fv = torch.randn(B, H, F, D, generator=gen) * 4, torch.randn(B, H, F, D, generator=gen)
    q = torch.randn(B, H * R, queries, D, generator=gen)
    mask = torch.zeros(B, 1, queries, T + F)
    mask[0, ..., :7] = LOW
    mask[1, ..., 50:60] = LOW
    chunk = max(fused.chunk_tokens(fused.Layout(kb, g, kaxis, D)), fused.chunk_tokens(fused.Layout(vb, g, vaxis, D)))
    pk, pv = _padded(qk, chunk), _padded(qv, chunk)
    Tp = pk.num_tokens
    kernel_mask = torch.cat([mask[..., :T], mask.new_full((B, 1, queries, Tp - T), LOW), mask[..., T:]], dim=-1)
    out, probs = fused.fused_attention(q, pk, pv, fk, fv, kernel_mask, D**-0.5, softcap, True, path="cpp", valid=T)
    K = torch.cat([qk.dequantize(torch.float32), fk], dim=-2)
    V = torch.cat([qv.dequantize(torch.float32), fv], dim=-2)
    torch.testing.assert_close(out, reference_attention(q, K, V, mask, D**-0.5, softcap), rtol=1e-5, atol=1e-5)
    eager = fused.fused_attention(q, pk, pv, fk, fv, kernel_mask, D**-0.5, softcap, True, path="eager")
    torch.testing.assert_close(probs, eager[1], rtol=1e-5, atol=1e-6)
    assert float(probs[..., T:Tp].abs().max()) == 0.0 and float(probs[0, ..., :7].abs().max()) == 0.0


@needs_kernel
def test_new_tokens_raise_the_running_max():
    """The full-precision tokens come after the packed past: their scores, far above the past's, must rescale what
    was accumulated (a kernel whose running max skipped them would overflow or weigh the past wrongly)."""
    gen = torch.Generator().manual_seed(0)
    B, H, D, T = 1, 1, 64, 300
    qk, qv = (quantize(torch.randn(B, H, T, D, generator=gen), 4, 32) for _ in range(2))
    q = torch.randn(B, H, 1, D, generator=gen)
    fk, fv = q.clone() * 40, torch.randn(B, H, 1, D, generator=gen)  # scores of ~ 40 |q|^2 / 8
    pk, pv = _padded(qk, 128), _padded(qv, 128)
    mask = torch.zeros(B, 1, 1, pk.num_tokens + 1)
    mask[..., T : pk.num_tokens] = LOW
    out, _ = fused.fused_attention(q, pk, pv, fk, fv, mask, D**-0.5, path="cpp", valid=T)
    K = torch.cat([qk.dequantize(torch.float32), fk], dim=-2)
    V = torch.cat([qv.dequantize(torch.float32), fv], dim=-2)
    expected = reference_attention(q, K, V, torch.zeros(B, 1, 1, T + 1), D**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_in_half_precision_models(dtype):
    gen = torch.Generator().manual_seed(1)
    B, H, R, D, T, F = 2, 2, 2, 64, 140, 3
    qk, qv = (quantize(torch.randn(B, H, T, D, generator=gen).to(dtype), 4, 32) for _ in range(2))
    pk, pv = _padded(qk, 128), _padded(qv, 128)
    fk, fv = (torch.randn(B, H, F, D, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(B, H * R, 1, D, generator=gen).to(dtype)
    mask = torch.zeros(B, 1, 1, pk.num_tokens + F)
    mask[..., T : pk.num_tokens] = LOW
    out, _ = fused.fused_attention(q, pk, pv, fk, fv, mask, D**-0.5, path="cpp", valid=T)
    eager, _ = fused.fused_attention(q, pk, pv, fk, fv, mask, D**-0.5, path="eager")
    assert out.dtype == dtype and out.shape == (B, 1, H * R, D)
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)


CASES = {
    "int8": dict(spec="int8", group_size=8),
    "int4": dict(spec="int4", group_size=16),
    "int3": dict(spec="int3", group_size=8),
    "int2": dict(spec="int2", group_size=16),
    "channel keys": dict(spec="int4", group_size=4, key_axis="channel", residual_length=6),
    "residual+sinks": dict(spec="int4", group_size=16, residual_length=5, sink_tokens=3),
}


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "phi3"])
@pytest.mark.parametrize("case", list(CASES))
def test_cpp_decode_matches_reference_path(arch, case, cpp_path):
    """Step by step through the model (left padding, then multi-token steps): logits within 1e-4 of the
    reference path from the same stored codes, the same greedy tokens."""
    model = tiny_model(arch)
    ids = prompt_ids(2, 37)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    cache = MixedPrecisionCache(model, **CASES[case])
    _stepwise(model, cache, ids, 6, mask)
    _stepwise(model, cache, ids[:, :5], 2, torch.cat([mask, torch.ones(2, 6 + 5)], 1).long(), new_tokens=4)
    assert cache.decode_path.name == "cpp"


@needs_kernel
@pytest.mark.parametrize("decode_policy", [None, "h2o"])
def test_cpp_compressed_cache_matches_reference_path(decode_policy, cpp_path):
    """Unused slots (per-row question lengths, left padding) masked; with h2o the kernel's probabilities feed the
    accumulated attention exactly as the reference path recomputes it."""
    model = tiny_model("qwen2")
    ids = prompt_ids(3, 40)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    extra = dict(max_tokens=24, decode_policy="h2o", evict_every=3) if decode_policy else {}
    cache = CompressedCache(model, selector="snapkv", retention=0.5, question_len=[4, 7, 5], quant="int4",
                            group_size=16, **extra)

    def same_attention(cache, twin):
        for i in cache.compressed_layers:
            if cache.layers[i].acc is not None:
                torch.testing.assert_close(cache.layers[i].acc, twin.layers[i].acc, rtol=1e-5, atol=1e-5)
                assert torch.equal(cache.layers[i].positions, twin.layers[i].positions)

    _compressed_stepwise(model, cache, ids, mask, 8, each_step=same_attention)
    assert cache.decode_path.name == "cpp"


def test_decode_path_is_timed_once_and_explained(monkeypatch):
    """auto: the candidates are timed once per step signature; the fastest is kept and the reason names them all."""
    monkeypatch.setenv("KVCACHE_PLUGINS_DECODE_PATH", "auto")
    monkeypatch.setattr(paths, "_decided", {})
    model = tiny_model("llama")
    ids = prompt_ids(1, 20)
    cache = MixedPrecisionCache(model, "int4", group_size=16)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                       **cache_kwargs(model, cache))
    path = cache.decode_path
    assert path.name in paths.available(torch.device("cpu")) + ["reference"]
    assert path.timings[path.name] == min(path.timings.values()) and "reference" in path.timings
    assert str(path).startswith(f"{path.name}: ") and "per layer-step" in path.reason
    assert len(paths._decided) == 1  # both layers share one signature: timed once


def test_reference_decision_takes_the_reference_path_from_then_on(monkeypatch):
    monkeypatch.setenv("KVCACHE_PLUGINS_DECODE_PATH", "reference")
    model = tiny_model("llama")
    ids = prompt_ids(1, 20)
    expected = MixedPrecisionCache(model, "int4", group_size=16, fused=False)
    cache = MixedPrecisionCache(model, "int4", group_size=16)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    a = model.generate(ids, **cache_kwargs(model, expected), **kwargs)
    b = model.generate(ids, **cache_kwargs(model, cache), **kwargs)
    assert torch.equal(a.sequences, b.sequences) and cache.fused_steps == 0
    assert all(layer.reference_decode for layer in cache._quantized_layers())
    assert cache.decode_path.name == "reference"


def test_bad_switches_are_refused(monkeypatch):
    monkeypatch.setenv("KVCACHE_PLUGINS_DECODE_PATH", "fastest")
    with pytest.raises(ValueError, match="KVCACHE_PLUGINS_DECODE_PATH='fastest'"):
        paths.forced()
    monkeypatch.setenv("KVCACHE_PLUGINS_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="choose one of"):
        cpu_kernel.requested_isa()


def test_no_compiler_warns_once_and_returns_none(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu_kernel.load("generic") is None and cpu_kernel.load("generic") is None
    messages = [str(w.message) for w in caught if "C++ decode kernel" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0]


def test_positions_and_h2o_accumulators_grow_in_place():
    """Per-slot positions and accumulated attention take a decode step's slots into spare capacity: the buffers are
    reallocated O(log) times, not every step, and read exactly what the copying version held."""
    model = tiny_model("qwen2")
    ids = prompt_ids(1, 40)
    cache = CompressedCache(model, selector="snapkv", retention=0.5, question_len=4, quant="int4", group_size=16,
                            max_tokens=200, decode_policy="h2o")
    buffers = set()
    with torch.no_grad():
        out = model(ids, **cache_kwargs(model, cache))
        layer = cache.layers[cache.compressed_layers[0]]
        for _ in range(30):
            out = model(out.logits[:, -1:].argmax(-1), **cache_kwargs(model, cache))
            buffers.add(layer.__dict__["_positions"][0].data_ptr())
    S = layer.stored
    assert layer.positions.shape[-1] == S and layer.acc.shape[-1] == S and len(buffers) <= 4
    assert torch.equal(layer.positions[0, 0, -30:], torch.arange(40, 70, dtype=torch.int32))
    assert bool((layer.acc >= 0).all()) and float(layer.acc[..., -1].sum()) > 0  # the newest slot was attended
