"""Assisted generation crops every cache kind exactly, on every supported transformers release.

What assisted decoding does to the main model's cache: transformers 5.25 calls
``cache.activate_past_recording(recurrent_states_to_keep=n)`` (5.24: without arguments) before the first forward,
reads ``get_recurrent_states_to_keep()`` where it defers stop checks, and after each verification forward
``cache.crop(-rejected)`` (also ``crop(0)``, which only shrinks sliding-window layers back to their window). The
package's caches inherit the hooks from ``DynamicCache``: they reach transformers' own sliding-window layers and are
no-ops for the package's layers (no recurrent state, no window to restore).

Two oracles. End to end: transformers' own assisted decoding on the package's cache equals it on the reference
for that kind (the existing per-kind tests: ``test_fused_attention`` for the fused int4 path,
``test_mixed_precision_cache``, ``test_compressed_cache``, ``test_cache_api``'s prompt lookup; here Gemma-2's sliding
layers past the window).
Step by step, the pattern assisted decoding repeats (one forward of the candidates, ``crop(-rejected)``, the next
forward) equals a twin cache that was only ever given the accepted candidates: the cropped state is the state plain
decoding reaches, for every kind whose tokens after the prompt are stored as they come (selection, ragged adakv
budgets, chunked prefill, low-rank factors). Int4 with a residual is not in that list: a candidate forward may push
tokens out of the residual into codes that the twin keeps in the residual, which is why its end-to-end oracle is
the reference quantizer given the same calls.
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from transformers import DynamicCache

from kvcache_plugins import CompressedCache, MixedPrecisionCache
from kvcache_plugins._compat import cache_kwargs, crop_count
from kvcache_plugins.specs import make_cache

KINDS = {
    "MixedPrecisionCache(int4, fused)": lambda m: MixedPrecisionCache(m, "int4", group_size=8, residual_length=4),
    "CompressedCache(q2c, chunked prefill)": lambda m: CompressedCache(
        m, selector="q2c", retention=0.4, question_len=4
    ),
    "CompressedCache(snapkv, adakv, ragged)": lambda m: CompressedCache(
        m, selector="snapkv", retention=0.4, question_len=4, budget="adakv", granularity="head", window=4
    ),
    "LowRankCache(svd:4+int8)": lambda m: make_cache("svd:4+int8", m),
    "CompressedCache(q2c, lowrank 8)": lambda m: CompressedCache(
        m, selector="q2c", retention=0.5, question_len=4, lowrank=8
    ),
}


def _record_crops(cache) -> list[int]:
    crops: list[int] = []
    crop = cache.crop

    def recording(n: int) -> None:
        crops.append(n)
        crop(n)

    cache.crop = recording
    return crops


def _prefill(model, cache, ids, chunked: bool) -> None:
    """Store the whole prompt ``ids``, as assisted decoding's first forward does (then it crops)."""
    if chunked:
        model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), prefill_chunk_size=16,
                       max_new_tokens=1, do_sample=False, pad_token_id=0)  # selected chunk by chunk
    else:
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
    cache.crop(-1)  # the first forward's rejected candidate
    assert cache.get_seq_length() == ids.shape[1] - 1


@pytest.mark.parametrize("name", [n for n in KINDS if "int4" not in n])
def test_a_cropped_candidate_forward_equals_never_having_seen_the_rejected(name):
    model = tiny_model("llama")
    ids = prompt_ids(1, 41)
    candidates = prompt_ids(1, 6, seed=9)  # the main model's next token and 5 drafts
    accepted, bonus = candidates[:, :3], prompt_ids(1, 1, seed=11)  # 3 of 6 rows kept: 3 rejected
    ours, twin = KINDS[name](model), KINDS[name](model)
    for cache in (ours, twin):
        _prefill(model, cache, ids, "chunked" in name)
    with torch.no_grad():
        model(candidates, **cache_kwargs(model, ours))
        ours.crop(-(candidates.shape[1] - accepted.shape[1]))
        model(accepted, **cache_kwargs(model, twin))
        assert ours.get_seq_length() == twin.get_seq_length() == 40 + accepted.shape[1]
        a = model(bonus, **cache_kwargs(model, ours)).logits
        b = model(bonus, **cache_kwargs(model, twin)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with torch.no_grad():  # and decoding goes on alike
        for token in prompt_ids(1, 3, seed=12).split(1, dim=1):
            torch.testing.assert_close(model(token, **cache_kwargs(model, ours)).logits,
                                       model(token, **cache_kwargs(model, twin)).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(KINDS))
def test_past_recording_hooks_are_inherited(name):
    model = tiny_model("llama")
    cache = KINDS[name](model)
    ids = prompt_ids(1, 24)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    if hasattr(cache, "get_recurrent_states_to_keep"):  # transformers >= 5.25
        cache.activate_past_recording(recurrent_states_to_keep=3)
        assert cache.get_recurrent_states_to_keep() == 0  # no layer carries a recurrent state
    elif hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    assert cache.is_croppable
    if crop_count(24, 0) == 0:  # 5.4 reads crop(0) as a length to keep; 5.25's assisted decoding calls it as a no-op
        cache.crop(0)
    assert cache.get_seq_length() == 24


def test_sliding_window_layers_roll_back_past_the_window():
    """Gemma-2's sliding layers stay transformers' own inside the package's cache; assisted decoding past the
    window (16) relies on their past recording, which the cache must pass on."""
    model = tiny_model("gemma2", attn="eager")
    assistant = tiny_model("gemma2", attn="eager", seed=5)
    ids = prompt_ids(1, 20)
    kw = dict(assistant_model=assistant, num_assistant_tokens=4, max_new_tokens=12, do_sample=False)
    reference = DynamicCache(config=model.config)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, reference), **kw)
    cache = MixedPrecisionCache(model, "full")  # bit-identical to DynamicCache on full-attention layers
    crops = _record_crops(cache)
    ours = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), **kw)
    assert any(n < 0 for n in crops)
    assert torch.equal(ours, ref)
