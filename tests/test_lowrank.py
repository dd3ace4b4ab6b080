"""Low-rank (SVD) KV storage: full rank equals the full cache, error falls with rank (Eckart-Young), eviction plus
low rank equals the masking oracle over the reconstructed kept tokens, byte accounting, specs, save/load, scout."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer, prompt_ids, tiny_model
from hypothesis import given
from hypothesis import strategies as st
from reference import VISIBILITY, oracle_model
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvcache_plugins import CompressedCache, LowRankCache, ScoutMaskedCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.layers.lowrank import LowRankCompressedLayer, LowRankLayer
from kvcache_plugins.quant.lowrank import factor_group_size, factorize, relative_error, resolve_ranks
from kvcache_plugins.specs import make_cache, parse_spec

D = 16  # head_dim of the tiny test models
QLEN = 5


def _svd_oracle(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of every ``[T, D]`` matrix of ``x``, written as plainly as possible."""
    U, S, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    return ((U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]).to(x.dtype)


def _rotate_half(x):
    return torch.cat([-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]], dim=-1)


def _pre_rope_oracle(model, x: torch.Tensor, positions: torch.Tensor, rank: int) -> torch.Tensor:
    """RoPE undone at ``positions`` ``[B, T]`` (full rotary, unscaled), best rank-r approximation, RoPE re-applied."""
    cos, sin = model.model.rotary_emb(x, positions)
    cos, sin = cos.unsqueeze(1).double(), sin.unsqueeze(1).double()
    x = x.double()
    low = _svd_oracle(x * cos - _rotate_half(x) * sin, rank)
    return (low * cos + _rotate_half(low) * sin).float()


def _logits(model, cache, ids, steps):
    """Prefill ``ids`` then feed ``steps`` ``[B, s]`` tokens one forward at a time; the logits of every forward."""
    out = []
    with torch.no_grad():
        out.append(model(ids, **cache_kwargs(model, cache)).logits)
        for i in range(steps.shape[1]):
            out.append(model(steps[:, i : i + 1], **cache_kwargs(model, cache)).logits)
    return out


# ------------------------------------------------------------------------------------------------ acceptance


@pytest.mark.parametrize(
    "arch,keys",
    [("llama", "pre_rope"), ("llama", "post_rope"), ("qwen2", "pre_rope"), ("gemma2", "pre_rope"),
     ("gemma3", "pre_rope"), ("gpt_neox", "pre_rope"), ("phi3", "pre_rope")],
)
def test_full_rank_reproduces_the_full_cache(arch, keys):
    model = tiny_model(arch, attn="eager" if arch == "gemma2" else "sdpa")
    ids, steps = prompt_ids(2, 30), prompt_ids(2, 4, seed=1)
    ref = _logits(model, DynamicCache(config=model.config), ids, steps)
    cache = LowRankCache(model, D, keys=keys)
    ours = _logits(model, cache, ids, steps)
    assert any(isinstance(layer, LowRankLayer) for layer in cache.layers)
    if arch.startswith("gemma"):  # sliding-window layers keep transformers' own layer
        assert any(type(layer) is not LowRankLayer for layer in cache.layers)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    # and generate() gives the same tokens
    a = model.generate(ids, **cache_kwargs(model, LowRankCache(model, D, keys=keys)), max_new_tokens=6, do_sample=False)
    b = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("keys", ["pre_rope", "post_rope"])
