"""Issue 25 (5): low rank with pre-RoPE keys under every scaled rope type equals ``DynamicCache`` at full rank.

The rule (``kvcache_plugins/layers/rope.py``): a pre-RoPE low-rank layer undoes the model's own rotation of each
key, ``x = (k cos - rotate_half(k) sin) / (cos^2 + sin^2)`` (exact also when the rope type scales ``cos`` and
``sin``), factors ``x`` and rotates the reconstruction back at the key's position. At rank = head_dim the
factorisation is exact, so attention must see the keys ``DynamicCache`` holds: same logits (fp32, within 1e-4) and
the same greedy tokens, for each rope type transformers offers for these models. Prompts stay below the original
context and generations cross it, or prompts start beyond it: ``longrope`` switches factors at that length, so the
rotation the cache re-applies must be the one the model applied to that key.

``dynamic`` (NTK) is refused for pre-RoPE keys with a ``ValueError`` naming ``keys='post_rope'``: its frequencies
grow with every forward past the original context, so ``DynamicCache`` holds each key rotated at the frequencies
of the step that computed it, which a rotation by position cannot re-apply (found by this file: beyond the
original context it differed from ``DynamicCache`` by 1e-3 to 3e-3 in the logits). Post-RoPE keys serve it.

transformers' dynamic rotary embedding is itself stateful (the frequencies a forward uses depend on the longest
sequence seen before), so every run below gets a freshly built model (same seed, same weights).
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from transformers import DynamicCache

from kvcache_plugins import CompressedCache, LowRankCache
from kvcache_plugins._compat import cache_kwargs

HEAD_DIM = 16
ORIGINAL = 24  # original context of the scaled rope types: the tests cross it

ROPES = {
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}),
    "yarn": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    "yarn with attention_factor": (
        "llama", {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.7, "original_max_position_embeddings": ORIGINAL},
    ),
    "llama3": ("llama", {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    }),
    "longrope": ("phi3", {
        "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
        "long_factor": [2.0 + 0.5 * i for i in range(HEAD_DIM // 2)], "original_max_position_embeddings": ORIGINAL,
    }),
}


DYNAMIC = ("llama", {"rope_type": "dynamic", "factor": 4.0})


def _model(name: str):
    arch, params = DYNAMIC if name == "dynamic" else ROPES[name]
    overrides = {"rope_parameters": {"rope_theta": 10000.0, **params}}
    if name == "dynamic":  # dynamic NTK grows its base past max_position_embeddings
        overrides["max_position_embeddings"] = ORIGINAL
    if arch == "phi3":
        overrides["original_max_position_embeddings"] = ORIGINAL
    model = tiny_model(arch, **overrides)
    rotary = model.model.rotary_emb
    assert rotary.rope_type == params["rope_type"], (name, rotary.rope_type)
    return model


@torch.inference_mode()
def _run(model, cache, ids: torch.Tensor, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of the prompt's last position and of ``steps`` greedy decode steps, and the tokens chosen."""
    out = model(ids, **cache_kwargs(model, cache))
    logits, tokens = [out.logits[:, -1]], []
    for _ in range(steps):
        token = logits[-1].argmax(-1, keepdim=True)
        tokens.append(token)
        logits.append(model(token, **cache_kwargs(model, cache)).logits[:, -1])
    return logits, torch.cat(tokens, 1)


CACHES = {
    "LowRankCache": lambda model: LowRankCache(model, HEAD_DIM),
    "CompressedCache(lowrank=)": lambda model: CompressedCache(
        model, selector="knorm", retention=0.75, lowrank=HEAD_DIM, question_len=2
    ),
}


