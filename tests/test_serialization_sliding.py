"""Save and load on architectures with sliding-window layers (Gemma-2/3), through the public API only."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model

from kvcache_plugins import CompressedCache, MixedPrecisionCache, cache_kwargs, load_cache

CACHES = {
    "mixed int4": lambda m: MixedPrecisionCache(m, "int4", group_size=16),
    "compressed q2c": lambda m: CompressedCache(m, selector="q2c", retention=0.5, question_len=4),
}


def _continue(model, cache, ids, extra):
    full = torch.cat([ids, extra], dim=1)
    return model.generate(
        full, attention_mask=torch.ones_like(full), **cache_kwargs(model, cache), max_new_tokens=5, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
@pytest.mark.parametrize("name", list(CACHES))
@pytest.mark.parametrize("via", ["bytes", "file"])
def test_sliding_window_layers_round_trip(arch, name, via, tmp_path):
    model = tiny_model(arch, attn="eager", layers=2)  # layer 0 slides over 16 tokens, layer 1 attends fully
    ids = prompt_ids(2, 30)  # longer than the window: the sliding layer holds fewer tokens than it has seen
    cache = CACHES[name](model)
    with torch.no_grad():
        token = model(ids, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        for _ in range(3):
            token = model(token, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
    assert [cache.get_seq_length(i) for i in range(2)] == [33, 33]
    if via == "bytes":
        loaded = type(cache).from_bytes(cache.to_bytes(), model)
    else:
        cache.save(tmp_path / "cache.safetensors")
        loaded = load_cache(tmp_path / "cache.safetensors", model)
    assert [loaded.get_seq_length(i) for i in range(2)] == [33, 33]  # the sliding layer's length is restored
    extra = torch.cat([token, prompt_ids(2, 2, seed=9)], dim=1)
    history = torch.cat([ids, prompt_ids(2, 3, seed=1)], dim=1)  # any 33 tokens: only the length is read
    a = _continue(model, cache, history, extra)
    b = _continue(model, loaded, history, extra)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
