"""Issue 14: nothing forged or damaged gets in.

Saved caches and selections are untrusted input: every case of the issue (edited files, damaged metadata, forged
selection sizes, silent row broadcasting, fp16/bf16 extremes, loose arguments, fork under autograd) has a test
here; the fuzz tests are in ``test_fuzz_inputs.py``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import tracemalloc
import zlib

import pytest
import torch
from conftest import make_tokenizer, prompt_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_plugins import CompressedCache, MixedPrecisionCache, Scout, ScoutMaskedCache, load_cache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.persist.container import cache_from_bytes
from kvcache_plugins.quant.groupwise import quantize
from kvcache_plugins.scout.selection import MAGIC, Selection, _varint
from kvcache_plugins.specs import make_cache, parse_spec

MODEL = tiny_model("qwen2", layers=2)
QLEN = 4


def fill(cache, ids, model=MODEL, steps=3):
    with torch.no_grad():
        token = model(ids, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        for _ in range(steps):
            token = model(token, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
    return cache


# ---------------------------------------------------------------------------------------------- file surgery


def split(data: bytes) -> tuple[dict, dict, bytes]:
    """(safetensors header, kvcache_plugins metadata, tensor bytes) of a saved cache."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return header, json.loads(header["__metadata__"]["kvcache_plugins"]), data[8 + n :]


def build(header: dict, meta: dict | None, body: bytes, resign: bool = True) -> bytes:
    """Reassemble a file; ``resign`` recomputes the digest as a forger would (it is not a signature)."""
    header = dict(header)
    if meta is not None:
        header["__metadata__"] = dict(header["__metadata__"], kvcache_plugins=json.dumps(meta))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytearray(struct.pack("<Q", len(raw)) + raw + body)
    if resign:
        at = data.index(b'"sha256":"') + len(b'"sha256":"')
        digest = hashlib.sha256()
        digest.update(data[:at])
        digest.update(data[at + 64 :])
        data[at : at + 64] = digest.hexdigest().encode()
    return bytes(data)


def test_rebuilding_an_unedited_file_gives_the_same_bytes():
    data = fill(MixedPrecisionCache(MODEL, "int4", group_size=16), prompt_ids(1, 20)).to_bytes()
    header, meta, body = split(data)
    assert build(header, meta, body) == data


# ---------------------------------------------------------------------------------------------- 1. edited files


def _quantized_cache():
    return fill(MixedPrecisionCache(MODEL, "int4", group_size=16), prompt_ids(1, 20))


def test_digest_covers_header_metadata_and_bytes():
    """Each edit of the issue, unsigned: one changed byte anywhere (name, dtype, group_size, lengths) is refused."""
    data = _quantized_cache().to_bytes()
    header, meta, body = split(data)
    edits = {
        "tensor name": data.replace(b"layers.0.s0.body.scale", b"layers.1.s0.body.scale", 1),
        "dtype in header": data.replace(b'"dtype":"F16"', b'"dtype":"BF16"', 1),
        "group_size in metadata": data.replace(b'\\"group_size\\": 16', b'\\"group_size\\": 8', 1),
        "appended junk": data + b"\0" * 8,
        "truncated": data[:-1],
        "last tensor byte": data[:-1] + bytes([data[-1] ^ 1]),
    }
    for what, edited in edits.items():
        assert edited != data, what
        with pytest.raises(ValueError, match="checksum"):
            cache_from_bytes(edited, MODEL)


def _forged(data: bytes, edit_header=None, edit_meta=None) -> bytes:
    header, meta, body = split(data)
    if edit_header:
        edit_header(header)
    if edit_meta:
        edit_meta(meta)
    return build(header, meta, body)


