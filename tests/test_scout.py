"""Scout selections: transfer to a larger model, wire format, the masking oracles, modes, tokenizers."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, prompt_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import VISIBILITY, oracle_model
from test_compressed_cache import _generate, _hide_evicted
from transformers import DynamicCache

from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins import CompressedCache, Scout, ScoutMaskedCache, Selection, selection_overlap
from kvcache_plugins.scout import kv_cache_bytes, map_selection, vocabulary_fingerprint

QLEN = 5


@pytest.fixture(scope="module")
def pair():
    """A small scout and a larger model of the same family, sharing one tokenizer."""
    return tiny_model("qwen2", layers=2, hidden=64, seed=1), tiny_model("qwen2", layers=3, hidden=128, seed=2)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _scout_select(scout_model, tok, ids, mask=None, question_len=QLEN, **kwargs):
    options = dict(selector="q2c", retention=0.5)
    options.update(kwargs)
    return Scout(scout_model, tok, **options).select(ids, mask, question_len=question_len)


def _matches_masking_oracle(model, cache, ids, mask=None, **gen):
    """``generate`` with ``cache`` equals the full cache with every evicted prompt position masked (and the kept
    tokens quantized as ``cache`` stores them)."""
    from reference import reference_cache

    oracle = oracle_model(model)
    ours = _generate(model, cache, ids, mask, **gen)
    _hide_evicted(cache, ids.shape[1], ours.sequences.shape[1])
    try:
        quantized = any(spec.quantized for spec in cache.layer_specs)
        ref_cache = reference_cache(oracle, cache.layer_specs) if quantized else DynamicCache(config=oracle.config)
        ref = _generate(oracle, ref_cache, ids, mask, **gen)
    finally:
        VISIBILITY.__init__()
    assert torch.equal(ours.sequences, ref.sequences)
    for x, y in zip(ours.logits, ref.logits):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    return ours


def test_own_selection_equals_compressed_cache_global(pair, tok):
    _, large = pair
    ids = prompt_ids(2, 32)
    own = Scout(large, tok, "q2c", 0.5).select(ids, question_len=QLEN)
    a = _generate(large, ScoutMaskedCache(own, large, tokenizer=tok), ids)
    b = _generate(large, CompressedCache(large, selector="q2c", retention=0.5, question_len=QLEN, granularity="global"), ids)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("quant", [None, "mixed_l0"])
def test_post_hoc_equals_full_cache_with_mask(pair, tok, quant):
    scout, large = pair
    ids = prompt_ids(2, 30)
    selection = _scout_select(scout, tok, ids)
    oracle = oracle_model(large)
    cache = ScoutMaskedCache(selection, large, tokenizer=tok, quant=quant, group_size=16)
    ours = _generate(large, cache, ids)
    _hide_evicted(cache, 30, ours.sequences.shape[1])
    if quant is None:
        ref = _generate(oracle, DynamicCache(config=oracle.config), ids)
    else:
        from reference import reference_cache

        ref = _generate(oracle, reference_cache(oracle, cache.layer_specs), ids)
    assert torch.equal(ours.sequences, ref.sequences)
    for x, y in zip(ours.logits, ref.logits):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    kept = cache.kept_positions()[:, 0, :]
    for row in range(2):
        assert [p for p in kept[row].tolist() if 0 <= p < 30] == selection.kept_tokens(row)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_construction_equals_masked_prefill(tok, attn):
    scout = tiny_model("llama", attn, layers=2, seed=1)
    large = tiny_model("llama", attn, layers=3, hidden=128, seed=2)
    ids = prompt_ids(2, 30)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    selection = Scout(scout, tok, "snapkv", 0.4, window=8).select(ids, mask, question_len=QLEN)
    oracle = oracle_model(large)
    cache = ScoutMaskedCache(selection, large, tokenizer=tok, mode="construction")
    ours = _generate(large, cache, ids, mask)
    _hide_evicted(cache, 30, ours.sequences.shape[1])
    VISIBILITY.during_prefill = True
    try:
        ref = _generate(oracle, DynamicCache(config=oracle.config), ids, mask)
    finally:
        VISIBILITY.__init__()
    assert torch.equal(ours.sequences, ref.sequences)
    for x, y in zip(ours.logits, ref.logits):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    post_hoc = _generate(large, ScoutMaskedCache(selection, large, tokenizer=tok), ids, mask)
    assert not all(torch.equal(x, y) for x, y in zip(ours.logits, post_hoc.logits))  # the modes differ


def test_sparse_prefill_equals_construction(pair, tok):
    scout, large = pair
    ids = prompt_ids(3, 28)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :2] = 0
    selection = _scout_select(scout, tok, ids, mask, retention=0.3)
    construction = _generate(large, ScoutMaskedCache(selection, large, tokenizer=tok, mode="construction"), ids, mask)
    cache = ScoutMaskedCache(selection, large, tokenizer=tok)
    cache.sparse_prefill(large, ids, mask)
    assert cache.get_seq_length() == 27
    sparse = _generate(large, cache, ids, mask)
    assert torch.equal(construction.sequences, sparse.sequences)
    for x, y in zip(construction.logits, sparse.logits):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_batches_and_padding_with_quantization(pair, tok):
    scout, large = pair
    ids = prompt_ids(3, 26)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    selection = _scout_select(scout, tok, ids, mask, question_len=[3, 5, 4])
    assert selection.prompt_len == [19, 26, 26] and selection.question_len == [3, 5, 4]
    cache = ScoutMaskedCache(selection, large, tokenizer=tok, quant="mixed_l0", group_size=16)
    out = _matches_masking_oracle(large, cache, ids, mask)
    assert out.sequences.shape == (3, 34)
    assert cache.memory_footprint().codes > 0
    kept = cache.kept_positions()[:, 0, :]
    for row, pad in enumerate([7, 0, 0]):  # each row keeps what the scout chose for it, shifted by its padding
        assert [p - pad for p in kept[row].tolist() if pad <= p < 26] == selection.kept_tokens(row)


def test_selection_for_another_prompt_is_refused_before_generation(pair, tok):
    scout, large = pair
    selection = _scout_select(scout, tok, prompt_ids(1, 30))
    cache = ScoutMaskedCache(selection, large, tokenizer=tok)
    other = prompt_ids(1, 28)
    with pytest.raises(ValueError, match="made for a prompt of 30 tokens, this prompt has 28"):
        large.generate(other, attention_mask=torch.ones_like(other), **cache_kwargs(large, cache), max_new_tokens=3)
    with pytest.raises(ValueError, match="question_len"):
        ScoutMaskedCache(selection, large, tokenizer=tok, question_len=7)


def test_vocabulary_mismatch_is_refused(pair, tok):
    scout, large = pair
    selection = _scout_select(scout, tok, prompt_ids(1, 30))
    other = make_tokenizer()
    other.add_tokens(["extra"])
    with pytest.raises(ValueError, match="another tokenizer vocabulary"):
        ScoutMaskedCache(selection, large, tokenizer=other)


def test_per_layer_selection_needs_the_same_depth(pair, tok):
    scout, large = pair
    selection = _scout_select(scout, tok, prompt_ids(1, 30), granularity="layer")
    assert selection.per_layer and selection.num_layers == 2
    with pytest.raises(ValueError, match="holds 2 layers but this model has 3"):
        ScoutMaskedCache(selection, large, tokenizer=tok)
    same_depth = tiny_model("qwen2", layers=2, hidden=128, seed=3)
    cache = ScoutMaskedCache(selection, same_depth, tokenizer=tok)
    out = _matches_masking_oracle(same_depth, cache, prompt_ids(1, 30))
    assert out.sequences.shape[1] == 38
    for layer in range(2):  # each layer keeps its own positions
        kept = [p for p in cache.kept_positions(layer)[0, 0].tolist() if p < 30]
        assert kept == selection.kept_tokens(0, layer)
    assert selection.layer_positions[0] != selection.layer_positions[1]


def test_overlap_and_sizes(pair, tok):
    scout, large = pair
    ids = prompt_ids(2, 64)
    a = _scout_select(scout, tok, ids)
    b = Scout(large, tok, "q2c", 0.5).select(ids, question_len=QLEN)
    assert selection_overlap(a, a) == 1.0
    assert 0.0 <= selection_overlap(a, b) <= 1.0
    assert a.nbytes < 64
    assert a.nbytes < kv_cache_bytes(large.config, 64) / 100


@st.composite
def selections(draw):
    rows = draw(st.integers(1, 4))
    sinks = draw(st.integers(0, 4))
    per_layer = draw(st.booleans())
    layers = draw(st.integers(1, 3)) if per_layer else 1
    prompt_len, question_len = [], []
    for _ in range(rows):
        q = draw(st.integers(0, 12))
        prompt_len.append(sinks + q + draw(st.integers(0, 400)))
        question_len.append(q)
    all_layers = []
    for _ in range(layers):
        rows_pos = []
        for r in range(rows):
            context = range(sinks, prompt_len[r] - question_len[r])
            share = draw(st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]))
            rows_pos.append(sorted(draw(st.sets(st.sampled_from(list(context)), max_size=int(len(context) * share))) if context else set()))
        all_layers.append(rows_pos)
    return Selection(
        positions=all_layers[0], prompt_len=prompt_len, question_len=question_len, sinks=sinks,
        fingerprint=draw(st.binary(min_size=8, max_size=8)), selector=draw(st.sampled_from(["q2c", "snapkv", "h2o"])),
        layer_positions=all_layers if per_layer else None,
    )


@settings(max_examples=150, deadline=None)
@given(selections())
def test_wire_round_trip_and_size_bound(sel):
    data = sel.to_bytes()
    back = Selection.from_bytes(data)
    assert back == sel
    header = 4 + 2 + 3 * 3 + 8 + 1 + len(sel.selector) + 4
    per_row = sum(3 * 2 + 1 + (sel.context_len(r) + 7) // 8 for r in range(sel.rows))
    assert len(data) <= header + max(1, sel.num_layers) * per_row


def test_corrupted_truncated_and_foreign_bytes_are_rejected(pair, tok):
    scout, _ = pair
    data = _scout_select(scout, tok, prompt_ids(2, 40)).to_bytes()
    with pytest.raises(ValueError, match="bad magic"):
        Selection.from_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match="checksum"):
        Selection.from_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    with pytest.raises(ValueError, match="checksum|truncated"):
        Selection.from_bytes(data[:-7])
    with pytest.raises(ValueError, match="version 9"):
        Selection.from_bytes(data[:4] + b"\x09" + data[5:])
    with pytest.raises(TypeError, match="takes bytes"):
        Selection.from_bytes("not bytes")
    with pytest.raises(ValueError):
        Selection.from_bytes(b"")


def _char_tokenizer():
    """A real fast tokenizer with one token per character (space included), built with `tokenizers`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<pad>", "<s>", "</s>", "<unk>", " "] + list("w0123456789")
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_different_tokenizers_map_through_character_offsets(pair, tok):
    scout, _ = pair
    chars = _char_tokenizer()
    words = [f"w{i}" for i in range(3, 33)]
    text = " ".join(words)
    ids = tok(text, return_tensors="pt").input_ids
    selection = Scout(scout, tok, "q2c", 0.5).select(ids, question_len=4)
    target = chars(text, return_offsets_mapping=True)
    assert len(target.input_ids) == len(text)  # one token per character
    question_chars = len(" ".join(words[-4:])) + 1  # the last four words and the space before them
    mapped = map_selection(selection, [text], tok, chars, [question_chars])
    word_of_char = []
    for i, w in enumerate(words):
        word_of_char += [i] * len(w) + [None]
    kept_words = set(selection.positions[0])
    # rule: a character is kept iff it lies inside a kept word (spaces belong to no word and are dropped)
    expected = [p for p in range(len(text) - question_chars) if word_of_char[p] in kept_words]
    assert mapped.positions[0] == expected
    assert mapped.fingerprint == vocabulary_fingerprint(chars)
    assert mapped.prompt_len == [len(text)]
    with pytest.raises(ValueError, match="another tokenizer vocabulary"):
        ScoutMaskedCache(selection, tiny_model("llama"), tokenizer=chars)
    model = tiny_model("llama", layers=2, seed=4)
    target_ids = torch.tensor([target.input_ids])
    out = _matches_masking_oracle(model, ScoutMaskedCache(mapped, model, tokenizer=chars), target_ids, max_new_tokens=3)
    assert out.sequences.shape[1] == len(text) + 3
