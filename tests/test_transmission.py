"""The transmission protocol: the context is stored compressed before the question is read."""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model
from transformers import DynamicCache

from kvcache_plugins import MixedPrecisionCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.quant import quantize
from kvcache_plugins.specs import make_cache
from kvcache_plugins.transmission import prefill_context

GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _left_padded(batch: int, length: int, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = prompt_ids(batch, length, seed=3)
    mask = torch.ones_like(ids)
    for b, p in enumerate(pads):
        ids[b, :p], mask[b, :p] = 0, 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_lossless_cache_continues_exactly_with_mixed_question_lengths(arch):
    # the protocol with a DynamicCache (full@construction) is the lossless control: chunked prefill, positions of a
    # left-padded batch and generate's continuation must give the plain run's tokens
    model = tiny_model(arch, attn="eager" if arch.startswith("gemma") else "sdpa", layers=2)
    ids, mask = _left_padded(3, 30, [0, 4, 9])
    plain = model.generate(ids, attention_mask=mask, **cache_kwargs(model, DynamicCache(config=model.config)), **GEN)
    cache = make_cache("full@construction", model, question_len=[5, 3, 7], tokenizer=None, input_ids=ids,
                       attention_mask=mask)
    assert cache.get_seq_length() == 30 - 3  # stored up to the shortest question's boundary
    sent = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), **GEN)
    assert torch.equal(sent, plain)


@torch.inference_mode()
def test_question_attends_to_the_dequantized_context():
    # oracle: int4@construction equals a full-precision cache whose context keys and values were replaced by their
    # int4 round trip before the question is read
    model = tiny_model("qwen2", layers=2)
    ids = prompt_ids(1, 40, seed=5)
    q = 6
    cache = prefill_context(model, MixedPrecisionCache(model, "int4", group_size=16), ids, question_len=q)
    got = model(ids[:, -q:], use_cache=True, **cache_kwargs(model, cache)).logits

    ref = DynamicCache(config=model.config)
    model(ids[:, :-q], use_cache=True, **cache_kwargs(model, ref))
    for layer in ref.layers:
        layer.keys = quantize(layer.keys, 4, 16, "token", torch.float16).dequantize(layer.keys.dtype)
        layer.values = quantize(layer.values, 4, 16, "token", torch.float16).dequantize(layer.values.dtype)
    want = model(ids[:, -q:], use_cache=True, **cache_kwargs(model, ref)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # and the quantization really reaches the question, unlike a prompt pass over the whole prompt
    full = model(ids).logits[:, -q:]
    post_hoc = model(ids, use_cache=True, **cache_kwargs(model, MixedPrecisionCache(model, "int2", group_size=16)))
    assert torch.equal(post_hoc.logits[:, -q:], full)
    sent = prefill_context(model, MixedPrecisionCache(model, "int2", group_size=16), ids, question_len=q)
    assert (model(ids[:, -q:], **cache_kwargs(model, sent)).logits - full).abs().max() > 1e-2


def test_batch_with_one_question_length_equals_rows_one_by_one():
    model = tiny_model("llama", layers=2)
    ids, mask = _left_padded(3, 28, [0, 5, 2])
    kw = dict(question_len=4, tokenizer=None)
    batch = make_cache("int4@construction", model, input_ids=ids, attention_mask=mask, **kw)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, batch), **GEN,
                         output_scores=True, return_dict_in_generate=True)
    for b, pad in enumerate([0, 5, 2]):
        row = ids[b : b + 1, pad:]
        single = make_cache("int4@construction", model, input_ids=row, **kw)
        alone = model.generate(row, attention_mask=torch.ones_like(row), **cache_kwargs(model, single), **GEN,
                               output_scores=True, return_dict_in_generate=True)
        assert torch.equal(out.sequences[b, 28:], alone.sequences[0, row.shape[1] :])
        torch.testing.assert_close(out.scores[0][b], alone.scores[0][0], atol=1e-4, rtol=1e-4)


def test_bad_input_fails_before_any_forward_pass():
    model = tiny_model("llama")
    ids = prompt_ids(2, 12)
    fresh = lambda: MixedPrecisionCache(model, "int4", group_size=16)  # noqa: E731
    with pytest.raises(ValueError, match="needs question_len"):
        prefill_context(model, fresh(), ids)
    with pytest.raises(ValueError, match=r"must be in \[1, 11\]"):
        prefill_context(model, fresh(), ids, question_len=0)
    with pytest.raises(ValueError, match=r"must be in \[1, 11\]"):
        prefill_context(model, fresh(), ids, question_len=[3, 12])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        prefill_context(model, fresh(), ids, question_len=[1, 2, 3])
    with pytest.raises(TypeError, match="an int or a sequence of ints"):
        prefill_context(model, fresh(), ids, question_len=True)
    used = prefill_context(model, fresh(), ids, question_len=2)
    with pytest.raises(ValueError, match="fills an empty cache"):
        prefill_context(model, used, ids, question_len=2)
    with pytest.raises(ValueError, match="needs input_ids"):
        make_cache("int4@construction", model, question_len=2)


