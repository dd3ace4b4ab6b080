"""Fuzz tests (seeded, bounded): damaged and forged caches and selections give ``ValueError`` or an identical cache.

* raw damage (bit flips, byte runs, truncations, appended junk) of saved caches of every class, including a
  sliding-window architecture (gemma2) and per-head adaptive (``adakv``, ragged layers) and ``pyramid`` budgets:
  always ``ValueError`` (the digest covers every byte);
* header and metadata edits with the digest recomputed, as a forger would: ``ValueError``, or a cache whose stored
  states equal the original's (an edit of an argument that plays no part after the prefill, e.g. the selector's
  seed). Only a header edit that points a tensor name at another tensor's bytes of the same dtype and shape can
  load a different cache: that is a well-formed forgery, which no digest can reveal (it is not a signature).
  Whatever loads must run a forward step;
* forged selections (random sizes, counts and encodings, CRC recomputed): ``ValueError`` or a selection, with
  parse time and memory bounded.

``python -m pytest tests/test_fuzz_inputs.py -s`` prints the counts per outcome.
"""

from __future__ import annotations

import copy
import random
import struct
import time
import tracemalloc
import zlib

import pytest
import torch
from conftest import make_tokenizer, prompt_ids, tiny_model
from test_integrity import build, split

from kvcache_plugins import CompressedCache, LowRankCache, MixedPrecisionCache, Scout, ScoutMaskedCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.layers.ragged import RaggedLayer
from kvcache_plugins.persist.container import cache_from_bytes
from kvcache_plugins.quant import QuantizedTensor
from kvcache_plugins.scout.selection import MAGIC, Selection, _varint
from kvcache_plugins.selection.budget import AdaKV, Pyramid

QLEN = 4
QWEN = tiny_model("qwen2", layers=2)
GEMMA = tiny_model("gemma2", "eager", layers=2)
TOK = make_tokenizer()