def test_reconstruction_error_decreases_with_rank_on_a_fixed_input(keys):
    model = tiny_model("llama")
    ids = prompt_ids(1, 48)
    errors = {}
    for rank in range(1, D + 1):
        cache = LowRankCache(model, rank, keys=keys)
        full = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
            model(ids, **cache_kwargs(model, full))
        k_hat, v_hat = cache.layers[1].materialize()
        errors[rank] = relative_error(full.layers[1].keys, k_hat) + relative_error(full.layers[1].values, v_hat)
        # Eckart-Young: what is stored is the best rank-r approximation (before or after RoPE), nothing worse
        k = full.layers[1].keys
        if keys == "post_rope":
            expected = _svd_oracle(k, rank)
        else:
            expected = _pre_rope_oracle(model, k, torch.arange(48)[None], rank)
        torch.testing.assert_close(k_hat, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(v_hat, _svd_oracle(full.layers[1].values, rank), rtol=0, atol=1e-5)
    seq = [errors[r] for r in range(1, D + 1)]
    assert all(a >= b - 1e-6 for a, b in zip(seq, seq[1:])), seq
    assert seq[0] > 0.1 and seq[-1] < 1e-5


@given(
    rank=st.integers(1, 8), tokens=st.integers(1, 40), seed=st.integers(0, 2**16),
)
def test_factor_error_is_the_tail_of_the_singular_values(rank, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, tokens, 8, generator=g)
    f = factorize(x, rank)
    assert f.left.shape == (2, 3, tokens, rank) and f.right.shape == (2, 3, rank, 8)
    S = torch.linalg.svdvals(x.double())
    expected = S[..., rank:].pow(2).sum(-1).sqrt()
    got = (x.double() - f.reconstruct(torch.float32).double()).norm(dim=(-2, -1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class _ReferenceLowRankLayer(DynamicLayer):
    """Full keys/values; the prompt positions ``kept`` ``[B, Hs, S]`` are read back as the best rank-r
    approximation of the kept tokens (factored after gathering them), every later token as it is."""

    def __init__(self, kept: torch.Tensor, rank: int, model=None):
        super().__init__()
        self.kept, self.rank, self.model = kept, rank, model  # model: keys factored before RoPE

    def _view(self, x: torch.Tensor, rope: bool) -> torch.Tensor:
        B, H, _, Dh = x.shape
        index = self.kept.clamp(min=0).expand(B, H, -1)
        gathered = x.gather(2, index.unsqueeze(-1).expand(B, H, index.shape[-1], Dh))
        if rope:  # the kept tokens' own positions, head by head
            heads = []
            for h in range(H):
                positions = self.kept[:, min(h, self.kept.shape[1] - 1)]
                heads.append(_pre_rope_oracle(self.model, gathered[:, h : h + 1], positions, self.rank)[:, 0])
            low = torch.stack(heads, dim=1)
        else:
            low = _svd_oracle(gathered, self.rank)
        out = x.clone()
        out.scatter_(2, index.unsqueeze(-1).expand_as(gathered), low)
        return out

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        past_k, past_v = self._view(self.keys, self.model is not None), self._view(self.values, False)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        return torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)


@pytest.mark.parametrize("granularity,rank,keys", [
    ("layer", 3, "pre_rope"), ("head", 8, "pre_rope"), ("layer", 8, "post_rope"), ("head", 3, "post_rope"),
])
def test_eviction_plus_low_rank_equals_masking_oracle_on_reconstructed_tokens(granularity, rank, keys):
    model = tiny_model("qwen2")
    oracle = oracle_model(model)
    ids = prompt_ids(2, 32)
    cache = CompressedCache(
        model, selector="q2c", retention=0.4, question_len=QLEN, granularity=granularity, lowrank=rank,
        lowrank_keys=keys,
    )
    gen = dict(do_sample=False, max_new_tokens=6, output_logits=True, return_dict_in_generate=True)
    ours = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), **gen)
    total = ours.sequences.shape[1]
    VISIBILITY.__init__()
    VISIBILITY.prompt_len = ids.shape[1]
    ref_cache = DynamicCache(config=oracle.config)
    for idx in cache.compressed_layers:
        kept = cache.kept_positions(idx)
        assert isinstance(cache.layers[idx], LowRankCompressedLayer)
        prompt_slots = int((kept[0, 0] < ids.shape[1]).sum())
        assert prompt_slots == QLEN + 11  # ceil(0.4 * 27) context tokens + the question
        keep = torch.zeros(*kept.shape[:2], total, dtype=torch.bool)
        keep.scatter_(2, kept.clamp(min=0), kept >= 0)
        keep[..., ids.shape[1] :] = True
        VISIBILITY.hidden[idx] = ~keep
        rope_model = model if keys == "pre_rope" else None
        ref_cache.layers[idx] = _ReferenceLowRankLayer(kept[..., :prompt_slots], rank, rope_model)
    ref = oracle.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(oracle, ref_cache), **gen)
    VISIBILITY.__init__()
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_low_rank_with_full_retention_and_full_rank_is_the_full_cache():
    model = tiny_model("llama")
    ids, steps = prompt_ids(2, 24), prompt_ids(2, 3, seed=2)
    ref = _logits(model, DynamicCache(config=model.config), ids, steps)
    ours = _logits(model, CompressedCache(model, selector="knorm", retention=1.0, lowrank=D), ids, steps)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------- what is stored


