"""Rules of the fused decode kernel that an oracle comparison on ordinary inputs does not pin down.

* The softmax's running maximum covers every key the step attends to: the quantized past *and* the full-precision
  tokens (sinks, residual, new). A step whose new-token scores dwarf the past's (``q.k`` in the thousands) must give
  the finite softmax ``p = exp(s - max s) / sum exp(s - max s)`` over all keys, not ``inf / inf``.
* The kernel mask memo (:func:`kvcache_plugins.attention.fused._kernel_mask`) shares one mask between the layers of
  one forward pass; a later forward with a different mask of the same size (another left padding) gets its own.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import prompt_ids, tiny_model

from kvcache_plugins import MixedPrecisionCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.attention import fused
from kvcache_plugins.quant.groupwise import quantize
from kvcache_plugins.quant.growable import GrowableQuantized

LOW = torch.finfo(torch.float32).min


def _softmax_attention(q, k, v, mask, scaling, softcap=None):
    """By hand, in float64: ``q [B, Hq, n, D]``, ``k/v [B, H, L, D]``, additive ``mask [B, 1, n, L]`` ->
    ``[B, n, Hq, D]``; ``p = exp(s - max s) / sum exp(s - max s)`` with ``s = c tanh(scaling q.k / c) + mask``
    (``c`` the soft cap; no tanh without one)."""
    R = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(R, 1), v.double().repeat_interleave(R, 1)
    s = q.double() @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s + mask.double()
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return ((e / e.sum(-1, keepdim=True)) @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("large", ["new", "past"])
@pytest.mark.parametrize("kb,kaxis,softcap", [(8, "token", None), (4, "channel", None), (8, "token", 50.0)])
def test_huge_scores_on_any_key_give_the_finite_softmax(dtype, large, kb, kaxis, softcap):
    gen = torch.Generator().manual_seed(kb + (large == "new"))
    B, H, R, D, T, F, g = 2, 2, 2, 32, 40, 4, 8
    q = torch.randn(B, H * R, 1, D, generator=gen).abs().to(dtype)  # positive: q.k grows with the key's entries
    k = torch.randn(B, H, T, D, generator=gen)
    v = torch.randn(B, H, T, D, generator=gen)
    fk = torch.randn(B, H, F, D, generator=gen)
    fv = torch.randn(B, H, F, D, generator=gen)
    big = 600.0 + torch.rand(B, H, 2, D, generator=gen)  # q.k * D^-0.5 ~ 2e3..4e3 for both keys
    if large == "new":
        fk[:, :, -2:] = big
    else:
        k[:, :, 10:12] = big
    k, v, fk, fv = (t.to(dtype) for t in (k, v, fk, fv))
    qk, qv = quantize(k, kb, g, kaxis), quantize(v, 8, g, "token")
    chunk = max(fused.chunk_tokens(fused.Layout(kb, g, kaxis, D)), fused.chunk_tokens(fused.Layout(8, g, "token", D)))
    pk, pv = GrowableQuantized(qk), GrowableQuantized(qv)
    for buf in (pk, pv):
        buf.reserve(2 * chunk, chunk)
    pk, pv = pk.buffers(), pv.buffers()
    Tp = pk.num_tokens
    mask = torch.zeros(B, 1, 1, T + F)
    mask[1, ..., :3] = LOW  # a left-padded row
    kernel_mask = torch.cat([mask[..., :T], mask.new_full((B, 1, 1, Tp - T), LOW), mask[..., T:]], dim=-1)
    out, probs = fused.fused_attention(q, pk, pv, fk, fv, kernel_mask, D**-0.5, softcap, weights=True,
                                         compiled=False)
    K = torch.cat([qk.dequantize(torch.float32), fk.float()], dim=-2)
    V = torch.cat([qv.dequantize(torch.float32), fv.float()], dim=-2)
    scores = (q.double() @ K.double().repeat_interleave(R, 1).transpose(-1, -2) * D**-0.5).amax()
    assert 1e3 < float(scores) < 1e4  # the regime the rule is about
    expected = _softmax_attention(q, K, V, mask, D**-0.5, softcap)
    assert out.dtype == dtype and bool(torch.isfinite(out).all()) and bool(torch.isfinite(probs).all())
    # fp32 rounds a score of ~3e3 to ~2e-4 (and the kernel sums in another order than the reference): the
    # probabilities of the large keys carry that error, hence more than the usual 1e-5
    tol = 5e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(probs.sum(-1).double(), torch.ones(B, H * R, 1, dtype=torch.float64))


def _reference_twin(cache: MixedPrecisionCache) -> MixedPrecisionCache:
    twin = copy.deepcopy(cache)
    twin.fused = False
    for layer in twin._quantized_layers():
        layer.fused = False
    return twin


def test_a_mask_memoised_by_sizes_is_never_reused_for_another_mask_of_the_same_size():
    """Two caches at the same length, one decode step each (three new tokens: causal among themselves), with left
    padding on different rows: both steps have masks of equal size but different content; each step equals its own
    reference path (dequantize, then sdpa). Sinks and a residual put the kernel's columns out of position order."""
    model = tiny_model("qwen2")
    ids = prompt_ids(2, 30)
    token = prompt_ids(2, 3, seed=3)
    results = []
    for padded_row in (0, 1):
        mask = torch.ones_like(ids)
        mask[padded_row, :7] = 0
        cache = MixedPrecisionCache(model, "int4", group_size=8, sink_tokens=2, residual_length=3)
        with torch.no_grad():
            model(ids, attention_mask=mask, **cache_kwargs(model, cache))
        twin = _reference_twin(cache)
        step_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
        with torch.no_grad():
            before = cache.fused_steps
            out = model(token, attention_mask=step_mask, **cache_kwargs(model, cache)).logits
            assert cache.fused_steps > before
            expected = model(token, attention_mask=step_mask, **cache_kwargs(model, twin)).logits
        results.append((out, expected))
    for out, expected in results:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(results[0][1], results[1][1])  # the two masks really differ in what they hide
