"""Quantization core: packing round trips, error bounds, byte counts, dtype safety, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_plugins.quant import code_planes, pack, packed_last_dim, packed_nbytes, quantize, unpack
from kvcache_plugins.quant.packing import codes_per_unit

BITS = (2, 3, 4, 8)


@st.composite
def codes_and_layout(draw):
    bits = draw(st.sampled_from(BITS))
    unit = codes_per_unit(bits)
    segment = unit * draw(st.integers(1, 6))
    segments = draw(st.integers(1, 4))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, segment * segments), generator=g, dtype=torch.uint8)
    return bits, segment, codes


@settings(max_examples=200, deadline=None)
@given(codes_and_layout())
def test_pack_round_trip(case):
    bits, segment, codes = case
    n = codes.shape[-1]
    packed = pack(codes, bits, segment)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == packed_last_dim(n, bits) == n * bits // 8
    assert torch.equal(unpack(packed, bits, n, segment), codes)
    # every plane p holds segment positions [p*m, (p+1)*m)
    planes = code_planes(packed, bits, n, segment)
    m = segment // codes_per_unit(bits)
    by_segment = codes.reshape(*codes.shape[:-1], n // segment, segment)
    for p, plane in enumerate(planes):
        assert torch.equal(plane.to(torch.uint8), by_segment[..., p * m : (p + 1) * m])


def test_pack_is_dense():
    codes = torch.randint(0, 16, (1000, 64), dtype=torch.uint8)
    assert pack(codes, 4).numel() == 1000 * 32
    assert pack(codes & 3, 2).numel() == 1000 * 16
    assert pack(codes & 7, 3).numel() == 1000 * 24
    assert pack(codes, 8).numel() == 1000 * 64


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"supported code widths are \(2, 3, 4, 8\)"):
        pack(torch.zeros(4, 8, dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(4, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(4, 12, dtype=torch.uint8), 3)


def _bound(q, x, out_dtype):
    """Allowed |x - x_hat|: half a stored scale, plus fp32 rounding, plus half an ulp of ``out_dtype``."""
    scale = q.scale.float()
    B, H, T, D = x.shape
    g = q.group_size
    if q.axis == "token":
        per_elem = scale.unsqueeze(-1).expand(B, H, T, D // g, g).reshape(B, H, T, D)
    else:
        per_elem = scale.unsqueeze(-2).expand(B, H, T // g, g, D).reshape(B, H, T, D)
    # fp32 arithmetic (code * scale + zero) rounds a few times, then the result is rounded into out_dtype
    fp32_slack = x.float().abs() * 4 * torch.finfo(torch.float32).eps
    # the result x_hat, |x_hat| <= |x| + scale/2, is rounded to nearest in out_dtype: half an ulp of it
    rounding = (x.float().abs() + per_elem) * torch.finfo(out_dtype).eps / 2 if out_dtype != torch.float32 else 0
    return per_elem / 2 * (1 + 1e-5) + fp32_slack + rounding + 1e-7


@settings(max_examples=120, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    axis=st.sampled_from(["token", "channel"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    groups=st.integers(1, 4),
    group_pow=st.integers(3, 5),
    tokens_groups=st.integers(1, 4),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0, 1000.0]),
    offset=st.sampled_from([0.0, 5.0, -200.0]),
    meta=st.sampled_from([None, torch.float32]),
    seed=st.integers(0, 10_000),
)
def test_quantization_error_within_bound(
    bits, axis, dtype, groups, group_pow, tokens_groups, magnitude, offset, meta, seed
):
    g = 2**group_pow
    D = g * groups if axis == "token" else 8 * groups
    T = g * tokens_groups if axis == "channel" else 3 * tokens_groups
    x = (torch.randn(2, 2, T, D, generator=torch.Generator().manual_seed(seed)) * magnitude + offset).to(dtype)
    q = quantize(x, bits, g, axis, meta_dtype=meta)
    assert q.codes.dtype == torch.uint8
    assert q.scale.dtype == meta or (meta is None and q.scale.dtype == (torch.bfloat16 if dtype == torch.bfloat16 else torch.float16))
    assert int(q.unpacked_codes().max()) <= 2**bits - 1
    x_hat = q.dequantize(dtype)
    assert x_hat.dtype == dtype and x_hat.shape == x.shape
    err = (x_hat.float() - x.float()).abs()
    assert bool((err <= _bound(q, x, dtype)).all()), float((err - _bound(q, x, dtype)).max())


def test_error_shrinks_with_bits():
    x = torch.randn(1, 4, 64, 64)
    errs = [float((quantize(x, b, 32).dequantize(torch.float32) - x).abs().mean()) for b in BITS]
    assert errs == sorted(errs, reverse=True)
    # 8 bits: error is about range / 510 per group, far below 4-bit error
    assert errs[-1] < errs[2] / 10


def test_constant_groups_are_exact():
    x = torch.full((1, 1, 4, 32), 3.25)
    for bits in BITS:
        assert torch.equal(quantize(x, bits, 32).dequantize(torch.float32), x)


def test_fp16_extremes_do_not_overflow():
    # values near the fp16 limit: max - min overflows fp16, the fp32 arithmetic must not
    x = torch.tensor([-65000.0, 65000.0] * 16).view(1, 1, 1, 32).to(torch.float16)
    q = quantize(x, 4, 32)
    assert torch.isfinite(q.scale).all() and torch.isfinite(q.zero).all()
    x_hat = q.dequantize(torch.float16)
    assert torch.isfinite(x_hat).all()
    assert float((x_hat.float() - x.float()).abs().max()) <= float(q.scale.float().max()) / 2 + 64


def test_inference_mode_then_autograd():
    # a cache filled under torch.inference_mode (generate in a benchmark) and then under plain autograd
    # (model(ids) in a notebook) must not mix inference tensors into tracked computation
    x = torch.randn(1, 2, 8, 32, requires_grad=True)
    with torch.inference_mode():
        quantize(x.detach(), 4, 32, meta_dtype=torch.float16)
    q = quantize(x * 1.0, 4, 32, meta_dtype=torch.float16)
    assert torch.isfinite(q.scale).all()


def test_fp32_values_beyond_fp16_range_raise_clearly():
    x = torch.tensor([1e6] * 32).view(1, 1, 1, 32) * torch.linspace(1, 2, 32)
    with pytest.raises(ValueError, match="scale_dtype=torch.float32"):
        quantize(x, 4, 32)
    q = quantize(x, 4, 32, meta_dtype=torch.float32)
    assert q.scale.dtype == torch.float32
    assert float((q.dequantize(torch.float32) - x).abs().max()) <= float(q.scale.max()) / 2 * 1.0001


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits", BITS)
def test_byte_count_equals_closed_form(bits, axis):
    B, H, T, D, g = 2, 4, 64, 64, 32
    q = quantize(torch.randn(B, H, T, D), bits, g, axis)
    codes, scales, zeros = q.nbytes()
    elements = B * H * T * D
    assert codes == elements * bits // 8
    assert scales == zeros == elements // g * 2  # one fp16 per group each
    # b + 32/g bits per element in total
    assert codes + scales + zeros == elements * (bits + 32 / g) / 8 == packed_nbytes((B, H, T, D), bits, g, axis)


def test_quantize_rejects_bad_input():
    x = torch.randn(1, 2, 8, 48)
    with pytest.raises(ValueError, match=r"choose|supported code widths"):
        quantize(x, 5, 16)
    with pytest.raises(ValueError, match=r"does not divide head_dim=48.*one of \[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"):
        quantize(x, 8, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize(x, 3, 12)
    with pytest.raises(ValueError, match="axis must be one of"):
        quantize(x, 4, 16, axis="head")
    with pytest.raises(ValueError, match="whole groups"):
        quantize(x, 4, 16, axis="channel")
    with pytest.raises(TypeError, match="floating point"):
        quantize(x.to(torch.int32), 4, 16)
    with pytest.raises(ValueError, match=r"\[batch, heads, tokens, head_dim\]"):
        quantize(x[0], 4, 16)


def test_tensor_ops_keep_values():
    x = torch.randn(3, 2, 16, 32)
    q = quantize(x, 4, 16)
    full = q.dequantize(torch.float32)
    idx = torch.tensor([2, 0])
    assert torch.equal(q.index_select(0, idx).dequantize(torch.float32), full[idx])
    assert torch.equal(q.repeat_interleave(2).dequantize(torch.float32), full.repeat_interleave(2, 0))
    assert torch.equal(q.keep_tokens(5).dequantize(torch.float32), full[..., :5, :])
    q2 = quantize(torch.randn(3, 2, 4, 32), 4, 16)
    assert torch.equal(q.cat(q2).dequantize(torch.float32), torch.cat([full, q2.dequantize(torch.float32)], -2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_outward_narrowing_steps_like_nextafter(dtype):
    """The bit-pattern ulp step used by the outward rounding (compilable) equals torch.nextafter, zeros and
    subnormals included."""
    from kvcache_plugins.quant.groupwise import _ulp_step

    gen = torch.Generator().manual_seed(3)
    x = torch.cat([
        torch.randn(4000, generator=gen) * 100, torch.randn(1000, generator=gen) * 1e-6,
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, 6e-8, -6e-8, 65000.0, -65000.0]),
    ]).to(dtype)
    for direction in (1, -1):
        expected = torch.nextafter(x, torch.full_like(x, direction * float("inf")))
        assert torch.equal(_ulp_step(x, direction).view(torch.int16), expected.view(torch.int16))


# ------------------------------------------------------------------------- compiled quantize-and-append
@pytest.mark.parametrize(
    "bits,axis,dtype",
    [(4, "token", torch.float32), (3, "token", torch.bfloat16), (8, "token", torch.float16), (2, "channel", torch.float32)],
)
@torch.no_grad()  # as in generate: without autograd the kernel is called straight after its first call
def test_compiled_step_quantization_equals_eager_bit_for_bit(monkeypatch, bits, axis, dtype):
    """quantize_step (one compiled kernel) stores exactly the codes, scales and zeros of quantize (eager), for one
    token and for several, batch 1 and larger; non-finite ranges still raise the eager error."""
    from kvcache_plugins import compiler
    from kvcache_plugins.quant.groupwise import quantize_step

    monkeypatch.setattr(compiler, "COMPILE", True)
    gen = torch.Generator().manual_seed(bits)
    g = 8 if axis == "channel" else 16
    for B, n in [(1, 1 if axis == "token" else g), (3, 1 if axis == "token" else g), (2, 4 if axis == "token" else g)]:
        for _ in range(3):
            x = (torch.randn(B, 2, n, 32, generator=gen) * torch.rand(1, generator=gen) * 50).to(dtype)
            got, want = quantize_step(x, bits, g, axis), quantize(x, bits, g, axis)
            for a, b in ((got.codes, want.codes), (got.scale, want.scale), (got.zero, want.zero)):
                assert a.dtype == b.dtype and torch.equal(a, b)
    kernels = [k for k in compiler.Kernel._all if k.name.startswith(f"quantize_{bits}b_g{g}_{axis}")]
    assert kernels and kernels[-1]._direct  # later calls skip dynamo's guards
    if dtype == torch.float32:
        x = torch.randn(1, 2, 1 if axis == "token" else g, 32)
        x[0, 0, 0, :2] = torch.tensor([-1e38, 1e38])
        with pytest.raises(ValueError, match="exceed the range"):
            quantize_step(x, bits, g, axis)


@torch.no_grad()
def test_a_kernel_past_its_recompile_limit_warns_once_and_falls_back(monkeypatch):
    """A kernel that meets more input specialisations than the limit does not fail (dynamo's fullgraph default would):
    it warns once, that call takes the eager path (same result), and the compiler stays usable."""
    import warnings

    from kvcache_plugins import compiler
    from kvcache_plugins.quant.groupwise import quantize_step

    monkeypatch.setattr(compiler, "COMPILE", True)
    monkeypatch.setattr(compiler, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(compiler, "_over_limit", set())
    monkeypatch.setattr(compiler, "_broken", [])
    gen = torch.Generator().manual_seed(0)
    one, three = torch.randn(2, 3, 1, 24, generator=gen), torch.randn(2, 3, 3, 24, generator=gen)  # a fresh kernel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in (one, three, three):  # one new token, then several: a second specialisation
            got, want = quantize_step(x, 4, 8), quantize(x, 4, 8)
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale)
    messages = [str(w.message) for w in caught if "input specialisations" in str(w.message)]
    assert len(messages) == 1 and compiler.compiler_broken() is None
