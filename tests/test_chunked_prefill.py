"""Chunked prefill: generate(prefill_chunk_size=N) and cache.prefill(..., chunk_size=N) keep the whole prompt's
budget, equal the progressive masking oracle (every token hidden from what was evicted before its chunk), and keep
what the documented per-chunk rule, applied by hand, keeps."""

from __future__ import annotations

import io
import math

import pytest
import reference
import torch
import torch.nn.functional as F
from conftest import prompt_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import oracle_model

from kvcache_plugins import CompressedCache
from kvcache_plugins._compat import cache_kwargs

SELECTORS = ("q2c", "snapkv", "h2o", "random", "streaming", "knorm")
QLEN = 6


class Progressive:
    """Oracle visibility: ``allowed[layer]`` ``Bool [B, H_s, N, N]`` (query position x key position)."""

    def __init__(self, allowed: dict[int, torch.Tensor]) -> None:
        self.by_layer = allowed

    def allowed(self, layer: int, q: int, kv: int, device) -> torch.Tensor | None:
        a = self.by_layer.get(layer)
        return None if a is None else a[:, :, kv - q : kv, :kv].to(device)


def _snapshots(model, cache) -> list[list[torch.Tensor]]:
    """Kept positions of every compressed layer after each forward of ``model`` (a list that fills as it runs)."""
    shots: list[list[torch.Tensor]] = []

    def hook(*_):
        shots.append([cache.kept_positions(i).clone() for i in cache.compressed_layers])

    model._test_hook = model.register_forward_hook(hook)
    return shots


def _allowed(segments: list[tuple[int, list[torch.Tensor] | None]], layers: list[int], N: int, B: int, Hs: int):
    """Per layer ``Bool [B, H_s, N, N]``: a query in segment s sees the keys kept before s and its segment's own.

    ``segments``: ``(start, kept)`` in order; ``kept`` are the layers' kept positions ``[B, H_s, S]`` when the
    segment begins (``None``: everything before it).
    """
    out = {}
    for li, layer in enumerate(layers):
        a = torch.zeros(B, Hs, N, N, dtype=torch.bool)
        bounds = [s for s, _ in segments] + [N]
        for (start, kept), stop in zip(segments, bounds[1:], strict=True):
            before = torch.zeros(B, Hs, N, dtype=torch.bool)
            if kept is None:
                before[..., :start] = True
            else:
                k = kept[li].expand(B, Hs, -1)
                before.scatter_(2, k.clamp(min=0), k >= 0)
                before[..., start:] = False
            before[..., start:stop] = True  # the segment's own tokens (causality comes from the model's mask)
            a[:, :, start:stop, :] = before.unsqueeze(2)
        out[layer] = a
    return out


def _oracle_logits(model, seq, mask, allowed):
    oracle = oracle_model(model)
    saved = reference.VISIBILITY
    reference.VISIBILITY = Progressive(allowed)
    try:
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return oracle(seq, attention_mask=mask, position_ids=positions).logits
    finally:
        reference.VISIBILITY = saved


def _budget(n_real: int, q: int, sinks: int, r: float) -> int:
    return sinks + q + math.ceil(r * (n_real - q - sinks) - 1e-9)


def _padded(batch: int, n: int, pads: list[int], seed: int = 0):
    ids = prompt_ids(batch, n, seed=seed)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _check_against_oracle(model, cache, ids, mask, out, shots, segments_from):
    """The generated logits equal the oracle's, given the kept sets the cache recorded."""
    B, n = ids.shape
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(B, seq.shape[1] - n, dtype=mask.dtype)], dim=1)
    Hs = max(s.shape[1] for s in shots[-1])
    allowed = _allowed(segments_from(shots), cache.compressed_layers, seq.shape[1], B, Hs)
    ref = _oracle_logits(model, seq, full_mask, allowed)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, ref[:, n - 1 + step], rtol=1e-4, atol=1e-4)


def _generate_chunked(model, cache, ids, mask, chunk, new=4):
    return model.generate(
        ids, attention_mask=mask, **cache_kwargs(model, cache), prefill_chunk_size=chunk, max_new_tokens=new,
        do_sample=False, output_logits=True, return_dict_in_generate=True,
    )


