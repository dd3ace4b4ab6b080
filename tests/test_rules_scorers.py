"""Issue 25 (8): every scorer against a by-hand reference of its docstring formula, not only the masking oracle.

The references below are written from the formulas in ``kvcache_plugins/selection/*.py`` (and the README table) with
explicit loops over rows, heads and positions, in float64: nothing is taken from the selectors' code. They run on
a left-padded batch with attention soft-capping, so a forgotten padding mask, a softmax over padding, a missing
``tanh`` cap or a wrong normaliser each changes the scores. The model tests then check that the cache hands the
selector the model's own soft-capping and scaling (Gemma 2), that what it keeps is the top of the reference
scores, and that no padding position is ever kept.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import prompt_ids, tiny_model

from kvcache_plugins import CompressedCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.selection import make_selector
from kvcache_plugins.selection import PromptLayout, ScoreContext

B, HKV, G, D = 2, 2, 2, 8
N = 22
PAD = (0, 5)  # row 1 is left-padded by 5
QUESTION = (3, 5)
SINKS = (1, 2)
SCALING = 0.9  # large logits, so a soft-cap of 2 changes them a lot
SOFTCAP = 2.0


def _context() -> ScoreContext:
    g = torch.Generator().manual_seed(25)
    keys = torch.randn(B, HKV, N, D, generator=g) * 1.5
    queries = torch.randn(B, HKV * G, N, D, generator=g) * 1.5
    values = torch.randn(B, HKV, N, D, generator=g)
    for b, p in enumerate(PAD):  # padding holds garbage, large enough to win any score it is allowed into
        keys[b, :, :p] = 40.0
        queries[b, :, :p] = 40.0
        values[b, :, :p] = 40.0
    layout = PromptLayout(N, torch.tensor(PAD), torch.tensor(QUESTION), torch.tensor(SINKS))
    return ScoreContext(3, keys, queries, SCALING, SOFTCAP, layout, seed=0, values=values)


def _logit(ctx: ScoreContext, b: int, qh: int, i: int, j: int) -> float:
    x = SCALING * float(ctx.queries[b, qh, i].double() @ ctx.keys[b, qh // G, j].double())
    return ctx.softcap * math.tanh(x / ctx.softcap) if ctx.softcap else x


def _probs(ctx: ScoreContext, b: int, qh: int, i: int) -> dict[int, float]:
    """softmax_j over the keys query ``i`` sees: ``pad_b <= j <= i``."""
    visible = range(PAD[b], i + 1)
    logits = {j: _logit(ctx, b, qh, i, j) for j in visible}
    top = max(logits.values())
    e = {j: math.exp(v - top) for j, v in logits.items()}
    total = sum(e.values())
    return {j: v / total for j, v in e.items()}


def _mean_attention(ctx: ScoreContext, b: int, h: int, queries: list[int]) -> list[float]:
    """``1 / (|Q| * G) * sum_{i in Q} sum_g p_{i,g}(j)`` for every position j (0 where no query sees j)."""
    out = [0.0] * N
    for i in queries:
        for g in range(G):
            for j, p in _probs(ctx, b, h * G + g, i).items():
                out[j] += p / (len(queries) * G)
    return out


def ref_q2c(ctx, b, h):
    return _mean_attention(ctx, b, h, list(range(N - QUESTION[b], N)))


def ref_tova(ctx, b, h):
    return _mean_attention(ctx, b, h, [N - 1])  # the last real prompt position (padding is on the left)


def ref_h2o(ctx, b, h):
    out = [0.0] * N
    for j in range(PAD[b], N):
        seen_by = [i for i in range(PAD[b], N) if i >= j]
        out[j] = sum(_probs(ctx, b, h * G + g, i)[j] for i in seen_by for g in range(G)) / (G * len(seen_by))
    return out


def ref_snapkv(ctx, b, h, window=4, kernel=3):
    W = list(range(N - min(window, N - PAD[b]), N))
    a = _mean_attention(ctx, b, h, W)
    half = kernel // 2
    pooled = []
    for j in range(N):  # average pooling, stride 1, over the columns that exist
        span = [a[t] for t in range(max(0, j - half), min(N, j + half + 1))]
        pooled.append(sum(span) / len(span))
    for j in W:  # the observation window is always kept, newest highest
        pooled[j] = 2 + j / N
    return pooled


def ref_expected_attention(ctx, b, h, window=6, epsilon=0.0):
    W = list(range(N - min(window, N - PAD[b]), N))
    s = SCALING
    real = list(range(PAD[b], N))
    attention = [0.0] * N
    for g in range(G):
        q = ctx.queries[b, h * G + g].double()
        mu = sum(q[i] for i in W) / len(W)
        sigma = sum(torch.outer(q[i] - mu, q[i] - mu) for i in W) / len(W)
        z = {}
        for j in real:
            k = ctx.keys[b, h, j].double()
            z[j] = s * float(mu @ k) + s * s / 2 * float(k @ sigma @ k)
        top = max(z.values())
        total = sum(math.exp(v - top) for v in z.values())
        for j in real:
            attention[j] += math.exp(z[j] - top) / total / G
    return [(attention[j] + epsilon) * float(ctx.values[b, h, j].double().norm()) for j in range(N)]


def ref_keydiff(ctx, b, h):
    real = list(range(PAD[b], N))
    k = ctx.keys[b, h].double()
    anchor = sum(k[i] / k[i].norm() for i in real) / len(real)
    return [-float(k[j] @ anchor) / float(k[j].norm() * anchor.norm()) for j in range(N)]


def ref_knorm(ctx, b, h):
    return [-float(ctx.keys[b, h, j].double().norm()) for j in range(N)]


def ref_streaming(ctx, b, h):
    return [float(j) for j in range(N)]


def _sample_std(x: torch.Tensor) -> torch.Tensor:
    """Per-row sample standard deviation over the last dim (kvpress' ``torch.std``)."""
    mean = x.mean(-1, keepdim=True)
    return (((x - mean) ** 2).sum(-1) / (x.shape[-1] - 1)).sqrt()


def ref_lagkv(ctx, b, h, lag=4, cross_chunk=False):
    out = [2 + j / N for j in range(N)]
    s = PAD[b] + SINKS[b]
    chunks = (N - s) // lag
    for c in range(chunks - 1):  # every whole chunk with a whole chunk after it
        cur = list(range(s + c * lag, s + (c + 1) * lag))
        nxt = list(range(s + (c + 1) * lag, s + (c + 2) * lag))
        total = [0.0] * lag
        for x in (ctx.keys, ctx.values):
            ref = x[b, h, nxt].double()
            lo, hi = ref.min(0).values, ref.max(0).values
            normed = (x[b, h, cur].double() - lo) / (hi - lo).clamp(min=1e-6)
            std = _sample_std(normed)
            soft = torch.softmax(std, 0)
            total = [t + float(v) / 2 for t, v in zip(total, soft)]
        if cross_chunk:
            scores = total
        else:  # rank within the chunk / lag
            order = sorted(range(lag), key=lambda i: (total[i], i))
            scores = [0.0] * lag
            for rank, i in enumerate(order):
                scores[i] = rank / lag
        for i, j in enumerate(cur):
            out[j] = scores[i]
    return out


REFERENCES = {
    "q2c": (ref_q2c, {}),
    "tova": (ref_tova, {}),
    "h2o": (ref_h2o, {"chunk": 5}),
    "snapkv": (ref_snapkv, {"window": 4, "kernel": 3}),
    "expected_attention": (ref_expected_attention, {"window": 6}),
    "expected_attention eps": (lambda c, b, h: ref_expected_attention(c, b, h, epsilon=0.1), {"window": 6, "epsilon": 0.1}),
    "keydiff": (ref_keydiff, {}),
    "knorm": (ref_knorm, {}),
    "streaming": (ref_streaming, {}),
    "lagkv": (ref_lagkv, {"lag": 4}),
    "lagkv cross": (lambda c, b, h: ref_lagkv(c, b, h, cross_chunk=True), {"lag": 4, "cross_chunk": True}),
}


def test_every_registered_scorer_has_a_reference():
    from kvcache_plugins.selection import make_selector, selector_names

    covered = {name.split()[0] for name in REFERENCES}
    # the package's scorers (other tests register their own)
    ours = {n for n in selector_names() if type(make_selector(n)).__module__.startswith("kvcache_plugins.selection")}
    assert ours - covered == {"random"}  # random has no formula to check, only its seed


@pytest.mark.parametrize("name", list(REFERENCES))
def test_scorer_matches_its_formula_on_a_padded_soft_capped_batch(name):
    ref, options = REFERENCES[name]
    ctx = _context()
    scores = make_selector(name.split()[0], **options).score(ctx).double()
    assert scores.shape[0] in (1, B) and scores.shape[1] in (1, HKV) and scores.shape[-1] == N  # broadcasts
    scores = scores.expand(B, -1, N)
    for b in range(B):
        for h in range(HKV):
            want = torch.tensor(ref(ctx, b, h), dtype=torch.float64)
            got = scores[b, h if scores.shape[1] > 1 else 0]
            real = slice(PAD[b], N)  # padding columns are never candidates (checked below)
            torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-6, msg=f"{name} row {b} head {h}")


