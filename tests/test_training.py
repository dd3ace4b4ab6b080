"""The training script's pieces: growing a model keeps its function; training sequences mask only the answers."""

from __future__ import annotations

import random

import torch
from transformers import Qwen2ForCausalLM

from kvcache_plugins.training.train_reference import Encoder, grow, model_config, repeat_sequence, training_sequence


def test_grow_keeps_the_function_exactly():
    torch.manual_seed(0)
    small = Qwen2ForCausalLM(model_config("scout")).eval()
    big = grow(small, model_config("reference")).eval()
    assert big.config.num_hidden_layers == 4 > small.config.num_hidden_layers
    ids = torch.randint(8, 1000, (2, 40))
    assert torch.equal(small(ids).logits, big(ids).logits)


def test_training_sequence_masks_exactly_the_answers():
    enc, rng = Encoder(), random.Random(0)
    vocab = {i: w for w, i in enc.ids.items()}
    ids, mask = training_sequence(rng, enc, 64, questions=6, multi_hop=0.5)
    assert len(ids) == len(mask)
    words = [vocab[i] for i in ids]
    prompt_end = next(i for i, w in enumerate(words) if w in ("Q", "Q2"))
    assert not any(mask[:prompt_end])  # nothing in the prompt is a target
    lookup = {words[i]: words[i + 1] for i in range(1, prompt_end, 3)}
    i = prompt_end
    while i < len(words):  # every question is followed by its answer, and only the answer is masked in
        kind, key = words[i], words[i + 2]
        answer = [lookup[key], "</s>"] if kind == "Q" else [lookup[key], lookup[lookup[key]], "</s>"]
        assert words[i + 3 : i + 3 + len(answer)] == answer
        assert mask[i : i + 3 + len(answer)] == [0, 0, 0] + [1] * len(answer)
        i += 3 + len(answer)


def test_repeat_sequence_targets_the_repeated_run():
    enc, rng = Encoder(), random.Random(3)
    ids, mask = repeat_sequence(rng, enc, 96)
    n = sum(mask) + 1  # the repeat's first token is not predictable
    prompt, repeat = ids[: len(ids) - n], ids[len(ids) - n :]
    assert any(prompt[i : i + n] == repeat for i in range(len(prompt) - n + 1))
    assert mask == [0] * (len(ids) - n + 1) + [1] * (n - 1)