def test_forged_files_that_passed_before_are_refused():
    """The issue's loading edits, with the digest recomputed (what a forger does): validation refuses each.

    (A forger can also write a different but consistent cache, e.g. swap two same-shaped tensors: a digest is no
    signature. What validation guarantees is that whatever loads is a well-formed cache for this model.)"""
    mixed = _quantized_cache().to_bytes()
    compressed = fill(CompressedCache(MODEL, selector="q2c", retention=0.5, question_len=QLEN), prompt_ids(2, 24)).to_bytes()

    def rename(h):
        h["layers.9.s0.body.scale"] = h.pop("layers.0.s0.body.scale")

    def f32_to_f16(h):  # a dtype edit
        h["layers.0.s0.body.scale"]["dtype"] = "BF16" if h["layers.0.s0.body.scale"]["dtype"] == "F16" else "F16"

    def group(meta, g):
        for spec in meta["cache"]["layer_specs"]:
            spec["key"]["group_size"] = spec["value"]["group_size"] = g

    cases = {
        "renamed tensor": _forged(mixed, edit_header=rename),
        "dtype edit": _forged(mixed, edit_header=f32_to_f16),
        "group_size 2": _forged(mixed, edit_meta=lambda m: group(m, 2)),
        "group_size 4": _forged(mixed, edit_meta=lambda m: group(m, 4)),
        "group_size 8": _forged(mixed, edit_meta=lambda m: group(m, 8)),
        "logical length": _forged(compressed, edit_meta=lambda m: m["layers"][0].update(logical=99)),
        "question_len": _forged(compressed, edit_meta=lambda m: m["cache"]["args"].update(question_len=QLEN + 1)),
    }
    for what, data in cases.items():
        with pytest.raises(ValueError, match="invalid") as err:
            cache_from_bytes(data, MODEL)
        assert "saved cache is invalid" in str(err.value) or "cache file is invalid" in str(err.value), what


# ---------------------------------------------------------------------------------------------- 2. damaged metadata


def _key_spec(meta):
    return meta["cache"]["layer_specs"][1]["key"]