@pytest.mark.parametrize("cache_name", list(CACHES))
@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("prompt,steps", [(12, 20), (30, 6)], ids=["crossing the original context", "beyond it"])
def test_full_rank_pre_rope_equals_dynamic_cache(rope, cache_name, prompt, steps):
    ids = prompt_ids(2, prompt, seed=5)
    model = _model(rope)
    cache = CACHES[cache_name](model)
    ours, our_tokens = _run(model, cache, ids, steps)
    other = _model(rope)
    if cache_name == "LowRankCache":
        ref = DynamicCache(config=other.config)
    else:  # the same selection, kept at model precision: the kept positions of the low-rank cache, unfactored
        ref = CompressedCache(other, selector="knorm", retention=0.75, question_len=2)
    theirs, their_tokens = _run(other, ref, ids, steps)
    assert cache.layers[0].rope is not None  # keys are factored before RoPE
    for step, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=f"{rope}, step {step}")
    assert torch.equal(our_tokens, their_tokens)
    if cache_name != "LowRankCache":
        assert torch.equal(cache.kept_positions(), ref.kept_positions())


def test_dynamic_rope_is_refused_for_pre_rope_keys_and_served_post_rope():
    model = _model("dynamic")
    message = r"rope_type \['dynamic'\] changes its frequencies.*choose keys='post_rope'"
    with pytest.raises(ValueError, match=message):
        LowRankCache(model, HEAD_DIM)
    with pytest.raises(ValueError, match=message):
        CompressedCache(model, selector="knorm", retention=0.75, lowrank=HEAD_DIM)
    ids = prompt_ids(2, 30, seed=5)
    ours, our_tokens = _run(model, LowRankCache(model, HEAD_DIM, keys="post_rope"), ids, 6)
    other = _model("dynamic")
    theirs, their_tokens = _run(other, DynamicCache(config=other.config), ids, 6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert torch.equal(our_tokens, their_tokens)


def test_scaled_rope_types_really_scale():
    """The configurations above are not the default rotation in disguise: each changes cos/sin (or their scale)."""
    plain = tiny_model("llama").model.rotary_emb
    x = torch.zeros(1, 1, HEAD_DIM)
    pos = torch.arange(40).view(1, -1)
    cos0, _ = plain(x, pos)
    for name in [*ROPES, "dynamic"]:
        cos, _ = _model(name).model.rotary_emb(x, pos)
        assert float((cos - cos0).abs().max()) > 1e-3, name


def _pre_rope_keys(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's keys as the model computed them before RoPE (its projection's output, by a forward hook) and
    after (what ``DynamicCache`` stores), both ``[B, H_kv, T, D]``."""
    attn = model.model.layers[0].self_attn
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    seen = {}
    if hasattr(attn, "k_proj"):
        handle = attn.k_proj.register_forward_hook(lambda m, i, o: seen.update(k=o))
    else:  # Phi-3: one fused projection, [queries | keys | values]
        handle = attn.qkv_proj.register_forward_hook(lambda m, i, o: seen.update(k=o[..., H * HEAD_DIM : (H + Hkv) * HEAD_DIM]))
    cache = DynamicCache(config=cfg)
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache))
    handle.remove()
    B, T = ids.shape
    pre = seen["k"].view(B, T, Hkv, HEAD_DIM).transpose(1, 2)
    return pre, cache.layers[0].keys


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("length", [12, 40], ids=["below the original context", "beyond it"])
def test_the_inverse_rotation_recovers_the_models_pre_rope_keys(rope, length):
    """At full rank any rotation the cache undoes and re-applies consistently cancels, so the test above cannot
    tell a wrong rotation from the right one; this one can: undoing RoPE at the keys' positions must give the
    keys the model had before it applied RoPE, for scaled cos/sin (attention scaling) too."""
    from kvcache_plugins.layers.rope import RopeRotation

    model = _model(rope)
    ids = prompt_ids(2, length, seed=5)
    pre, post = _pre_rope_keys(model, ids)
    rotation = RopeRotation.of(model)
    positions = torch.arange(length).view(1, 1, length)
    torch.testing.assert_close(rotation.apply(post, positions, inverse=True), pre, rtol=0, atol=1e-5)
    torch.testing.assert_close(rotation.apply(pre, positions), post, rtol=0, atol=1e-5)