def _fill(model, cache, ids, steps=3):
    with torch.no_grad():
        token = model(ids, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
        for _ in range(steps):
            token = model(token, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)
    return cache


def _scout(model, **kw):
    ids = prompt_ids(2, 28)
    selection = Scout(tiny_model("qwen2", layers=1, seed=7), TOK, "q2c", 0.5).select(ids, question_len=QLEN)
    return _fill(model, ScoutMaskedCache(selection, model, tokenizer=TOK, **kw), ids)


CACHES = {
    "mixed int4": lambda: (QWEN, _fill(QWEN, MixedPrecisionCache(QWEN, "int4", group_size=8), prompt_ids(2, 20))),
    "mixed kivi sinks": lambda: (QWEN, _fill(QWEN, MixedPrecisionCache(
        QWEN, "kivi2", group_size=4, residual_length=6, sink_tokens=2,
    ), prompt_ids(1, 23))),
    "mixed per-layer k/v": lambda: (QWEN, _fill(QWEN, MixedPrecisionCache(
        QWEN, {0: 3, "default": {"key": 8, "value": 16}}, group_size=8, residual_length=3, sink_tokens=2,
    ), prompt_ids(2, 21))),
    "compressed q2c int4": lambda: (QWEN, _fill(QWEN, CompressedCache(
        QWEN, selector="q2c", retention=0.5, question_len=[QLEN, 2], quant="int4", group_size=8,
    ), prompt_ids(2, 24))),
    "compressed h2o budget per head": lambda: (QWEN, _fill(QWEN, CompressedCache(
        QWEN, selector="snapkv", max_tokens=14, question_len=QLEN, granularity="head", decode_policy="h2o",
        evict_every=2, window=4,
    ), prompt_ids(1, 24), steps=5)),
    "compressed adakv ragged int4": lambda: (QWEN, _fill(QWEN, CompressedCache(
        QWEN, selector="snapkv", retention=0.4, question_len=[QLEN, 2], granularity="head", budget="adakv",
        quant="int4", group_size=8, window=4,
    ), prompt_ids(2, 24))),
    "compressed adakv ragged fp": lambda: (QWEN, _fill(QWEN, CompressedCache(
        QWEN, selector="keydiff", retention=0.3, question_len=QLEN, granularity="head", budget=AdaKV(floor=0.5),
    ), prompt_ids(1, 26), steps=2)),
    "compressed pyramid int8": lambda: (QWEN, _fill(QWEN, CompressedCache(
        QWEN, selector="knorm", retention=0.5, question_len=QLEN, budget=Pyramid(beta=4), quant="int8", group_size=8,
    ), prompt_ids(2, 22))),
    "scout construction mixed_l0": lambda: (QWEN, _scout(QWEN, mode="construction", quant="mixed_l0", group_size=8)),
    "gemma2 mixed (sliding layer)": lambda: (GEMMA, _fill(
        GEMMA, MixedPrecisionCache(GEMMA, "int4", group_size=8), prompt_ids(1, 20), steps=2,
    )),
    "gemma2 compressed (sliding layer)": lambda: (GEMMA, _fill(GEMMA, CompressedCache(
        GEMMA, selector="knorm", retention=0.5, question_len=QLEN,
    ), prompt_ids(2, 22))),
    "lowrank pre-RoPE k/v ranks": lambda: (QWEN, _fill(QWEN, LowRankCache(
        QWEN, {0: (4, 6), "default": {"key": 3}},
    ), prompt_ids(2, 18))),
    "lowrank post-RoPE int4 factors": lambda: (QWEN, _fill(QWEN, LowRankCache(
        QWEN, [(4, 6), (None, 2)], quant="int4", keys="post_rope", group_size=8,
    ), prompt_ids(1, 21))),
    "compressed q2c + lowrank int8": lambda: (QWEN, _fill(QWEN, CompressedCache(
        QWEN, selector="q2c", retention=0.5, question_len=[QLEN, 2], quant="int8", group_size=8, lowrank=(4, None),
    ), prompt_ids(2, 24))),
    "scout post-hoc + lowrank per head": lambda: (QWEN, _scout(QWEN, lowrank=5, lowrank_keys="post_rope")),
    "gemma2 lowrank (sliding layer)": lambda: (GEMMA, _fill(
        GEMMA, LowRankCache(GEMMA, 4), prompt_ids(1, 20), steps=2,
    )),
}


def _states(cache):
    out = []
    for layer in cache.layers:
        if hasattr(layer, "materialize"):  # low-rank layers: reconstructed states, slot positions, lengths
            out.append((*layer.materialize(), getattr(layer, "positions", None), getattr(layer, "tail", None)))
        elif hasattr(layer, "stored_keys"):
            deq = lambda t: t.dequantize(torch.float32) if isinstance(t, QuantizedTensor) else t  # noqa: E731
            out.append((deq(layer.stored_keys), deq(layer.stored_values), layer.positions, layer.acc, layer.logical))
            if isinstance(layer, RaggedLayer):  # the ragged prompt part
                out.append((
                    deq(layer.flat_keys), deq(layer.flat_values), layer.flat_positions, layer.counts, layer.ragged,
                    layer.tail,
                ))
        else:
            out.append((layer.keys, layer.values, layer.get_seq_length()))
    return out


def _same(a, b) -> bool:
    if type(a) is not type(b) or a.get_seq_length() != b.get_seq_length():
        return False
    for sa, sb in zip(_states(a), _states(b)):
        for x, y in zip(sa, sb):
            if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                both = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                if not (both and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)):
                    return False
            elif x != y:
                return False
    return True


# ---------------------------------------------------------------------------------------------- mutations


def _raw_damage(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # one flipped bit anywhere
        i = rng.randrange(len(data))
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]
    if kind == 1:  # a run of random bytes
        i = rng.randrange(len(data))
        run = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        return data[:i] + run + data[i + len(run) :]
    if kind == 2:
        return data[: rng.randrange(len(data))]
    return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    yield path


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def _replacements(value, rng):
    pool = [None, True, False, 0, -1, 1, 2**31, 2**62, 1.5, "x", "", [], {}, [0], "torch.float16", "token", "q2c"]
    if isinstance(value, bool):
        pool += [not value]
    elif isinstance(value, int):
        pool += [value + 1, value - 1, value * 2, -value, float(value), str(value)]
    elif isinstance(value, float):
        pool += [value / 2, value * 2, 0.0, int(value)]
    elif isinstance(value, str):
        pool += [value + "x", value.upper(), value[:-1]]
    elif isinstance(value, list) and value:
        pool += [value[:-1], value + value[-1:], list(reversed(value))]
    return rng.choice(pool)