def test_damaged_metadata_raises_value_error_naming_the_field():
    data = _quantized_cache().to_bytes()
    header, meta, body = split(data)

    def forged(change):
        m = json.loads(json.dumps(meta))
        change(m)
        return build(header, m, body)

    cases = {
        "metadata is a list": (build(header, [1, 2], body), "expected an object"),
        "null fingerprint": (forged(lambda m: m.update(fingerprint=None)), "another model"),
        "missing kind": (forged(lambda m: m["layers"][0].pop("kind")), "missing field 'kind'"),
        "missing cache": (forged(lambda m: m.pop("cache")), r"missing \['cache'\]"),
        "unknown field": (forged(lambda m: m["layers"][0].update(colour="red")), r"unknown \['colour'\]"),
        "bits 4 -> 3": (forged(lambda m: _key_spec(m).update(bits=3)), "must have shape"),
        "bits 4 -> 5": (forged(lambda m: _key_spec(m).update(bits=5)), "bits must be one of"),
        "bits is a string": (forged(lambda m: _key_spec(m).update(bits="4")), "bits must be an int"),
        "axis": (forged(lambda m: _key_spec(m).update(axis="channel")), "residual window|group"),
        "unknown axis": (forged(lambda m: _key_spec(m).update(axis="head")), "axis must be one of"),
        "unknown class": (forged(lambda m: m.update({"class": "DynamicCache"})), "unknown saved cache class"),
        "unknown layer kind": (forged(lambda m: m["layers"][0].update(kind="compressed")), "does not fit"),
        "dtype not a model dtype": (forged(lambda m: m["layers"][0].update(dtype="torch.int8")), "dtype must be one of"),
        "too few layers": (forged(lambda m: m["layers"].pop()), "list of 2 entries"),
    }
    for what, (edited, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            cache_from_bytes(edited, MODEL)

    def permute(h):  # same bytes, shape [2, 2, 23, 8] -> [2, 2, 8, 23]
        name = "layers.1.s0.body.codes"
        shape = h[name]["shape"]
        h[name]["shape"] = [*shape[:2], shape[3], shape[2]]

    with pytest.raises(ValueError, match="must have shape"):
        cache_from_bytes(_forged(data, edit_header=permute), MODEL)


def test_old_format_version_is_refused_with_advice():
    from safetensors.torch import save

    meta = json.dumps({"format": "kvcache_plugins.cache", "version": 1})
    old = save({"x": torch.zeros(2)}, metadata={"kvcache_plugins": meta})
    with pytest.raises(ValueError, match="format version 1.*Save the cache again"):
        cache_from_bytes(old, MODEL)


def test_load_cache_needs_the_model(tmp_path):
    path = tmp_path / "c.safetensors"
    _quantized_cache().save(path)
    with pytest.raises(TypeError, match="needs the model"):
        load_cache(path, MODEL.config)
    assert load_cache(path, MODEL).get_seq_length() == 23


# ---------------------------------------------------------------------------------------------- 3. forged selections


def _message(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _header(rows: int, layers: int, sinks: int = 0, name: bytes = b"q2c") -> bytes:
    counts = _varint(rows) + _varint(layers) + _varint(sinks)
    return MAGIC + bytes([1, 1 if layers else 0]) + counts + b"F" * 8 + _varint(len(name)) + name


def _cost(data: bytes) -> tuple[float, int, str]:
    """(seconds, peak bytes allocated by Python, outcome) of parsing ``data``."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        Selection.from_bytes(data)
        outcome = "parsed"
    except ValueError as err:
        outcome = str(err)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return elapsed, peak, outcome


def test_forged_selection_sizes_are_refused_before_allocation():
    """The issue's 28-byte message (10^7 layers) and its relatives: refused in microseconds, kilobytes of memory."""
    row = _varint(40) + _varint(4) + _varint(1) + bytes([1]) + _varint(3)
    huge = _varint(2**31 - 2) + _varint(0)  # a prompt of 2**31 - 2 tokens, no question
    forged = {
        "0 rows x 10^7 layers (the issue's 12 s, 690 MB)": _message(_header(0, 10**7)),
        "10^7 layers": _message(_header(1, 10**7) + row),
        "10^7 rows": _message(_header(10**7, 0) + row),
        "prompt_len 2**62": _message(_header(1, 0) + _varint(2**62) + _varint(4) + _varint(1) + bytes([1]) + _varint(3)),
        "2**30 kept delta positions": _message(_header(1, 0) + huge + _varint(2**30) + bytes([1]) + b"\0"),
        "bitmap of 2**31 positions": _message(_header(1, 0) + huge + _varint(1) + bytes([0]) + b"\1"),
        "10-byte varint": _message(_header(1, 0) + b"\xff" * 9 + b"\x01"),
        "non-ASCII name": _message(_header(1, 0, name="é".encode()) + row),
    }
    assert len(forged["0 rows x 10^7 layers (the issue's 12 s, 690 MB)"]) <= 28
    for what, data in forged.items():
        elapsed, peak, outcome = _cost(data)
        assert outcome != "parsed", what
        # memory, not time: a loaded machine makes any wall-clock bound flaky (issue 25)
        assert peak < 64_000, (what, elapsed, peak)


def test_selection_constructor_is_strict():
    ok = dict(positions=[[2]], prompt_len=[8], question_len=[2], sinks=0, fingerprint=b"F" * 8, selector="q2c")
    Selection(**ok)
    with pytest.raises(ValueError, match="ASCII"):
        Selection(**{**ok, "selector": "qé"})
    with pytest.raises(ValueError, match=r"prompt_len\[0\] must be an int in \[0, 2147483647\]"):
        Selection(**{**ok, "prompt_len": [2**62]})
    with pytest.raises(TypeError, match="sinks must be an int"):
        Selection(**{**ok, "sinks": True})


# ---------------------------------------------------------------------------------------------- 4. row counts


def test_one_row_selection_on_a_two_row_batch_is_refused():
    tok = make_tokenizer()
    one = prompt_ids(1, 24)
    selection = Scout(tiny_model("qwen2", layers=1, seed=7), tok, "q2c", 0.5).select(one, question_len=QLEN)
    two = torch.cat([one, prompt_ids(1, 24, seed=3)])
    cache = ScoutMaskedCache(selection, MODEL, tokenizer=tok)
    with pytest.raises(ValueError, match="the selection has 1 row but the batch has 2"):
        fill(cache, two, steps=0)
    # the same prompt twice (what generate's num_return_sequences makes) is one prompt: allowed
    fill(ScoutMaskedCache(selection, MODEL, tokenizer=tok), one.repeat(2, 1), steps=0)
    with pytest.raises(TypeError, match="question_len must be an int"):
        ScoutMaskedCache(selection, MODEL, tokenizer=tok, question_len=4.0)


def test_per_row_question_len_must_match_the_batch():
    with pytest.raises(ValueError, match="question_len has 1 row but the batch has 2"):
        fill(CompressedCache(MODEL, selector="q2c", retention=0.5, question_len=[3]), prompt_ids(2, 20), steps=0)
    cache = fill(CompressedCache(MODEL, selector="q2c", retention=0.5, question_len=3), prompt_ids(2, 20), steps=0)
    assert cache.layout.question_len.tolist() == [3, 3]  # one int applies to every row
    cache = fill(CompressedCache(MODEL, selector="q2c", retention=0.5, question_len=[3, 5]), prompt_ids(2, 20), steps=0)
    assert cache.layout.question_len.tolist() == [3, 5]


# ---------------------------------------------------------------------------------------------- 5. numerics


@pytest.mark.parametrize("bits,lo", [(8, -1000.0), (4, 0.0), (2, -65504.0), (3, 0.0)])
def test_fp16_groups_up_to_the_maximum_dequantize_finite(bits, lo):
    x = torch.linspace(lo, 65504, 16).half().view(1, 1, 1, 16)
    q = quantize(x, bits, 16)
    out = q.dequantize(torch.float16)
    assert bool(torch.isfinite(out).all())
    assert float((out.float() - x.float()).abs().max()) <= float(q.scale.float().max()) / 2 + 32  # + fp16 rounding


def test_bf16_ranges_beyond_fp32_raise_a_clear_error():
    x = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16)
    x[..., 0], x[..., 1] = -3e38, 3e38
    with pytest.raises(ValueError, match="span more than the float32 range"):
        quantize(x, 4, 16)
    x[..., 0] = 1e38  # one sign: the range fits, so it works
    q = quantize(x, 4, 16)
    assert bool(torch.isfinite(q.scale).all()) and bool(torch.isfinite(q.dequantize(torch.bfloat16)).all())


def _finite(dtype: torch.dtype):
    info = torch.finfo(dtype)
    return st.floats(min_value=float(info.min), max_value=float(info.max), allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_quantization_over_the_full_finite_range(dtype, bits, data):
    """Finite input in the model dtype: finite stored scales/zeros, finite output within scale / 2 (plus rounding of
    the output dtype), or the clear error for a group spanning more than the float32 range."""
    values = data.draw(st.lists(_finite(dtype), min_size=16, max_size=16))
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    x = x.nan_to_num(posinf=torch.finfo(dtype).max, neginf=torch.finfo(dtype).min).view(1, 1, 1, 16)
    span = float(x.double().max() - x.double().min())
    try:  # fp32 input: fp32 scales (fp16 ones refuse values beyond 65504 with their own clear error)
        q = quantize(x, bits, 8, meta_dtype=torch.float32 if dtype == torch.float32 else None)
    except ValueError as err:
        assert "span more than the float32 range" in str(err)
        assert span > torch.finfo(torch.float32).max / 2  # only ever for ranges this wide
        return
    assert bool(torch.isfinite(q.scale).all() & torch.isfinite(q.zero).all())
    for out_dtype in (dtype, torch.float32):
        out = q.dequantize(out_dtype)
        assert bool(torch.isfinite(out).all())
    err = (q.dequantize(torch.float32).double() - x.double()).abs().view(2, 8)
    bound = q.scale.double().view(2, 1) / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-30).all())


