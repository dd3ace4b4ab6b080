"""The embedded task's generator: prompt layout, unique answers, exact two-hop chains, reproducibility."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_plugins.tasks.kv_retrieval import (
    FACT_TOKENS,
    QUESTION_TOKENS,
    exact_match,
    make_dataset,
    make_example,
    vocabulary,
)


def _facts(example):
    words = example.prompt.split()
    assert words[0] == "<s>"
    body = words[1:-QUESTION_TOKENS]
    assert len(body) % FACT_TOKENS == 0
    facts = [body[i : i + FACT_TOKENS] for i in range(0, len(body), FACT_TOKENS)]
    assert all(f[2] == ";" for f in facts)
    return [(k, v) for k, v, _ in facts], words[-QUESTION_TOKENS:]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([16, 31, 100, 512, 2048]), st.sampled_from([1, 2]))
def test_every_question_has_exactly_one_answer(seed, tokens, hops):
    ex = make_example(random.Random(seed), tokens, hops)
    facts, question = _facts(ex)
    assert len(ex.prompt.split()) == ex.num_tokens <= tokens
    assert ex.num_tokens > tokens - FACT_TOKENS
    assert set(ex.prompt.split()) <= set(vocabulary())
    keys = [k for k, _ in facts]
    assert len(set(keys)) == len(keys)  # every key answers at most one lookup
    lookup = dict(facts)
    asked = question[2]
    assert question[:2] == (["Q", ":"] if hops == 1 else ["Q2", ":"])
    assert keys[ex.fact_index] == asked
    if hops == 1:
        assert ex.answer == f"{lookup[asked]} </s>"
        return
    middle = lookup[asked]
    assert middle.startswith("K") and lookup[middle].startswith("V")  # exactly two hops
    assert ex.answer == f"{middle} {lookup[middle]} </s>"
    sources = {k for k, v in facts if v.startswith("K")}
    assert not sources & {v for _, v in facts}  # no chain is longer than two hops
    assert asked not in {v for _, v in facts}  # the asked key appears once as a key and nowhere else


def test_datasets_are_reproducible_and_mix_hops():
    a = make_dataset(5, 40, 256, multi_hop_share=0.5)
    assert a == make_dataset(5, 40, 256, multi_hop_share=0.5)
    assert a != make_dataset(6, 40, 256, multi_hop_share=0.5)
    assert 5 < sum(e.hops == 2 for e in a) < 35
    assert all(e.hops == 1 for e in make_dataset(5, 10, 256))


def test_exact_match_stops_at_the_end_token():
    ex = make_example(random.Random(1), 64, 2)
    assert exact_match(ex.answer + " K1 V2", ex)
    assert not exact_match(ex.answer.replace("</s>", ""), ex)
    assert not exact_match("V0 </s>", ex)


def test_bad_input():
    with pytest.raises(ValueError, match="hops must be 1 or 2"):
        make_example(random.Random(0), 64, 3)
    with pytest.raises(ValueError, match="distinct keys"):
        make_example(random.Random(0), 10_000)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([16, 100, 512]), st.sampled_from([1, 2]))
def test_the_document_answers_a_question_about_any_of_its_facts(seed, tokens, hops):
    # the encode-once example asks several questions of one document through this API
    ex = make_example(random.Random(seed), tokens, hops)
    facts, question = _facts(ex)
    assert ex.facts == facts
    assert ex.prompt == f"{ex.document} {' '.join(question)}"
    assert ex.ask(question[2]) == (" ".join(question), ex.answer)  # the example's own question, either kind
    lookup = dict(facts)
    for key, value in facts:
        asked, answer = ex.ask(key)
        hop_answer = f"{value} {lookup[value]} </s>" if value.startswith("K") else f"{value} </s>"
        assert (asked, answer) == (f"{'Q2' if value.startswith('K') else 'Q'} : {key}", hop_answer)
    with pytest.raises(ValueError, match="not a fact key"):
        ex.ask("V1")