def test_lm_eval_loglikelihoods_read_the_question_against_the_stored_context():
    # lm-eval's log-likelihood path (in process; an lm-eval HFLM stand-in carrying what the path reads): the
    # context is prefilled into the spec's cache, then the continuation is scored against it
    from types import SimpleNamespace

    from kvcache_plugins.eval.lm_eval_model import _cached_loglikelihood
    from kvcache_plugins.reference import load_reference_model
    from kvcache_plugins.specs import parse_spec
    from kvcache_plugins.tasks.kv_retrieval import make_dataset

    model, tok = load_reference_model()
    examples = make_dataset(31337, 8, 256, multi_hop_share=0.0)
    requests = []
    for e in examples:
        context = tok(e.prompt, add_special_tokens=False).input_ids
        value = tok(" " + e.answer_value, add_special_tokens=False).input_ids  # the one-token answer
        assert len(value) == 1
        requests.append((None, context, value))  # (no request strings: nothing for the cache hook)

    def loglikelihoods(spec):
        lm = SimpleNamespace(model=model, device="cpu", tokenizer=tok, max_length=4096, _kv_spec=parse_spec(spec),
                             _kv_task="kv_retrieval", _kv_task_meta={"question_marker": "Q"}, cache_hook=None)
        return torch.tensor([lp for lp, _ in _cached_loglikelihood(lm, requests)])

    full = loglikelihoods("full")
    assert full.exp().mean() > 0.8  # the model knows the answers
    torch.testing.assert_close(loglikelihoods("full@construction"), full, atol=1e-4, rtol=0)
    # storage: the answer token comes from the prompt pass at full precision, whatever the cache stores
    torch.testing.assert_close(loglikelihoods("int2"), full, atol=1e-4, rtol=0)
    # measured: mean log-prob of the answer -0.0003 with full and int2 alike, -3.23 with int2@construction
    sent = loglikelihoods("int2@construction")
    assert (full - sent).mean() > 1.0, (full, sent)  # read against the int2 context, the answer gets unlikely


def test_budget_specs_and_transmission_share_one_grammar():
    """Issue 16's budget suffix and issue 20's ``<preset>@construction`` in one grammar: a budget spec with a
    ``+<preset>`` selects after the prefill (not transmitted), a preset with ``@construction`` is transmitted, and a
    budget under ``@construction`` is refused; both kinds of cache then run on the same left-padded batch."""
    from kvcache_plugins.specs import parse_spec

    sent = parse_spec("int4@construction")
    assert sent.transmits and sent.budget == "uniform"
    for text, granularity, budget in (
        ("snapkv:0.25:adakv+int4", "head", "adakv"),
        ("keydiff:0.25:pyramid+mixed_l0", "layer", "pyramid"),
        ("q2c:0.5:head:pyramid+int8", "head", "pyramid"),
    ):
        s = parse_spec(text)
        assert (s.kind, s.granularity, s.budget, s.transmits) == ("select", granularity, budget, False)
    for text in ("snapkv:0.25:adakv@construction", "snapkv:0.25:adakv+int4@construction"):
        with pytest.raises(ValueError, match="budget allocators apply to plain ones"):
            parse_spec(text)

    model = tiny_model("llama", layers=2)
    ids, mask = _left_padded(2, 28, [0, 5])
    kw = dict(question_len=[4, 3], tokenizer=None, input_ids=ids, attention_mask=mask, group_size=8)
    transmitted = make_cache("int4@construction", model, **kw)
    ragged = make_cache("snapkv:0.25:adakv+int4", model, **kw)
    # per-row question lengths: the context is stored in two chunks under inference mode, and generate (outside
    # it) then writes into the cache's workspace
    a = model.generate(ids, attention_mask=mask, **cache_kwargs(model, transmitted), **GEN)
    b = model.generate(ids, attention_mask=mask, **cache_kwargs(model, ragged), **GEN)
    assert a.shape == b.shape == (2, 28 + GEN["max_new_tokens"])
    assert all(ragged.layers[i].ragged for i in ragged.compressed_layers)
    assert ragged.memory_footprint().total < transmitted.memory_footprint().total