# ---------------------------------------------------------------------------------------------- ragged layers


def _ragged_cache(quant=None):
    cache = CompressedCache(
        MODEL, selector="snapkv", retention=0.4, question_len=[QLEN, 2], granularity="head", budget="adakv",
        quant=quant, group_size=8, window=4,
    )
    fill(cache, prompt_ids(2, 24))
    assert all(cache.layers[i].ragged for i in cache.compressed_layers)
    return cache


def _edited_layer(cache, edit) -> bytes:
    """The bytes of a fork of ``cache`` whose layer 0 was edited in memory: a well-formed file (valid digest,
    every tensor present) carrying inconsistent content, as a forger could write it."""
    fork = cache.fork()
    edit(fork.layers[0])
    return fork.to_bytes()


def _swap_in_head(layer):
    p = layer.flat_positions.clone()
    p[0], p[1] = p[1].item(), p[0].item()  # row 0, head 0 holds at least two positions
    layer.flat_positions = p


def test_forged_ragged_layers_are_refused():
    """Every field of a ragged (``budget="adakv"``) layer is checked at load: counts, positions, shapes, dtypes,
    the generated part, the quantization spec, and the budget the cache was saved with."""
    cache = _ragged_cache(quant="int4")
    loaded = cache_from_bytes(cache.to_bytes(), MODEL)
    assert torch.equal(loaded.layers[0].counts, cache.layers[0].counts)

    def set_(name, fn):
        return lambda layer: setattr(layer, name, fn(getattr(layer, name)))

    def shift_counts(c):
        c = c.clone()
        c[0, 0] -= 1
        c[0, 1] += 1
        return c

    def negative(c):
        c = c.clone()
        c[0, 0], c[0, 1] = -1, c[0, 1] + c[0, 0] + 1
        return c

    edits = {
        "counts one more": (set_("counts", lambda c: c + torch.eye(*c.shape, dtype=c.dtype)), "sum to the"),
        "negative count": (set_("counts", negative), "non-negative"),
        "counts as int32": (set_("counts", lambda c: c.int()), "must be torch.int64"),
        "counts [B, H + 1]": (set_("counts", lambda c: torch.cat([c, c[:, :1] * 0], 1)), "must have shape"),
        "counts for a third row": (
            set_("counts", lambda c: torch.cat([c, c[:1] * 0])), r"must have shape \[3, 2, \*, 8\]"
        ),
        "counts shifted between heads": (set_("counts", shift_counts), "increase strictly|lie in"),
        "positions unsorted in a head": (_swap_in_head, "increase strictly within each head"),
        "position at logical": (set_("flat_positions", lambda p: torch.cat([p[:-1], p.new_tensor([30])])), "lie in"),
        "position -1": (set_("flat_positions", lambda p: torch.cat([p.new_tensor([-1]), p[1:]])), "lie in"),
        "positions as int64": (set_("flat_positions", lambda p: p.long()), "must be torch.int32"),
        "flat keys one short": (set_("flat_keys", lambda t: t.keep_tokens(t.num_tokens - 1)), "must have shape"),
        "generated part dropped": (set_("stored_values", lambda t: None), "missing|both keys and values"),
        "tail edited": (lambda layer: setattr(layer, "tail", 1), "tail must be an int in"),
        "logical edited": (lambda layer: setattr(layer, "logical", layer.logical + 2), "prompt part covers|lie in"),
    }
    for what, (edit, message) in edits.items():
        with pytest.raises(ValueError, match=message):
            cache_from_bytes(_edited_layer(cache, edit), MODEL)
            print(f"{what}: loaded")  # shown only when the edit was not refused

    data = cache.to_bytes()
    meta_edits = {
        "ragged flag false": (lambda m: m["layers"][0].update(ragged=False), "missing|unknown"),
        "ragged flag missing": (lambda m: m["layers"][0].pop("ragged"), "missing field 'ragged'"),
        "dtype": (lambda m: m["layers"][0].update(dtype="torch.float16"), "not this model's dtype"),
        "scale dtype": (lambda m: m["layers"][0].update(scale_dtype="torch.int8"), "scale_dtype must be one of"),
        "bits 4 -> 8": (lambda m: m["cache"]["layer_specs"][0]["key"].update(bits=8), "must have shape"),
        "bits 4 -> 5": (lambda m: m["cache"]["layer_specs"][0]["key"].update(bits=5), "bits must be one of"),
        "unquantized spec": (lambda m: m["cache"]["layer_specs"][0]["value"].update(bits=16), "missing"),
        "budget uniform": (lambda m: m["cache"]["args"]["budget"].update(name="uniform", options={}), "does not fit"),
        "budget unknown": (lambda m: m["cache"]["args"]["budget"].update(name="ada"), "name must be one of"),
        "budget floor 2": (lambda m: m["cache"]["args"]["budget"]["options"].update(floor=2), r"floor must be in"),
        "budget floor str": (lambda m: m["cache"]["args"]["budget"]["options"].update(floor="0.2"), "must be a number"),
        "budget option": (lambda m: m["cache"]["args"]["budget"]["options"].update(beta=4), r"unknown \['beta'\]"),
        "budget missing": (lambda m: m["cache"]["args"].pop("budget"), r"missing \['budget'\]"),
        "granularity layer": (lambda m: m["cache"]["args"].update(granularity="layer"), "works with granularity"),
    }
    for what, (edit, message) in meta_edits.items():
        with pytest.raises(ValueError, match=message):
            cache_from_bytes(_forged(data, edit_meta=edit), MODEL)
            print(f"{what}: loaded")

    def zero_layer(h):  # a tensor renamed to a layer that does not hold it
        h["layers.0.countsx"] = h.pop("layers.0.counts")

    with pytest.raises(ValueError, match="counts' is missing"):
        cache_from_bytes(_forged(data, edit_header=zero_layer), MODEL)


