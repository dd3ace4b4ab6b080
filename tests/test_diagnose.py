"""diagnose_layers: the lab's one-layer-at-a-time protocol on tiny models."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model

from kvcache_plugins import MixedPrecisionCache, diagnose_layers
from kvcache_plugins.diagnostics import classify


def _sensitive_layer0_model():
    model = tiny_model("llama", layers=4, hidden=128, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peaked next-token distributions make KL differences visible
        attn = model.model.layers[0].self_attn
        attn.k_proj.weight.mul_(10.0)  # large keys and values: layer 0's absolute quantization error grows
        attn.v_proj.weight.mul_(10.0)
    return model


def test_concentrated_damage_in_layer0_recommends_mixed_l0():
    model = _sensitive_layer0_model()
    prompts = [prompt_ids(1, 40, seed=s) for s in range(3)]
    result = diagnose_layers(model, None, prompts, bits=4)
    assert result.pattern == "concentrated"
    assert result.protected == [0]
    assert result.recommended_spec == {0: 16, "default": 4}
    kls = [d.kl for d in result.layers]
    assert kls[0] > 5 * max(kls[1:])
    assert all(0.0 <= d.top1_agreement <= 1.0 for d in result.layers)
    assert result.answer_positions == 3 * 15
    # the recommendation is a spec MixedPrecisionCache takes as is
    cache = MixedPrecisionCache(model, result.recommended_spec)
    assert "layer   0: model precision" in cache.describe()
    assert "protect" in result.table()


def test_int8_is_harmless_and_int2_hurts_more():
    model = tiny_model("qwen2", layers=3, hidden=128)
    prompts = [prompt_ids(1, 32, seed=s) for s in range(2)]
    int8 = diagnose_layers(model, None, prompts, bits=8, answer_tokens=8)
    int2 = diagnose_layers(model, None, prompts, bits=2, answer_tokens=8)
    assert int8.pattern == "none" and int8.recommended_spec == "int8"
    assert sum(d.kl for d in int2.layers) > 100 * sum(d.kl for d in int8.layers)


def test_string_prompts_and_reference_answers(tiny_tokenizer):
    model = tiny_model("llama", layers=2)
    prompts = [" ".join(f"w{(i * 7 + s) % 90}" for i in range(30)) for s in range(2)]
    answers = ["w1 w2 w3 w4 w5", "w9 w8 w7 w6"]
    result = diagnose_layers(model, tiny_tokenizer, prompts, bits=4, answers=answers, group_size=16)
    assert result.answer_positions == 4 + 3
    assert len(result.layers) == 2


@pytest.mark.parametrize(
    "kls, pattern, protected, spec",
    [
        ([0.001, 0.002, 0.001], "none", [], "int4"),
        ([0.5, 0.01, 0.02, 0.01], "concentrated", [0], {0: 16, "default": 4}),
        ([0.3, 0.01, 0.25, 0.02], "concentrated", [0, 2], {0: 16, 2: 16, "default": 4}),
        ([0.2, 0.22, 0.19, 0.21], "distributed", [], "int8"),
    ],
)
def test_classification(kls, pattern, protected, spec):
    assert classify(kls, 4, none_below=0.01, concentration=0.6, max_protected=2) == (pattern, protected, spec)


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\)"):
        diagnose_layers(model, None, [prompt_ids(1, 10)], bits=16)
    with pytest.raises(ValueError, match="at least one prompt"):
        diagnose_layers(model, None, [])
    with pytest.raises(ValueError, match="does not divide head_dim"):
        diagnose_layers(model, None, [prompt_ids(1, 10)], group_size=32)
    with pytest.raises(ValueError, match="one at a time"):
        diagnose_layers(model, None, [prompt_ids(2, 10)], group_size=16)


def test_transmission_protocol_measures_every_answer_token():
    # the context is stored quantized before the question is read, so the first answer token counts too
    model = tiny_model("qwen2", layers=3, hidden=128)
    prompts = [prompt_ids(1, 32, seed=s) for s in range(2)]
    post_hoc = diagnose_layers(model, None, prompts, bits=2, answer_tokens=6)
    sent = diagnose_layers(model, None, prompts, bits=2, answer_tokens=6, question_len=[4, 6])
    assert post_hoc.answer_positions == 2 * 5 and sent.answer_positions == 2 * 6
    assert all(d.kl >= 0.0 for r in (post_hoc, sent) for d in r.layers)  # clamped: never a "-0.00000"
    # one token of answer: nothing to measure without transmission, the whole answer with it
    with pytest.raises(ValueError, match="at least 2"):
        diagnose_layers(model, None, prompts, bits=2, answer_tokens=1)
    one = diagnose_layers(model, None, prompts, bits=2, answer_tokens=1, question_len=4)
    assert one.answer_positions == 2 and sum(d.kl for d in one.layers) > 0


def test_transmission_question_len_is_checked_first():
    model = tiny_model("llama")
    prompts = [prompt_ids(1, 10), prompt_ids(1, 12)]
    with pytest.raises(ValueError, match="3 question lengths for 2 prompts"):
        diagnose_layers(model, None, prompts, group_size=16, question_len=[1, 2, 3])
    with pytest.raises(ValueError, match="at least 1"):
        diagnose_layers(model, None, prompts, group_size=16, question_len=0)
    with pytest.raises(TypeError, match="one per prompt"):
        diagnose_layers(model, None, prompts, group_size=16, question_len="4")
    with pytest.raises(ValueError, match=r"prompt 0: question_len 10 is outside \[1, 9\]"):
        diagnose_layers(model, None, prompts, group_size=16, question_len=10)