def _edit_meta(meta, rng):
    paths = list(_leaves(meta))
    path = rng.choice(paths[:-1])  # not the root
    parent, key = _get(meta, path[:-1]), path[-1]
    op = rng.randrange(10)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
    elif op == 1 and isinstance(parent, dict):
        parent[key + "_x"] = parent[key]
    elif op == 2 and isinstance(parent, list):
        del parent[key]
    else:
        parent[key] = _replacements(parent[key], rng)


def _edit_header(header, rng):
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.randrange(6)
    if op == 0:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "U8", "I32", "I64", "F64", "BOOL", "I8"])
    elif op == 1:
        shape = entry["shape"]
        rng.shuffle(shape)
    elif op == 2:
        i = rng.randrange(len(entry["shape"]))
        entry["shape"][i] = rng.choice([0, 1, entry["shape"][i] * 2, entry["shape"][i] + 1])
    elif op == 3:  # point a name at another tensor's bytes: a forgery, not damage (see _outcome)
        other = rng.choice(names)
        header[name], header[other] = header[other], header[name]
        return "swap"
    elif op == 4:
        header[name.replace("layers.0", "layers.1").replace("keys", "values") + rng.choice(["", "x"])] = header.pop(name)
    else:
        del header[name]
    return "edit"


def _outcome(data, model, original, moved_bytes=False):
    """``ValueError``, ``identical``, or (only when tensor bytes were moved between names, which a recomputed
    digest cannot reveal: any well-formed cache can be forged) ``well-formed variant``; whatever loads must run."""
    try:
        loaded = cache_from_bytes(data, model, tokenizer=TOK)
    except ValueError:
        return "ValueError"
    same = _same(loaded, original)
    assert same or moved_bytes, "an edited header or metadata loaded as a different cache"
    with torch.no_grad():
        model(prompt_ids(_batch(original), 1), **cache_kwargs(model, loaded.fork()))
    return "identical" if same else "well-formed variant"


def _batch(cache) -> int:
    for layer in cache.layers:
        for t in (getattr(layer, "positions", None), getattr(layer, "counts", None), getattr(layer, "keys", None)):
            if isinstance(t, torch.Tensor):
                return t.shape[0]
        if getattr(layer, "streams", None):
            return layer.batch_size
        if getattr(layer, "key_store", None) is not None:
            return layer.key_store.shape[0]
    raise AssertionError("empty cache")


@pytest.mark.parametrize("name", list(CACHES))
def test_fuzz_saved_caches(name):
    model, cache = CACHES[name]()
    if "ragged" in name:  # the per-head (ragged) state is what is fuzzed
        assert all(cache.layers[i].ragged for i in cache.compressed_layers)
    data = cache.to_bytes()
    rng = random.Random(f"issue-14 {name}")
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for _ in range(1000):  # raw damage: the digest refuses every changed byte
        damaged = _raw_damage(data, rng)
        if damaged == data:
            continue
        with pytest.raises(ValueError):
            cache_from_bytes(damaged, model, tokenizer=TOK)
        counts["raw: ValueError"] = counts.get("raw: ValueError", 0) + 1
    header, meta, body = split(data)
    for trial in range(600):  # forged: edits with the digest recomputed
        h, m = copy.deepcopy(header), copy.deepcopy(meta)
        ops = [_edit_header(h, rng) if rng.random() < 0.3 else _edit_meta(m, rng) for _ in range(rng.choice([1, 1, 2]))]
        forged = build(h, m, body)
        outcome = _outcome(forged, model, cache, moved_bytes="swap" in ops)
        counts[f"forged: {outcome}"] = counts.get(f"forged: {outcome}", 0) + 1
    print(f"\n{name}: {counts} in {time.perf_counter() - start:.1f} s")
    assert counts.get("forged: ValueError", 0) > 450