def test_soft_capping_changes_the_attention_scores():
    """The reference's cap matters at these logits: uncapped scores differ, so a scorer ignoring it fails above."""
    ctx = _context()
    uncapped = ScoreContext(ctx.layer_idx, ctx.keys, ctx.queries, SCALING, None, ctx.layout, 0, ctx.values)
    for name in ("q2c", "tova", "h2o", "snapkv"):
        options = REFERENCES[name][1]
        a = make_selector(name, **options).score(ctx)[1, :, PAD[1]:]
        c = make_selector(name, **options).score(uncapped)[1, :, PAD[1]:]
        assert float((a - c).abs().max()) > 1e-3, name


# ------------------------------------------------------------------------------------------ through the cache


class Recorder:
    """Wraps a selector instance; keeps the ScoreContext of every call (not a mock: the real selector scores)."""

    def __init__(self, selector):
        self.inner = selector
        self.contexts: list[ScoreContext] = []

    def __call__(self, ctx):
        self.contexts.append(ctx)
        return self.inner.__class__.score(self.inner, ctx)


def _recording(name: str, **options):
    selector = make_selector(name, **options)
    recorder = Recorder(selector)
    selector.score = recorder  # instance attribute: the cache calls selector.score(ctx)
    return selector, recorder


def _padded_batch(n: int = 20, pad: int = 6):
    ids = prompt_ids(2, n, seed=4)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


