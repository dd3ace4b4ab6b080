"""Files saved by earlier code load unchanged: the layer kind names and state fields are an on-disk format.

``tests/fixtures/saved_caches/*.kvc`` were written by commit 9335bff (before the layers/ persist/ selection/
caches/ split) with ``make_fixtures.py`` beside them. Each must load with today's code into a cache that holds the
same stored states, bit for bit, as the same cache built and filled now, and continue decoding identically.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kvcache_plugins import cache_kwargs, load_cache
from kvcache_plugins.persist.container import verify
from kvcache_plugins.reference import load_reference_model

FIXTURES = Path(__file__).parent / "fixtures" / "saved_caches"
sys.path.insert(0, str(FIXTURES))
from make_fixtures import CASES, fill, prompt  # noqa: E402

KINDS = {"mixed", "compressed", "ragged", "lowrank", "lowrank_compressed", "dynamic"}  # dynamic: 16-bit layer 0


@pytest.fixture(scope="module")
def model():
    return load_reference_model()[0]


def _states(cache) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def test_fixtures_cover_every_layer_kind():
    kinds = set()
    for path in FIXTURES.glob("*.kvc"):
        _, meta = verify(path.read_bytes())
        kinds |= {layer["kind"] for layer in meta["layers"]}
    assert KINDS <= kinds, sorted(KINDS - kinds)


@pytest.mark.parametrize("name", sorted(CASES))
def test_old_file_loads_to_the_same_states(model, name):
    loaded = load_cache(FIXTURES / f"{name}.kvc", model)
    fresh = CASES[name](model)
    fill(model, fresh)
    assert type(loaded) is type(fresh)
    assert loaded.get_seq_length() == fresh.get_seq_length() == prompt().shape[1] + 3
    for i, ((k0, v0), (k1, v1)) in enumerate(zip(_states(loaded), _states(fresh))):
        assert torch.equal(k0, k1) and torch.equal(v0, v1), f"layer {i} differs"
    if hasattr(fresh, "kept_positions"):
        for i in fresh.compressed_layers:
            assert torch.equal(loaded.kept_positions(i), fresh.kept_positions(i))
    # both continue the same way (a loaded cache decodes fused where it can, the fresh one by the reference path:
    # within the fused kernel's 1e-4, same tokens)
    nxt = torch.full((prompt().shape[0], 1), 7)
    with torch.no_grad():
        a = model(nxt, use_cache=True, **cache_kwargs(model, loaded)).logits
        b = model(nxt, use_cache=True, **cache_kwargs(model, fresh)).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