def test_bytes_count_the_factors_and_their_quantization():
    model = tiny_model("llama")  # 2 layers, 2 KV heads, head_dim 16, fp32
    B, H, T, r, new = 2, 2, 40, 4, 3
    ids, steps = prompt_ids(B, T), prompt_ids(B, new, seed=1)
    cache = LowRankCache(model, r)
    _logits(model, cache, ids, steps)
    per_tensor = B * H * (T * r + r * D) * 4 + B * H * new * D * 4  # fp32 factors + fp32 tail
    fp = cache.memory_footprint()
    assert fp.full_precision == 2 * 2 * per_tensor and fp.codes == 0
    assert fp.reference == 2 * 2 * B * H * (T + new) * D * 2

    cache = LowRankCache(model, {"key": 8, "value": None}, quant="int8", group_size=16)
    _logits(model, cache, ids, steps)
    fp = cache.memory_footprint()
    key_codes = B * H * (T * 8 + 8 * D + new * D)  # int8: one byte per element of left, right and tail
    value_codes = B * H * (T + new) * D
    assert fp.codes == 2 * (key_codes + value_codes)
    g_left = factor_group_size(8, 16, 8)
    key_groups = B * H * (T * 8 // g_left + 8 * D // 16 + new * D // 16)
    value_groups = B * H * (T + new) * D // 16
    assert fp.scales == fp.zeros == 2 * 2 * (key_groups + value_groups)
    assert fp.full_precision == 0


def test_quantized_factors_stay_close_to_the_unquantized_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 64, 32, generator=g) @ torch.randn(32, 32, generator=g)
    exact = factorize(x, 16).reconstruct(torch.float32)
    e8 = relative_error(exact, factorize(x, 16, bits=8).reconstruct(torch.float32))
    e4 = relative_error(exact, factorize(x, 16, bits=4).reconstruct(torch.float32))
    assert e8 < 0.01 < e4 < 0.2


def test_crop_beams_and_batch_edits():
    model = tiny_model("llama")
    ids = prompt_ids(2, 20)
    kw = dict(max_new_tokens=5, do_sample=False)
    for spec in ("svd:16", "svd:4+int8"):
        c1, c2 = make_cache(spec, model), make_cache(spec, model)
        beams = model.generate(ids, **cache_kwargs(model, c1), num_beams=3, num_return_sequences=2, **kw)
        assert beams.shape == (4, 25)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, c2))
            before = c2.layers[0].materialize()[0].clone()
            for token in prompt_ids(2, 3, seed=4).split(1, dim=1):  # decode steps: the tail
                model(token, **cache_kwargs(model, c2))
        grown = c2.layers[0].materialize()[0].clone()
        c2.crop(-1)  # inside the tail
        assert c2.get_seq_length() == 22
        torch.testing.assert_close(c2.layers[0].materialize()[0], grown[..., :22, :])
        c2.crop(-2)
        assert c2.get_seq_length() == 20
        torch.testing.assert_close(c2.layers[0].materialize()[0], before)
        c2.crop(-8)  # inside the factored prompt: rows of the left factor go (n < 0 on every release)
        assert c2.get_seq_length() == 12
        torch.testing.assert_close(c2.layers[0].materialize()[0], before[..., :12, :])
        c2.batch_select_indices(torch.tensor([1]))
        assert c2.layers[0].materialize()[0].shape[0] == 1


# ------------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "text, kind, selector, preset, lowrank",
    [
        ("svd:32", "lowrank", None, None, (32, 32)),
        ("svd:k32v64", "lowrank", None, None, (32, 64)),
        ("svd:k8", "lowrank", None, None, (8, None)),
        ("svd:64+int8", "lowrank", None, "int8", (64, 64)),
        ("q2c:0.5+svd:64", "select", "q2c", None, (64, 64)),
        ("q2c:0.75+svd:64+int4", "select", "q2c", "int4", (64, 64)),
        ("snapkv:0.5:global+svd:k16v8+mixed_l0", "select", "snapkv", "mixed_l0", (16, 8)),
        ("scout=embedded:q2c:0.5+svd:16", "scout", "q2c", None, (16, 16)),
        ("q2c:0.5+int8", "select", "q2c", "int8", None),
        ("svd:16:post+int4", "lowrank", None, "int4", (16, 16)),
        ("q2c:0.5+svd:v8:post", "select", "q2c", None, (None, 8)),
    ],
)
def test_parse_low_rank_specs(text, kind, selector, preset, lowrank):
    assert parse_spec(f" {text}\n") == parse_spec(text).__class__(**{**vars(parse_spec(text)), "text": f" {text}\n"})
    s = parse_spec(text)
    assert (s.kind, s.selector, s.preset, s.lowrank) == (kind, selector, preset, lowrank)
    assert s.lowrank_keys == ("post_rope" if ":post" in text else "pre_rope")