@pytest.mark.parametrize("name", ["lowrank post-RoPE int4 factors", "compressed q2c + lowrank int8", "mixed int4"])
def test_fuzz_zstd_coded_caches(name):
    """``compress="zstd"``: damage of the frame gives ``ValueError`` or the very same cache (the digest inside
    covers the whole container; a frame header edit can decode to the same bytes); bytes appended after the frame
    and truncations always give ``ValueError``."""
    pytest.importorskip("zstandard")
    model, cache = CACHES[name]()
    data = cache.to_bytes(compress="zstd")
    assert data[:4] == b"\x28\xb5\x2f\xfd"
    assert _same(cache_from_bytes(data, model, tokenizer=TOK), cache)
    rng = random.Random(f"issue-17 zstd {name}")
    counts: dict[str, int] = {}
    for _ in range(600):
        damaged = _raw_damage(data, rng)
        if damaged == data:
            continue
        if len(damaged) != len(data):  # truncated or extended: never the same frame
            with pytest.raises(ValueError):
                cache_from_bytes(damaged, model, tokenizer=TOK)
            outcome = "ValueError"
        else:
            outcome = _outcome(damaged, model, cache)
        counts[outcome] = counts.get(outcome, 0) + 1
    print(f"\nzstd {name}: {counts}")
    assert counts.get("ValueError", 0) > 550


def test_forged_metadata_variants_that_load_are_harmless():
    """A handful of argument edits load (they play no part after the prefill) and leave the states identical."""
    model, cache = CACHES["compressed q2c int4"]()
    header, meta, body = split(cache.to_bytes())
    meta["cache"]["args"]["seed"] = 12345
    meta["cache"]["args"]["selector_options"]["chunk"] = 7
    assert _outcome(build(header, meta, body), model, cache) == "identical"


# ---------------------------------------------------------------------------------------------- selections


def _random_selection_bytes(rng: random.Random) -> bytes:
    """A message with random (often huge) counts and lengths, and a valid CRC: what a forger sends."""
    big = lambda: rng.choice([0, 1, 2, 7, 255, 2**14, 2**21, 10**7, 2**31, 2**35 - 1])  # noqa: E731
    body = MAGIC + bytes([1, rng.choice([0, 1, 2])]) + _varint(big()) + _varint(big()) + _varint(rng.choice([0, 1, big()]))
    body += bytes(rng.randrange(256) for _ in range(8))
    name = rng.choice([b"q2c", b"", "é".encode(), b"x" * rng.choice([1, 70, 300])])
    body += _varint(len(name)) + name
    for _ in range(rng.randint(0, 6)):
        body += _varint(big()) + _varint(rng.choice([0, 3, big()])) + _varint(big()) + bytes([rng.choice([0, 1, 2])])
        body += bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    return body + struct.pack("<I", zlib.crc32(body))


def test_fuzz_forged_selections_parse_in_bounded_time_and_memory():
    rng = random.Random("issue-14 selections")
    valid = Scout(tiny_model("qwen2", layers=1, seed=7), TOK, "q2c", 0.5, granularity="layer").select(
        prompt_ids(2, 40), question_len=QLEN
    ).to_bytes()
    counts: dict[str, int] = {}
    worst_time, worst_peak = 0.0, 0
    for trial in range(1500):
        if trial % 3 == 0:  # a real message with one field changed and the CRC recomputed
            body = bytearray(valid[:-4])
            i = rng.randrange(6, len(body))
            body[i] = rng.randrange(256)
            data = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
        else:
            data = _random_selection_bytes(rng)
        tracemalloc.start()
        start = time.perf_counter()
        try:
            Selection.from_bytes(data)
            outcome = "parsed"
        except ValueError:
            outcome = "ValueError"
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        counts[outcome] = counts.get(outcome, 0) + 1
        worst_time, worst_peak = max(worst_time, elapsed), max(worst_peak, peak)
        # linear in the message: a few hundred bytes of Python objects per message byte at most
        assert peak < 4096 + 400 * len(data), (data, peak)
    print(f"\nselections: {counts}; worst parse {worst_time * 1e3:.2f} ms, worst peak memory {worst_peak} bytes")
    # no bound on worst_time: the peak-memory bound above is what proves linear parsing, and a wall-clock bound
    # fails on a loaded machine (issue 25)
    assert counts["ValueError"] > 1000