GEMMA_SOFTCAP = 1.5  # small, so the cap changes the tiny model's attention


@pytest.mark.parametrize("name", ["tova", "q2c", "snapkv", "h2o", "expected_attention", "keydiff", "lagkv", "knorm"])
def test_gemma2_cache_scores_with_the_models_softcap_and_never_keeps_padding(name):
    model = tiny_model(
        "gemma2", attn="eager", layers=2, attn_logit_softcapping=GEMMA_SOFTCAP, query_pre_attn_scalar=4
    )
    options = {"snapkv": {"window": 4, "kernel": 3}, "expected_attention": {"window": 4}, "lagkv": {"lag": 3}}.get(name, {})
    selector, recorder = _recording(name, **options)
    cache = CompressedCache(model, selector=selector, retention=0.3, question_len=3, sink_tokens=1, granularity="head")
    ids, mask = _padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_kwargs(model, cache))
    assert len(recorder.contexts) == len(cache.compressed_layers) == 1
    ctx = recorder.contexts[0]
    attention = model.model.layers[cache.compressed_layers[0]].self_attn
    assert ctx.softcap == GEMMA_SOFTCAP == model.config.attn_logit_softcapping
    assert ctx.scaling == pytest.approx(attention.scaling) and attention.scaling == pytest.approx(4**-0.5)
    assert ctx.layout.pad.tolist() == [0, 6]
    kept = cache.kept_positions()
    for b in range(2):
        used = kept[b][kept[b] >= 0]
        assert bool((used >= int(ctx.layout.pad[b])).all()), f"row {b} keeps padding: {kept[b].tolist()}"
    # the kept context is the top of the scores computed from what the model used, capped as the model caps
    scores = selector.__class__.score(selector, ctx)
    ctx_mask = ctx.layout.context_mask()
    for b in range(2):
        budget = math.ceil(0.3 * int(ctx.layout.context_len[b]) - 1e-9)
        for h in range(kept.shape[1]):
            row = scores[b, h if scores.shape[1] > 1 else 0].tolist()
            candidates = [j for j in range(len(row)) if bool(ctx_mask[b, j])]
            want = set(sorted(candidates, key=lambda j: (-row[j], j))[:budget])  # ties: the earlier position
            got = {p for p in kept[b, h].tolist() if p >= 0 and bool(ctx_mask[b, p])}
            assert got == want, (name, b, h)