@pytest.mark.parametrize(
    "text, why",
    [
        ("svd:0", r"rank 0 is outside the allowed range 1\.\.head_dim"),
        ("svd:abc", "not <rank>, k<rank>v<rank>"),
        ("svd:", "not <rank>"),
        ("int4+svd:8", r"'\+svd:<ranks>' follows a selection"),
        ("svd:8+svd:4", r"'\+svd:<ranks>' follows a selection"),
        ("svd:8@prefill", "unknown prefill mode"),
        ("svd:8+kivi4", "kivi"),
        ("svd:8:mid", "unknown key space 'mid'"),
        ("svd:8:", "unknown key space ''"),
        ("svd: 8", "no whitespace"),
        ("q2c:0.5 +svd:8", "no whitespace"),
        ("svd:k8\tv4", "no whitespace"),
        ("svd:\u0663", "not <rank>"),  # an Arabic-Indic digit: ranks are ASCII decimals
        ("svd:k8v", "not <rank>"),
        ("svd:1" + "0" * 12, "not <rank>"),
    ],
)
def test_bad_low_rank_specs(text, why):
    with pytest.raises(ValueError, match=why) as err:
        parse_spec(text)
    assert "svd:<rank" in str(err.value)


def test_make_cache_and_rank_errors_name_the_allowed_range():
    model = tiny_model("llama")
    assert isinstance(make_cache("svd:8", model), LowRankCache)
    c = make_cache("q2c:0.5+svd:8+int4", model, question_len=4)
    assert isinstance(c, CompressedCache)
    assert all(isinstance(c.layers[i], LowRankCompressedLayer) for i in c.compressed_layers)
    with pytest.raises(ValueError, match=r"outside the allowed range 1\.\.16"):
        make_cache("svd:17", model)
    with pytest.raises(ValueError, match=r"1\.\.16"):
        LowRankCache(model, 0)
    with pytest.raises(TypeError, match="must be an int"):
        LowRankCache(model, 2.5)
    with pytest.raises(ValueError, match="layer 0: rank 4 cannot be quantized at 3 bits.*multiple of 8"):
        LowRankCache(model, 4, quant="int3", group_size=16)
    with pytest.raises(ValueError, match="multiple of 8"):
        make_cache("q2c:0.5+svd:4+int3", model, question_len=4)
    with pytest.raises(ValueError, match="decode_policy"):
        CompressedCache(model, selector="q2c", max_tokens=20, question_len=4, decode_policy="h2o", lowrank=8)
    with pytest.raises(ValueError, match="per token"):
        LowRankCache(model, 8, quant="kivi4", group_size=16)
    with pytest.raises(ValueError, match="needs the model's rotary embedding"):
        LowRankCache(model.config, 8)
    assert isinstance(LowRankCache(model.config, 8, keys="post_rope"), LowRankCache)
    with pytest.raises(ValueError, match="keys must be one of"):
        LowRankCache(model, 8, keys="rope")
    assert resolve_ranks({0: 4, "default": (8, None)}, 3, 16) == [(4, 4), (8, None), (8, None)]
    assert resolve_ranks([4, None], 2, 16) == [(4, 4), (None, None)]


# --------------------------------------------------------------------------------------- save, load, scout


@pytest.mark.parametrize(
    "spec", ["svd:6", "svd:k4v8:post+int4", "q2c:0.5+svd:8+int8", "q2c:0.5:head+svd:5", "q2c:0.5+svd:5:post"]
)
def test_save_load_continues_exactly(spec):
    model = tiny_model("llama")
    ids, nxt = prompt_ids(2, 26), prompt_ids(2, 4, seed=7)
    cache = make_cache(spec, model, question_len=QLEN, group_size=16)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    data = cache.to_bytes()
    loaded = type(cache).from_bytes(data, model)
    fp, lfp = cache.memory_footprint(), loaded.memory_footprint()
    assert fp == lfp
    assert len(data) - fp.total < 8192  # the file is the byte accounting plus a small header
    forked = cache.fork()
    with torch.no_grad():
        a = model(nxt, **cache_kwargs(model, cache)).logits
        b = model(nxt, **cache_kwargs(model, loaded)).logits
        c = model(nxt, **cache_kwargs(model, forked)).logits
    assert torch.equal(a, b) and torch.equal(a, c)