@pytest.mark.parametrize("granularity", ["layer", "head", "global"])
@pytest.mark.parametrize("selector", SELECTORS)
def test_generate_in_chunks_keeps_the_whole_prompts_budget_and_equals_the_oracle(selector, granularity):
    model = tiny_model("qwen2", layers=2)
    ids, mask = _padded(2, 70, [0, 9])
    chunk = 16
    cache = CompressedCache(model, selector=selector, retention=0.25, question_len=QLEN, granularity=granularity)
    shots = _snapshots(model, cache)
    out = _generate_chunked(model, cache, ids, mask, chunk, new=1)  # one token: no decode step is stored
    model._test_hook.remove()
    for idx in cache.compressed_layers:
        kept = cache.kept_positions(idx)
        for row, pad in enumerate([0, 9]):
            positions = kept[row][kept[row] >= 0].view(kept.shape[1], -1)
            assert positions.shape[-1] == _budget(70 - pad, QLEN, cache.sink_tokens, 0.25)
            assert bool((positions >= 70 - QLEN).sum(-1).eq(QLEN).all())  # the whole prompt's question
            assert bool((positions >= pad).all())
    n_chunks = -(-70 // chunk)
    assert len(shots) == n_chunks
    starts = list(range(0, 70, chunk))
    _check_against_oracle(
        model, cache, ids, mask, out, shots,
        lambda s: [(0, None)] + [(starts[k], s[k - 1]) for k in range(1, n_chunks)] + [(70, s[n_chunks - 1])],
    )


@pytest.mark.parametrize("selector", ["q2c", "snapkv", "random"])
def test_generate_in_chunks_then_decoding_equals_the_oracle(selector):
    model = tiny_model("llama", layers=2)
    ids, mask = _padded(1, 61, [0], seed=3)
    cache = CompressedCache(model, selector=selector, retention=0.4, question_len=QLEN)
    cache.chunk_query_block = 7  # each chunk's attention in blocks of 7 queries: the same output
    shots = _snapshots(model, cache)
    out = _generate_chunked(model, cache, ids, mask, 20, new=5)
    model._test_hook.remove()
    assert cache.get_seq_length() == 61 + 4
    _check_against_oracle(
        model, cache, ids, mask, out, shots,
        lambda s: [(0, None), (20, s[0]), (40, s[1]), (60, s[2]), (61, s[3])],
    )


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_the_chunk_rule_on_one_chunk_is_the_unchunked_selection(granularity):
    """The per-chunk scores, fed the whole prompt as one chunk, are the unchunked selectors' (q2c's stand-in
    question is then the question itself)."""
    model = tiny_model("qwen2")
    ids = prompt_ids(1, 40)
    for selector in SELECTORS:
        unchunked = CompressedCache(model, selector=selector, retention=0.3, question_len=QLEN, granularity=granularity)
        model(ids, **cache_kwargs(model, unchunked))
        one = CompressedCache(model, selector=selector, retention=0.3, question_len=QLEN, granularity=granularity)
        assert one.begin_chunked_prefill(ids, None, chunk_size=1)
        model(ids, **cache_kwargs(model, one))
        one.end_chunked_prefill()
        assert torch.equal(one.kept_positions(), unchunked.kept_positions()), selector


def test_finch_prefill_keeps_the_budget_and_equals_the_oracle():
    model = tiny_model("qwen2", layers=2)
    ids, mask = _padded(2, 80, [0, 11], seed=5)
    q = 7
    cache = CompressedCache(model, selector="q2c", retention=0.3, question_len=q)
    shots = _snapshots(model, cache)
    cache.prefill(model, ids, mask, chunk_size=16)
    for idx in cache.compressed_layers:
        kept = cache.kept_positions(idx)
        for row, pad in enumerate([0, 11]):
            positions = kept[row][kept[row] >= 0]
            # the budget minus the last prompt token, which generate() processes
            assert positions.numel() == _budget(80 - pad, q, 0, 0.3) - 1
            assert positions.max() == 78 and bool((positions[-(q - 1) :] == torch.arange(80 - q, 79)).all())
    out = model.generate(
        ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=4, do_sample=False, output_logits=True,
        return_dict_in_generate=True,
    )
    model._test_hook.remove()
    chunks = len(range(0, 80 - q, 16))
    assert len(shots) == chunks + 1 + 4  # probes, the question, the last prompt token, 3 decode steps
    starts = list(range(0, 80 - q, 16))
    _check_against_oracle(
        model, cache, ids, mask, out, shots,
        lambda s: [(0, None)] + [(starts[k], s[k - 1]) for k in range(1, chunks)] + [(80 - q, s[chunks - 1])],
    )


def test_finch_with_one_chunk_is_unchunked_q2c():
    """One probe forward is [context; question] at the true positions: the unchunked prompt itself."""
    model = tiny_model("qwen2", layers=2)
    ids = prompt_ids(1, 50, seed=2)
    finch = CompressedCache(model, selector="q2c", retention=0.2, question_len=QLEN)
    finch.prefill(model, ids, chunk_size=64)
    unchunked = CompressedCache(model, selector="q2c", retention=0.2, question_len=QLEN)
    model(ids, **cache_kwargs(model, unchunked))
    for idx in finch.compressed_layers:
        assert torch.equal(finch.kept_positions(idx)[..., :-(QLEN - 1)], unchunked.kept_positions(idx)[..., :-QLEN])


# ------------------------------------------------------------------------- the per-chunk rule, applied by hand
def _by_hand(model, ids, chunk, selector, r, q, window=32, kernel=5):
    """Kept positions per layer after a chunked prefill of ``ids`` [1, n], recomputed with the oracle model.

    Per chunk [t0, t1): one oracle forward over ids[:, :t1] in which every token sees only what was kept before
    its chunk; keys from k_proj (the key norm ignores RoPE), attention weights from eager attention. SnapKV: the
    chunk's last ``window`` queries, mean over them, sum over the query heads of a KV head / G, average-pooled along
    the held positions, mean over heads; the chunk's window always kept (scored 2 + j / n). Knorm: -||k|| mean over heads. Finch (``"q2c"``, chunks over the context
    only): the question follows each chunk at its true positions, seeing the held tokens; its queries score them
    like the window (no pooling). Keep the best ``ceil(r * context)`` context positions (ties to the earlier) and
    the question.
    """
    n = ids.shape[1]
    layers = list(range(model.config.num_hidden_layers))
    H, Hq = model.config.num_key_value_heads, model.config.num_attention_heads
    G = Hq // H
    budget = math.ceil(r * (n - q) - 1e-9)
    kept: list[torch.Tensor | None] = [None] * len(layers)
    history: list[list[torch.Tensor]] = []
    keys: dict[int, torch.Tensor] = {}
    handles = [
        model.model.layers[i].self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: keys.__setitem__(i, o))
        for i in layers
    ]
    try:
        finch = selector == "q2c"
        end = n - q if finch else n
        for t0 in range(0, end, chunk):
            t1 = min(t0 + chunk, end)
            segs = [(0, None)] + [(t0_, history[k]) for k, t0_ in enumerate(range(chunk, t1, chunk))]
            x, pos = ids[:, :t1], torch.arange(t1)
            if finch:
                held_now = [torch.arange(t1) if k is None else torch.cat([k, torch.arange(t0, t1)]) for k in kept]
                segs.append((t1, [h.view(1, 1, -1) for h in held_now]))
                x, pos = torch.cat([x, ids[:, n - q :]], 1), torch.cat([pos, torch.arange(n - q, n)])
            allowed = _allowed(segs, layers, x.shape[1], 1, 1)
            saved = reference.VISIBILITY
            reference.VISIBILITY = Progressive(allowed)
            try:
                out = oracle_model(model)(x, position_ids=pos.view(1, -1), output_attentions=True)
            finally:
                reference.VISIBILITY = saved
            new_kept = []
            for li in layers:
                held = torch.arange(t1) if kept[li] is None else torch.cat([kept[li], torch.arange(t0, t1)])
                if selector == "knorm":
                    k = keys[li][0].view(t1, H, -1)[held]  # [T, H, D]
                    scores = -k.norm(dim=-1).mean(-1)
                elif finch:
                    att = out.attentions[li][0][:, t1:][:, :, held]  # [Hq, q, T]
                    scores = (att.mean(1).view(H, G, -1).sum(1) / G).mean(0)
                else:
                    w = min(window, t1 - t0)
                    att = out.attentions[li][0][:, t1 - w : t1][:, :, held]  # [Hq, w, T]
                    per_kv = att.mean(1).view(H, G, -1).sum(1) / G
                    pooled = F.avg_pool1d(per_kv.unsqueeze(1), kernel, 1, kernel // 2, count_include_pad=False)
                    scores = pooled.squeeze(1).mean(0)
                    window_pos = (held >= t1 - w) & (held < t1)  # the chunk's window is always kept, newest first
                    scores = torch.where(window_pos, 2.0 + held.float() / n, scores)
                context = held < n - q
                if int(context.sum()) > budget:
                    order = torch.argsort(scores.masked_fill(~context, float("-inf")), descending=True, stable=True)
                    keep = torch.zeros_like(context)
                    keep[order[:budget]] = True
                    held = held[keep | ~context]
                kept[li] = held
                new_kept.append(held.view(1, 1, -1))
            history.append(new_kept)
    finally:
        for h in handles:
            h.remove()
    return kept


@pytest.mark.parametrize("selector", ["snapkv", "knorm", "q2c"])
def test_chunked_selection_equals_the_rule_applied_by_hand(selector):
    """snapkv and knorm under generate(prefill_chunk_size=20); q2c through Finch (cache.prefill)."""
    model = tiny_model("qwen2", attn="eager", layers=2)
    ids = prompt_ids(1, 90, seed=7)
    opts = dict(window=12) if selector == "snapkv" else {}
    cache = CompressedCache(model, selector=selector, retention=0.3, question_len=QLEN, **opts)
    if selector == "q2c":
        cache.prefill(model, ids, chunk_size=20)
        kept = [cache.kept_positions(i)[0, 0, : -(QLEN - 1)] for i in cache.compressed_layers]
    else:
        model.generate(ids, **cache_kwargs(model, cache), prefill_chunk_size=20, max_new_tokens=1)
        kept = [cache.kept_positions(i)[0, 0] for i in cache.compressed_layers]
    expected = _by_hand(model, ids, 20, selector, 0.3, QLEN, window=12)
    for li in range(len(kept)):
        if selector == "q2c":
            expected[li] = expected[li][expected[li] < 90 - QLEN]
        assert kept[li].tolist() == expected[li].tolist(), f"layer {li}"


def test_peak_memory_is_about_the_budget_plus_one_chunk():
    model = tiny_model("qwen2", layers=2)
    ids = prompt_ids(1, 400)
    per_token = 2 * model.config.num_key_value_heads * 16 * 4 * 2  # K and V, fp32, both layers
    cache = CompressedCache(model, selector="snapkv", retention=0.25, question_len=QLEN)
    model.generate(ids, **cache_kwargs(model, cache), prefill_chunk_size=32, max_new_tokens=1)
    budget = _budget(400, QLEN, 0, 0.25)
    assert cache.memory_footprint().full_precision == budget * per_token
    assert cache.peak_prefill_bytes <= (budget + 32) * per_token + 4 * 2 * (budget + 32)  # plus int32 positions


def test_bad_arguments_fail_before_any_forward():
    model = tiny_model("qwen2")
    ids = prompt_ids(2, 30)
    cache = CompressedCache(model, selector="q2c", retention=0.5, question_len=[3, 4])
    with pytest.raises(ValueError, match="same question_len"):
        cache.prefill(model, ids, chunk_size=8)
    assert cache.get_seq_length() == 0
    cache = CompressedCache(model, selector="snapkv", retention=0.5)
    with pytest.raises(ValueError, match="chunk_size"):
        cache.prefill(model, ids, chunk_size=0)
    with pytest.raises(ValueError, match="built with"):
        cache.prefill(tiny_model("qwen2"), ids, chunk_size=8)
    with pytest.raises(TypeError, match="LongTensor"):
        cache.prefill(model, ids.float(), chunk_size=8)


# ----------------------------------------------------------------------------------------- scout selections
@pytest.mark.parametrize("spec", ["q2c:0.25:global@construction", "snapkv:0.3:layer@construction"])
def test_construction_specs_in_chunks_equal_the_unchunked_construction(spec):
    """With the positions known up front, a chunked construction prefill hides exactly what the unchunked one
    hides: same kept positions, same logits; the cache never holds more than the selection plus one chunk."""
    from conftest import make_tokenizer

    from kvcache_plugins.specs import make_cache

    model, tok = tiny_model("qwen2", layers=2), make_tokenizer()
    ids, mask = _padded(2, 60, [0, 7], seed=4)
    runs = []
    for chunk in (None, 16):
        cache = make_cache(spec, model, question_len=QLEN, tokenizer=tok, input_ids=ids, attention_mask=mask)
        out = _generate_chunked(model, cache, ids, mask, chunk, new=4)
        runs.append((cache, out))
    (plain, a), (chunked, b) = runs
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    for idx in plain.compressed_layers:
        assert torch.equal(plain.kept_positions(idx), chunked.kept_positions(idx))
    stored = plain.layers[plain.compressed_layers[0]].stored - 3  # minus the decoded tokens
    per_slot = plain.memory_footprint().total // plain.layers[plain.compressed_layers[0]].stored
    assert chunked.peak_prefill_bytes <= (stored + 16) * per_slot


def test_post_hoc_scout_selection_in_chunks_keeps_the_selected_positions():
    from conftest import make_tokenizer

    from kvcache_plugins import Scout, ScoutMaskedCache

    model, tok = tiny_model("qwen2", layers=2), make_tokenizer()
    ids, mask = _padded(2, 50, [3, 0], seed=6)
    selection = Scout(model, tok, "q2c", 0.3).select(ids, mask, question_len=QLEN)
    cache = ScoutMaskedCache(selection, model, tokenizer=tok)
    _generate_chunked(model, cache, ids, mask, 12, new=1)
    kept = cache.kept_positions()[:, 0, :]
    for row, pad in enumerate([3, 0]):
        assert [p - pad for p in kept[row].tolist() if p >= 0] == selection.kept_tokens(row)


# ----------------------------------------------------------------------------------------------- benchmarks
def test_long_prompt_rows_report_chunked_prefill_memory():
    import random

    from kvcache_plugins.bench.long_context import LONG_CACHES, long_example, print_long_table, run_long
    from kvcache_plugins.reference import load_reference_model

    ex = long_example(random.Random(0), 400)
    asked = ex.prompt.split()[-1]
    assert ex.prompt.split()[1:-3:3].count(asked) == 1 and ex.num_tokens == len(ex.prompt.split())
    model, tok = load_reference_model()
    rows = run_long(model, tok, [300], limit=1, chunk=64, seed=1, device="cpu")
    assert [r.cache for r in rows] == ["full"] + [f"{c} chunked" for c in LONG_CACHES[1:]]
    full = rows[0]
    for r in rows[1:]:
        assert r.extra["prefill_chunk"] == 64
        assert r.extra["peak_prefill_x_full"] < 0.6  # 25% kept plus one 64-token chunk of ~300
        assert r.kv_bytes < 0.35 * full.kv_bytes
    out = io.StringIO()
    print_long_table(rows, out)
    assert "peak prefill KV" in out.getvalue()


def test_chunked_prefill_benchmark_measures_one_configuration():
    from kvcache_plugins.bench.chunked_prefill import run_one
    from kvcache_plugins.bench.selection_prefill import memory_supported

    if not memory_supported():
        pytest.skip("needs Linux /proc")
    small = run_one("snapkv chunked", 512, 64, 0.25, new_tokens=1)
    full = run_one("full", 512, 64, 0.25, new_tokens=1)
    assert small["cache_final"] < 0.35 * full["cache_final"]
    assert small["cache_peak"] < 0.5 * full["cache_peak"]
    assert small["rss_rise"] >= 0


def test_quantized_kept_tokens_in_chunks():
    """Chunks are quantized on arrival and cut back by gathering codes, scales and zeros (per token): the first
    layer's keys (which no attention shapes) equal the unchunked cache's, quantized the same way."""
    from kvcache_plugins.quant.groupwise import QuantizedTensor

    model = tiny_model("qwen2", layers=2)
    ids = prompt_ids(1, 80, seed=8)
    opts = dict(selector="streaming", retention=0.25, question_len=QLEN, quant="int8", group_size=8)
    cache = CompressedCache(model, **opts)
    with torch.no_grad():
        model.generate(ids, **cache_kwargs(model, cache), prefill_chunk_size=16, max_new_tokens=1)
        plain = CompressedCache(model, **opts)
        model(ids, **cache_kwargs(model, plain))
    first = cache.compressed_layers[0]
    layer, ref = cache.layers[first], plain.layers[first]
    assert isinstance(layer.stored_keys, QuantizedTensor)
    assert layer.stored == ref.stored == _budget(80, QLEN, 4, 0.25)
    assert torch.equal(layer.kept_positions(), ref.kept_positions())
    assert torch.equal(layer.stored_keys.dequantize(torch.float32), ref.stored_keys.dequantize(torch.float32))


@pytest.mark.parametrize("arch,attn", [("gemma3", "sdpa"), ("gemma2", "eager"), ("phi3", "sdpa")])
def test_chunks_with_sliding_window_layers_and_other_architectures_equal_the_oracle(arch, attn):
    """Sliding-window layers keep their own window across chunks; the full-attention layers are cut back."""
    model = tiny_model(arch, attn, layers=2)
    ids, mask = _padded(2, 50, [5, 0], seed=9)
    cache = CompressedCache(model, selector="snapkv", retention=0.3, question_len=QLEN, window=8)
    shots = _snapshots(model, cache)
    out = _generate_chunked(model, cache, ids, mask, 16, new=3)
    model._test_hook.remove()
    _check_against_oracle(
        model, cache, ids, mask, out, shots, lambda s: [(0, None), (16, s[0]), (32, s[1]), (48, s[2]), (50, s[3])]
    )
    finch = CompressedCache(model, selector="q2c", retention=0.3, question_len=QLEN)
    finch.prefill(model, ids, mask, chunk_size=16)
    model.generate(ids, attention_mask=mask, **cache_kwargs(model, finch), max_new_tokens=2)


def test_long_rows_are_refused_for_other_tasks_before_loading(tmp_path):
    from kvcache_plugins.bench import run

    with pytest.raises(SystemExit):
        run.main(["--model", "/nonexistent", "--task", "kv_squad_v2", "--long", "--out", str(tmp_path)])


_MODEL = None


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    n=st.integers(20, 90), chunk=st.integers(3, 40), retention=st.floats(0.05, 1.0), pad=st.integers(0, 15),
    q=st.integers(0, 8), sinks=st.integers(0, 3), selector=st.sampled_from(SELECTORS),
)
def test_property_chunked_counts_are_the_whole_prompts_budget(n, chunk, retention, pad, q, sinks, selector):
    global _MODEL
    _MODEL = _MODEL or tiny_model("qwen2", layers=1)
    q = max(q, 1) if selector == "q2c" else q
    ids, mask = _padded(2, n, [0, min(pad, n - q - sinks - 1)], seed=n)
    cache = CompressedCache(
        _MODEL, selector=selector, retention=retention, question_len=q, sink_tokens=sinks, granularity="head"
    )
    _MODEL.generate(ids, attention_mask=mask, **cache_kwargs(_MODEL, cache), prefill_chunk_size=chunk, max_new_tokens=1)
    kept = cache.kept_positions()
    for row in range(2):
        real = int(mask[row].sum())
        held = kept[row][kept[row] >= 0].view(kept.shape[1], -1)
        assert held.shape[-1] == _budget(real, q, sinks, retention)
        assert bool((held >= n - real).all()) and bool((held[:, held.shape[-1] - q :] == torch.arange(n - q, n)).all())


def test_a_chunked_prefill_saves_and_continues_like_the_original():
    """Encode a long document once in chunks, send it, continue elsewhere: the same tokens and logits."""
    model = tiny_model("qwen2", layers=2)
    ids, mask = _padded(2, 60, [4, 0], seed=10)
    cache = CompressedCache(model, selector="snapkv", retention=0.3, question_len=QLEN, quant="int8", group_size=8)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), prefill_chunk_size=16, max_new_tokens=1)
    loaded = CompressedCache.from_bytes(cache.to_bytes(), model)
    follow = torch.cat([ids, prompt_ids(2, 3, seed=11)], dim=1)
    fmask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1)
    outs = [
        model.generate(follow, attention_mask=fmask, **cache_kwargs(model, c), max_new_tokens=3, do_sample=False,
                       output_logits=True, return_dict_in_generate=True)
        for c in (cache, loaded)
    ]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits, strict=True):
        assert torch.equal(a, b)