def test_ragged_layer_whose_selection_kept_everything_saves_as_a_compressed_layer():
    cache = CompressedCache(
        MODEL, selector="knorm", retention=1.0, question_len=QLEN, granularity="head", budget="adakv"
    )
    fill(cache, prompt_ids(1, 12))
    assert not any(cache.layers[i].ragged for i in cache.compressed_layers)
    header, meta, body = split(cache.to_bytes())
    assert meta["layers"][0]["ragged"] is False and meta["layers"][0]["kind"] == "ragged"
    loaded = cache_from_bytes(build(header, meta, body), MODEL)
    assert torch.equal(loaded.kept_positions(), cache.kept_positions())
    meta["layers"][0]["ragged"] = True
    with pytest.raises(ValueError, match="unknown|missing"):
        cache_from_bytes(build(header, meta, body), MODEL)


# ---------------------------------------------------------------------------------------------- 6. strict arguments


def test_compressed_cache_arguments_are_strict():
    kw = dict(selector="random", retention=0.5)
    cases = [
        (dict(question_len=2.5), TypeError, "question_len must be an int"),
        (dict(question_len=True), TypeError, "question_len must be an int"),
        (dict(question_len=[3, 2.0]), TypeError, r"question_len\[1\] must be an int"),
        (dict(question_len=-1), ValueError, "question_len must be an int >= 0"),
        (dict(recent_tokens=-3, max_tokens=8), ValueError, "recent_tokens must be an int >= 0"),
        (dict(evict_every="a"), TypeError, "evict_every must be an int >= 1"),
        (dict(evict_every=0), ValueError, "evict_every must be an int >= 1"),
        (dict(max_tokens=8.0), TypeError, "max_tokens must be an int >= 1"),
        (dict(sink_tokens=False), TypeError, "sink_tokens must be an int >= 0"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            CompressedCache(MODEL, **{**kw, **extra})
    with pytest.raises(TypeError, match="retention must be in"):
        CompressedCache(MODEL, selector="random", retention="0.5")
    with pytest.raises(TypeError, match="snapkv option window must be an int >= 1"):
        CompressedCache(MODEL, selector="snapkv", retention=0.5, window=8.5)


def test_spec_strings_are_strict():
    with pytest.raises(TypeError, match="a cache spec is a string, got NoneType"):
        parse_spec(None)
    with pytest.raises(ValueError, match="retention '1_0' is not a number"):
        parse_spec("q2c:1_0")
    for spaced in ("q2c: 0.5", "q2c :0.5", "q2c:0.5 :global", "int4 +q2c"):
        with pytest.raises(ValueError, match="no whitespace"):
            parse_spec(spaced)
    assert parse_spec("  q2c:0.5\n").retention == 0.5  # surrounding whitespace is ignored
    assert parse_spec("q2c:5e-1").retention == 0.5
    with pytest.raises(TypeError, match="question_len must be an int"):
        make_cache("q2c:0.5", MODEL, question_len=2.5)
    # the budget suffix follows the same rules
    for spaced in ("q2c:0.5: adakv", "q2c:0.5 :adakv", "q2c:0.5:head :pyramid", "snapkv:0.25:adakv +int4"):
        with pytest.raises(ValueError, match="no whitespace"):
            parse_spec(spaced)
    assert parse_spec(" snapkv:0.25:adakv+int4\t").budget == "adakv"
    for bad, message in (
        ("q2c:0.5:AdaKV", r"unknown granularity 'AdaKV': .* or a budget \(adakv, pyramid, uniform\)"),
        ("q2c:0.5:adakv:", r"unknown budget '' \(a selection is"),
        ("scout=x:q2c:0.5:pyramid", "not to a scout's"),
        ("q2c:0.5::adakv", "unknown granularity ''"),
        ("q2c:0.5:adakv:head", r"<selector>:<retention>\[:<granularity>\]\[:<budget>\]"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_spec(bad)


# ---------------------------------------------------------------------------------------------- fork


def test_fork_of_a_cache_filled_with_autograd_enabled():
    """The README example without torch.no_grad(): the fork holds detached values and continues identically."""
    ids = prompt_ids(1, 20)
    for make in (
        lambda: MixedPrecisionCache(MODEL, "int4", group_size=16),
        lambda: CompressedCache(MODEL, selector="snapkv", retention=0.5, question_len=0, window=4),
        lambda: CompressedCache(
            MODEL, selector="snapkv", retention=0.5, question_len=0, window=4, granularity="head", budget="adakv"
        ),
    ):
        cache = make()
        MODEL(ids, **cache_kwargs(MODEL, cache))  # autograd records: the stored tensors have a grad_fn
        fork = cache.fork()
        token = prompt_ids(1, 1, seed=9)
        with torch.no_grad():
            a = MODEL(token, **cache_kwargs(MODEL, fork)).logits
            b = MODEL(token, **cache_kwargs(MODEL, cache)).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert cache.get_seq_length() == fork.get_seq_length() == 21