def test_low_rank_transmission_reads_the_question_against_the_factored_context():
    """svd:<r>@construction stores the context as factors before the question is read: the question's own pass then
    attends to reconstructed keys, so its logits differ from the plain svd cache's (which sees the prompt exactly)."""
    model = tiny_model("llama", layers=2)
    torch.manual_seed(3)
    ids = torch.randint(3, 90, (2, 48))
    plain = make_cache("svd:2", model)
    sent = make_cache("svd:2@construction", model, question_len=6, input_ids=ids)
    assert parse_spec("svd:2@construction").transmits
    assert sent.get_seq_length() == 42  # the context only: the question is read by generate
    with torch.no_grad():
        a = model.generate(ids, **cache_kwargs(model, plain), max_new_tokens=1, do_sample=False,
                           output_scores=True, return_dict_in_generate=True)
        b = model.generate(ids, **cache_kwargs(model, sent), max_new_tokens=1, do_sample=False,
                           output_scores=True, return_dict_in_generate=True)
    assert not torch.allclose(a.scores[0], b.scores[0], atol=1e-4)
    full = make_cache("svd:16@construction", model, question_len=6, input_ids=ids)  # rank = head_dim: lossless
    with torch.no_grad():
        c = model.generate(ids, **cache_kwargs(model, full), max_new_tokens=1, do_sample=False,
                           output_scores=True, return_dict_in_generate=True)
        d = model.generate(ids, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(c.scores[0], d.scores[0], atol=1e-4, rtol=0)


def test_saved_low_rank_layer_does_not_load_into_another_kind():
    """A layer's saved kind must be the kind its cache builds; the file cannot change how a layer is stored."""
    from test_integrity import build, split

    model = tiny_model("llama")
    cache = CompressedCache(model, selector="knorm", retention=1.0, lowrank=4)
    with torch.no_grad():
        model(prompt_ids(1, 12), **cache_kwargs(model, cache))
    header, meta, body = split(cache.to_bytes())
    assert [layer["kind"] for layer in meta["layers"]] == ["lowrank_compressed"] * len(cache.layers)
    meta["layers"][0]["kind"] = "lowrank"
    with pytest.raises(ValueError, match="does not fit"):
        CompressedCache.from_bytes(build(header, meta, body), model)
    header, meta, body = split(cache.to_bytes())
    meta["cache"]["args"]["lowrank"][0] = [4, 5]  # the cache then builds rank 5 values: the factors do not fit
    with pytest.raises(ValueError, match="ranks"):
        CompressedCache.from_bytes(build(header, meta, body), model)


def test_scout_selection_stored_low_rank():
    from kvcache_plugins import Scout

    tok = make_tokenizer()
    model = tiny_model("llama")
    scout = tiny_model("llama", layers=1, seed=3)
    ids = prompt_ids(1, 24)
    selection = Scout(scout, tok, "q2c", 0.5).select(ids, None, question_len=4)
    cache = ScoutMaskedCache(selection, model, tokenizer=tok, lowrank=4)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    out = model.generate(ids, **cache_kwargs(model, cache), **gen)
    assert out.shape[1] == 27
    layer = cache.layers[0]
    assert isinstance(layer, LowRankCompressedLayer) and layer.stored_keys.factors.rank == 4
    kept_prompt = int((cache.kept_positions(0) < ids.shape[1]).sum())
    assert layer.stored_keys.factored_tokens == kept_prompt == 4 + 10  # question + ceil(0.5 * 20)
    again = ScoutMaskedCache.from_bytes(cache.to_bytes(), model, tokenizer=tok)
    assert again.layer_ranks == cache.layer_ranks and again.memory_footprint() == cache.memory_footprint()


def test_pre_rope_keys_have_a_lower_rank_on_the_embedded_model():
    """The measured reason for the pre-RoPE default (bench/lowrank_rope.py has the full table)."""
    from kvcache_plugins.reference import load_reference_model, reference_available

    if not reference_available():
        pytest.skip("the embedded reference model is not installed")
    model, tok = load_reference_model()
    from kvcache_plugins.bench.tasks import RetrievalTask

    ids = RetrievalTask().batches(tok, 512, 2, 2, 0, "cpu")[0][0]
    errors = {}
    for keys in ("pre_rope", "post_rope"):
        cache, full = LowRankCache(model, 16, keys=keys), DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
            model(ids, **cache_kwargs(model, full))
        errors[keys] = sum(relative_error(f.keys, c.materialize()[0]) for f, c in zip(full.layers, cache.layers))
    assert errors["pre_rope"] < errors["post_rope"] / 3, errors


# ------------------------------------------------------------------------------------------------- zstd


def test_zstd_round_trip_is_exact_and_smaller():
    pytest.importorskip("zstandard")
    model = tiny_model("llama")
    cache = make_cache("svd:8+int4", model)
    with torch.no_grad():
        model(prompt_ids(2, 64), **cache_kwargs(model, cache))
    plain, coded = cache.to_bytes(), cache.to_bytes(compress="zstd")
    assert coded[:4] == b"\x28\xb5\x2f\xfd" and len(coded) < len(plain)
    loaded = LowRankCache.from_bytes(coded, model)
    assert loaded.to_bytes() == plain


def test_zstd_errors_are_clear():
    from kvcache_plugins.persist import coding

    with pytest.raises(ValueError, match="unknown compress='gzip'"):
        coding.compress(b"x", "gzip")
    try:
        coding._zstd()
    except ImportError as err:  # without zstd the message names the extra
        assert "kvcache-plugins[zstd]" in str(err)
        return
    assert coding.compress(bytes(10_000_000), "zstd") == bytes(10_000_000)  # would shrink > MAX_RATIO: left plain
    zstandard = pytest.importorskip("zstandard")
    bomb = zstandard.ZstdCompressor().compress(bytes(10_000_000))  # declares 10 MB from a few hundred bytes
    with pytest.raises(ValueError, match="not a kvcache_plugins cache.*at most 64 times"):
        coding.decompress(bomb)
    frame = coding.compress(bytes(range(256)) * 40, "zstd")
    assert coding.decompress(frame) == bytes(range(256)) * 40
    for bad in (frame + b"junk", frame[:-1], frame[:6], coding.ZSTD_MAGIC + bytes(8)):
        with pytest.raises(ValueError, match="not a kvcache_plugins cache"):
            coding.decompress(bad)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100)
    with pytest.raises(ValueError, match="declares no content size"):
        coding.decompress(unsized)


