"""Non-finite key/value states (issue 29): every cache kind that quantizes, factorises or scores states refuses NaN
and +-Inf with a ValueError naming the layer, keys or values, and what was found; 16-bit storage keeps them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from kvcache_plugins import CompressedCache, MixedPrecisionCache, ScoutMaskedCache, Selection
from kvcache_plugins.scout import vocabulary_fingerprint
from kvcache_plugins.specs import make_cache

MODEL = tiny_model("qwen2", layers=2, seed=3)
LLAMA = tiny_model("llama", layers=2, seed=4)
T, D = 32, 16


def _scout_cache(model):
    from conftest import make_tokenizer

    tok = make_tokenizer()
    sel = Selection([list(range(1, T - 2, 2))], [T], [2], 1, vocabulary_fingerprint(tok), "q2c")
    return ScoutMaskedCache(sel, model, tokenizer=tok, quant="int4", group_size=16)


#: kind -> (builder(model), refuses)
KINDS = {
    "mixed int2": (lambda m: MixedPrecisionCache(m, "int2", group_size=16), True),
    "mixed int4": (lambda m: MixedPrecisionCache(m, "int4", group_size=16), True),
    "mixed int8": (lambda m: MixedPrecisionCache(m, "int8", group_size=16), True),
    "compressed q2c": (lambda m: CompressedCache(m, selector="knorm", retention=0.5, question_len=2), True),
    "compressed q2c+int4": (lambda m: make_cache("knorm:0.5+int4", m, group_size=16), True),
    "low-rank svd:8": (lambda m: make_cache("svd:8", m), True),
    "compressed lowrank=8": (lambda m: CompressedCache(m, selector="knorm", retention=0.5, lowrank=8), True),
    "adakv": (lambda m: make_cache("snapkv:0.5:adakv", m, question_len=2), True),
    "scout-masked int4": (_scout_cache, True),
}
STORE = {"mixed 16-bit": lambda m: MixedPrecisionCache(m, "full")}
BAD = {"NaN": float("nan"), "+Inf": float("inf"), "-Inf": float("-inf")}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _states(model, dtype, where, bad):
    cfg = model.config
    shape = (1, cfg.num_key_value_heads, T, cfg.hidden_size // cfg.num_attention_heads)
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    (k if where == "keys" else v)[0, 1, 5, 3] = bad
    return k, v


@pytest.mark.parametrize("model", [MODEL, LLAMA], ids=["qwen2", "llama"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["keys", "values"])
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_refuses_nonfinite_states_naming_them(kind, bad, where, dtype, model):
    k, v = _states(model, dtype, where, BAD[bad])
    cache = KINDS[kind][0](model)
    with pytest.raises(ValueError) as info:
        cache.update(k, v, 1)
    msg = str(info.value)
    assert f"layer 1: the {where} hold {bad} (1 value)" in msg, msg
    other = {"NaN", "+Inf", "-Inf"} - {bad}
    assert not any(o in msg.split(";")[0] for o in other), msg


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", list(BAD))
def test_16_bit_layers_store_nonfinite_states_exactly(bad, dtype):
    k, v = _states(MODEL, dtype, "keys", BAD[bad])
    cache = STORE["mixed 16-bit"](MODEL)
    out_k, out_v = cache.update(k, v, 1)
    torch.testing.assert_close(out_k, k, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(out_v, v)


def test_finite_extremes_keep_the_range_message():
    """fp32 values beyond the fp16 scales are finite: the old range message, not a NaN/Inf one."""
    k, v = _states(MODEL, torch.float32, "keys", 1e38)
    k[0, 1, 5, 4] = -1e38
    with pytest.raises(ValueError, match="exceed the range of the torch.float16 scales"):
        MixedPrecisionCache(MODEL, "int4", group_size=16).update(k, v, 1)
