"""Issue 25 (7): transmission with mixed question lengths stores each row's context before its question is read.

The rule (``kvcache_plugins/transmission.py``): for a row of ``n`` prompt tokens with question length ``q_b``,
tokens ``[0, n - q_b)`` are stored in the cache (compressed as the cache stores anything) before any token of
``[n - q_b, n)`` is read; with differing lengths the prompt is prefilled in column chunks ending at each row's
boundary ``n - q_b``, so a row's context may be stored in several pieces and a longer question read in pieces,
but no question token of a row is ever read in the same pass as, or before, any of that row's context.

The references run each row alone, with no padding, and feed it exactly the pieces that rule names; int2 keys and
values (no full-precision window) make every token that skips the cache's storage visible in the logits. (So no
row of a mixed batch equals the plain one-row protocol: a row's question pieces attend to its earlier, stored,
question pieces; the lossless control, where every row equals its plain run, is in ``test_transmission.py``.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import prompt_ids, tiny_model

from kvcache_plugins import MixedPrecisionCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.transmission import prefill_context

N = 30
PADS = [0, 6, 3, 0]
QUESTIONS = [4, 9, 2, 6]  # four different lengths; row 1 (9) has the earliest boundary
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def _lossy(model):
    return MixedPrecisionCache(model, "int2", group_size=16, fused=False)


def _batch():
    ids = prompt_ids(len(PADS), N, seed=11)
    mask = torch.ones_like(ids)
    for b, p in enumerate(PADS):
        ids[b, :p], mask[b, :p] = 0, 0
    return ids, mask


@torch.inference_mode()
def _alone_in_pieces(model, row: torch.Tensor, ends: list[int]):
    """``row`` (no padding) fed into a fresh lossy cache in pieces ``[0, e_1), [e_1, e_2), ...``; the rest by generate."""
    cache = _lossy(model)
    start = 0
    for end in ends:
        model(row[:, start:end], use_cache=True, **cache_kwargs(model, cache))
        start = end
    return model.generate(row, attention_mask=torch.ones_like(row), **cache_kwargs(model, cache), **GEN)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_row_reads_its_question_against_its_stored_context(arch):
    model = tiny_model(arch, layers=2)
    ids, mask = _batch()
    cache = prefill_context(model, _lossy(model), ids, attention_mask=mask, question_len=QUESTIONS)
    assert cache.get_seq_length() == N - min(QUESTIONS)  # every row's context is stored, nothing after the last one
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), **GEN)
    bounds = sorted({N - q for q in QUESTIONS})
    for b, (pad, q) in enumerate(zip(PADS, QUESTIONS)):
        row = ids[b : b + 1, pad:]
        # the rule: the row's context ends at a chunk end; pieces of it may end at earlier rows' boundaries, and
        # its question may be read in pieces ending at later ones
        ends = [e - pad for e in bounds if e > pad]
        assert N - q - pad in ends
        alone = _alone_in_pieces(model, row, ends)
        assert torch.equal(out.sequences[b, N:], alone.sequences[0, row.shape[1] :]), f"row {b}"
        torch.testing.assert_close(out.scores[0][b], alone.scores[0][0], atol=1e-4, rtol=1e-4, msg=f"row {b}")


@torch.inference_mode()
def test_reading_a_question_with_its_own_context_would_be_visible():
    """Control for the test above: had a row's last context tokens been read in the same pass as its question
    (not stored first), its logits would differ measurably from the reference, so the tests can tell."""
    model = tiny_model("llama", layers=2)
    ids, mask = _batch()
    b = QUESTIONS.index(min(QUESTIONS))
    row = ids[b : b + 1, PADS[b] :]
    right = _alone_in_pieces(model, row, [N - QUESTIONS[b] - PADS[b]])
    wrong = _alone_in_pieces(model, row, [N - max(QUESTIONS) - PADS[b]])  # only the earliest boundary
    assert float((right.scores[0] - wrong.scores[0]).abs().max()) > 1e-2