# ------------------------------------------------------------------------------------------- bench helpers


def test_cube_cells_and_intervals():
    from kvcache_plugins.bench.cube import axes, cube_specs, wilson

    cells = cube_specs()
    assert len(cells) == len(set(cells)) == 2 * 5 * 3 and cells[0] == "full"
    for spec in ("int4", "svd:4", "svd:32+int8", "q2c:0.5", "q2c:0.5+svd:16+int4", "q2c:0.5+int8"):
        assert spec in cells
    assert all(parse_spec(c) for c in cells)
    assert axes("q2c:0.5+svd:16+int4") == ("q2c:0.5", "16", "int4") and axes("int8") == ("-", "-", "int8")
    lo, hi = wilson(0.5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert wilson(1.0, 8)[1] == 1.0 and wilson(0.0, 8)[0] == 0.0


def test_rope_measurement_is_exact_at_full_rank():
    from kvcache_plugins.reference import reference_available

    if not reference_available():
        pytest.skip("the embedded reference model is not installed")
    from kvcache_plugins.bench.lowrank_rope import measure

    (row,) = measure([128], [32], limit=2)
    assert row["post_error"] < 1e-5 and row["pre_error"] < 1e-5  # undoing RoPE and redoing it is exact
    assert row["pre_em"] == row["post_em"] == row["full_em"]


def test_sparse_prefill_of_a_scout_selection_is_factored_like_post_hoc():
    from kvcache_plugins import Scout

    tok = make_tokenizer()
    model = tiny_model("llama")
    ids = prompt_ids(1, 24)
    selection = Scout(tiny_model("llama", layers=1, seed=3), tok, "q2c", 0.5).select(ids, None, question_len=4)
    sparse = ScoutMaskedCache(selection, model, tokenizer=tok, lowrank=D)  # full rank: sparse prefill's own result
    plain = ScoutMaskedCache(selection, model, tokenizer=tok)
    sparse.sparse_prefill(model, ids)
    plain.sparse_prefill(model, ids)
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, output_logits=True,
               return_dict_in_generate=True)
    a = model.generate(ids, **cache_kwargs(model, sparse), **gen)
    b = model.generate(ids, **cache_kwargs(model, plain), **gen)
    assert isinstance(sparse.layers[0], LowRankCompressedLayer) and sparse.layers[0].stored_keys.factors is not None
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = tiny_model("qwen2", dtype=dtype)
    ids = prompt_ids(2, 40)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, full))
    for spec in ("svd:16", "svd:8+int8", "q2c:0.5+svd:8+int4"):
        cache = make_cache(spec, model, question_len=QLEN)
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=4, do_sample=False)
        assert out.shape == (2, 44)
        keys, values = cache.layers[0].materialize()
        assert keys.dtype == values.dtype == dtype
    cache = make_cache("svd:16", model)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    keys, _ = cache.layers[0].materialize()
    assert relative_error(full.layers[0].keys, keys) < 0.02  # full rank: only half-precision rounding of the factors


def test_left_padded_batch_at_full_rank_equals_the_full_cache():
    model = tiny_model("llama")
    ids = prompt_ids(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    gen = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    a = model.generate(ids, **cache_kwargs(model, LowRankCache(model, D)), **gen)
    b = model.generate(ids, **cache_kwargs(model, DynamicCache(config=model.config)), **gen)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-4)


@pytest.mark.parametrize("keys", ["pre_rope", "post_rope"])
def test_prefill_chunks_are_folded_into_the_factors(keys):
    model = tiny_model("llama")
    ids, steps = prompt_ids(2, 30), prompt_ids(2, 3, seed=5)
    ref = _logits(model, DynamicCache(config=model.config), ids, steps)
    for rank in (D, 6):
        cache = LowRankCache(model, {"default": (rank, rank), 1: (rank, None)}, keys=keys)
        with torch.no_grad():
            for chunk in ids.split(8, dim=1):  # what generate(prefill_chunk_size=8) does
                model(chunk, **cache_kwargs(model, cache))
        for layer in cache.layers:
            assert layer.key_store.factored_tokens == 30 and layer.key_store.tail is None
        assert cache.layers[1].value_store.factors is None and cache.layers[1].value_store.num_tokens == 30
        if rank == D:  # full rank: chunking changes nothing
            with torch.no_grad():
                out = [model(steps[:, i : i + 1], **cache_kwargs(model, cache)).logits for i in range(3)]
            for a, b in zip(out, ref[1:]):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
        else:  # folding re-approximates the stored rows: the result is a rank-r matrix close to the one-shot factors
            one_shot = LowRankCache(model, rank, keys=keys)
            with torch.no_grad():
                model(ids, **cache_kwargs(model, one_shot))
            k_chunked, k_once = cache.layers[0].materialize()[0], one_shot.layers[0].materialize()[0]
            full = DynamicCache(config=model.config)
            with torch.no_grad():
                model(ids, **cache_kwargs(model, full))
            err_chunked = relative_error(full.layers[0].keys, k_chunked)
            assert err_chunked < 1.5 * relative_error(full.layers[0].keys, k_once)


# ------------------------------------------------------------------------------------ validation at load


def _lowrank_file(kind):
    model = tiny_model("llama", layers=2)
    if kind == "standalone":
        cache = LowRankCache(model, [(4, 6), (None, 2)], quant="int4", group_size=16)
    else:
        cache = CompressedCache(model, selector="knorm", retention=0.5, quant="int8", group_size=16, lowrank=(4, 6))
    with torch.no_grad():
        token = model(prompt_ids(2, 20), **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        model(token, **cache_kwargs(model, cache))
    return model, cache


def _set(obj, path, value):
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


D = tiny_model("llama", layers=1).config.head_dim


@pytest.mark.parametrize(
    "kind, where, edit, why",
    [
        ("standalone", "meta", (("cache", "rank", 0, 0), 0), r"rank must be a list .* in 1\.\.%d" % D),
        ("standalone", "meta", (("cache", "rank", 0, 0), D + 1), r"in 1\.\.%d" % D),
        ("standalone", "meta", (("cache", "rank", 0, 0), True), "rank must be a list"),
        ("standalone", "meta", (("cache", "rank", 0, 0), 4.0), "rank must be a list"),
        ("standalone", "meta", (("cache", "rank", 1), [None]), "rank must be a list"),
        ("standalone", "meta", (("cache", "rank", 0, 0), 2), "rank"),  # a valid rank the factors do not have
        ("standalone", "meta", (("cache", "rank", 0, 0), 3), "rank 3 cannot be quantized at 4 bits"),
        ("standalone", "meta", (("cache", "keys"), "post_rope"), "keys must be one of \\['post_rope'\\]"),
        ("standalone", "meta", (("cache", "keys"), "rope"), "keys must be one of"),
        ("standalone", "meta", (("layers", 0, "ranks"), [4, 6.0]), "ranks"),
        ("standalone", "meta", (("layers", 0, "dtype"), "torch.float16"), "not this model's dtype"),
        ("standalone", "meta", (("layers", 0, "scale_dtype"), "torch.bfloat16"), "must be torch.bfloat16"),
        ("standalone", "meta", (("cache", "layer_specs", 0, "key", "bits"), 8), "key.left.codes.*shape"),
        ("standalone", "meta", (("cache", "layer_specs", 0, "key", "group_size"), 8), "shape"),
        # header edits keep each tensor's byte count (else safetensors itself refuses the file)
        ("standalone", "header", ("layers.0.key.right.codes", "shape", [2, 2, 8, 4]), "key.right.codes.*shape"),
        ("standalone", "header", ("layers.1.value.left.codes", "dtype", "I8"), "has dtype 'I8'"),
        ("standalone", "header", ("layers.0.key.left.scale", "dtype", "BF16"), "key.left.scale.*must be torch.float16"),
        ("standalone", "header", ("layers.0.value.tail.scale", "shape", [1, 2, 2, 1]), "value.tail.scale.*shape"),
        ("compressed", "meta", (("layers", 0, "tail"), 0), r"key.left.codes' must have shape \[2, 2, 11, 4\]"),
        ("compressed", "meta", (("layers", 0, "tail"), 11), "the last 11 slots must hold the newest"),
        ("compressed", "meta", (("layers", 0, "logical"), 5), "positions must lie in"),
        ("compressed", "meta", (("cache", "args", "lowrank"), [[4, 6]]), "lowrank must be a list of 2"),
        ("compressed", "meta", (("cache", "args", "lowrank_keys"), "both"), "lowrank_keys must be one of"),
        ("compressed", "header", ("layers.0.key.left.scale", "dtype", "BF16"), "key.left.scale.*must be"),
        ("compressed", "header", ("layers.1.value.right.codes", "shape", [2, 2, 16, 6]), "value.right.codes.*shape"),
        ("compressed", "header", ("layers.1.positions", "shape", [1, 2, 11]), r"key.left.codes' must have shape \[1,"),
    ],
)
def test_damaged_low_rank_files_raise_value_error_naming_the_field(kind, where, edit, why):
    from test_integrity import build, split

    model, cache = _lowrank_file(kind)
    header, meta, body = split(cache.to_bytes())
    if where == "meta":
        _set(meta, *edit)
    else:
        name, field, value = edit
        if name not in header:  # the test's premise: the named tensor exists
            pytest.fail(f"{name} not in {sorted(header)}")
        header[name][field] = value
    with pytest.raises(ValueError, match=why or "") as err:
        type(cache).from_bytes(build(header, meta, body), model)
    assert "saved cache is invalid" in str(err.value) or "cache file is invalid" in str(err.value)


def test_low_rank_state_names_every_part():
    model, cache = _lowrank_file("standalone")
    tensors, meta = cache.layers[0].to_state()
    assert meta == {"dtype": "torch.float32", "scale_dtype": str(cache.layers[0].scale_dtype), "ranks": [4, 6],
                    "keys": "pre_rope"}
    assert sorted(tensors) == sorted(
        f"{kv}.{part}.{q}"
        for kv in ("key", "value")
        for part in ("left", "right", "tail")
        for q in ("codes", "scale", "zero")
    )
    model, cache = _lowrank_file("compressed")
    tensors, meta = cache.layers[0].to_state()
    assert meta["tail"] == 1 and meta["ranks"] == [4, 6] and "positions" in tensors
