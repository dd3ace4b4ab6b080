"""Issue 25 (6): integrity, check by check. Every refusal of load and wire-format validation has a row here.

A row names one check (``file::function: message`` as the source writes it, f-string fields as ``{}``), forges
exactly that defect in an otherwise valid input, with the SHA-256 digest (saved caches) or the CRC-32 (selections)
recomputed as a forger would, and expects a ``ValueError`` whose message names the defect. The meta-test parses the
validation modules with ``ast`` and fails for a check that has no row (or is not listed, with its reason, as not
being load validation); a new check therefore needs a new row: add one function to ``ROWS``.
"""

from __future__ import annotations

import ast
import json
import pathlib
import struct
import zlib
from collections.abc import Callable

import pytest
import torch
from conftest import prompt_ids, tiny_model
from safetensors.torch import load as st_load

from kvcache_plugins import CompressedCache, MixedPrecisionCache
from kvcache_plugins._compat import cache_kwargs
from kvcache_plugins.persist import coding
from kvcache_plugins.persist.container import _safetensors, cache_from_bytes, verify
from kvcache_plugins.scout.selection import MAGIC, Selection, _varint

ROOT = pathlib.Path(__file__).resolve().parents[1] / "kvcache_plugins"
#: the modules of load and wire-format validation; ``require(...)`` calls anywhere under caches/, layers/ and
#: persist/ count too
VALIDATION = ["persist/container.py", "persist/coding.py", "persist/state.py", "scout/selection.py", "scout/wire.py"]
STATE_FOLDERS = ("caches", "layers", "persist")

MODEL = tiny_model("qwen2", layers=2)


def _valid_cache_bytes() -> bytes:
    """Layer 0 at 16 bits (a plain DynamicLayer), layer 1 int4 with a 2-token residual window."""
    cache = MixedPrecisionCache(MODEL, {0: 16, "default": 4}, group_size=16, residual_length=2, fused=False)
    with torch.no_grad():
        MODEL(prompt_ids(1, 20), **cache_kwargs(MODEL, cache))
    return cache.to_bytes()


VALID = _valid_cache_bytes()


def _valid_compressed_bytes() -> bytes:
    """Two rows of 24 tokens, q2c keeping half the context of both layers (one position set per row)."""
    cache = CompressedCache(MODEL, selector="q2c", retention=0.5, question_len=4)
    with torch.no_grad():
        MODEL(prompt_ids(2, 24), **cache_kwargs(MODEL, cache))
    return cache.to_bytes()


COMPRESSED = _valid_compressed_bytes()


def forge(
    edit_meta: Callable[[dict], None] | None = None, edit_tensors: Callable[[dict], None] | None = None,
    base: bytes = VALID,
) -> bytes:
    """``base`` with its metadata and/or tensors edited, re-emitted with a freshly computed digest."""
    _, meta = verify(base)
    tensors = dict(st_load(base))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    return _safetensors(tensors, json.dumps(meta))


def resign(data: bytes | bytearray) -> bytes:
    """Recompute the digest of a byte-level edit (the digest sits after the fixed prefix)."""
    import hashlib

    data = bytearray(data)
    at = data.index(b'"sha256":"') + len(b'"sha256":"')
    digest = hashlib.sha256()
    digest.update(data[:at])
    digest.update(data[at + 64 :])
    data[at : at + 64] = digest.hexdigest().encode()
    return bytes(data)


def header_edit(old: bytes, new: bytes) -> bytes:
    """Replace ``old`` by ``new`` of the same length in the header, then re-sign."""
    assert len(old) == len(new) and VALID.count(old) >= 1
    return resign(VALID.replace(old, new, 1))


def load(data: bytes) -> Callable[[], object]:
    return lambda: cache_from_bytes(data, MODEL)


def spec1(m: dict) -> dict:
    return m["cache"]["layer_specs"][1]


def _poke(x: torch.Tensor, slot: int, value: int) -> torch.Tensor:
    """A copy of positions ``[B, H_s, S]`` with row 0, head 0, ``slot`` set to ``value``."""
    x = x.clone()
    x[0, 0, slot] = value
    return x


def set_tensor(name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    return lambda t: t.__setitem__(name, fn(t[name]))


# ----------------------------------------------------------------------------------------------- selections


def _message(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _head(rows=1, layers=0, sinks=1, name=b"q2c", flags=None, version=1) -> bytes:
    flags = (1 if layers else 0) if flags is None else flags
    return MAGIC + bytes([version, flags]) + _varint(rows) + _varint(layers) + _varint(sinks) + b"F" * 8 + _varint(len(name)) + name


def _row(p=10, q=2, kept=2, encoding=1, payload=b"\x00\x01") -> bytes:
    return _varint(p) + _varint(q) + _varint(kept) + bytes([encoding]) + payload


def sel(data: bytes) -> Callable[[], object]:
    return lambda: Selection.from_bytes(data)


def sel_args(**change) -> Callable[[], object]:
    ok = dict(positions=[[2, 4]], prompt_len=[10], question_len=[2], sinks=1, fingerprint=b"F" * 8, selector="q2c")
    return lambda: Selection(**{**ok, **change})


def test_the_valid_inputs_load():
    assert cache_from_bytes(forge(), MODEL).get_seq_length() == 20
    assert Selection.from_bytes(_message(_head() + _row())).positions == [[1, 3]]


# ----------------------------------------------------------------------------------------------- the table

#: check -> (a thunk that must raise, a regex the ValueError must match)
ROWS: dict[str, tuple[Callable[[], object], str]] = {
    # serialization.py: the container
    "container.py::constant: {} is not a JSON number": (
        load(resign(forge(lambda m: m["layers"][0].update(dtype="@NAN@")).replace(b'\\"@NAN@\\"', b"NaN      "))),
        "not valid JSON.*NaN is not a JSON number",
    ),
    "container.py::pairs: duplicate key {}": (
        load(resign(VALID.replace(b'{\\"kind\\": \\"dynamic\\"', b'{\\"dtype\\": \\"dynamic\\"', 1).replace(
            b'\\"dtype\\": \\"dynamic\\", \\"dtype\\"', b'\\"dtype\\": \\"dynamic\\", \\"dtype\\"'))),
        "duplicate key 'dtype'",
    ),
    "container.py::_strict_json: cache file is corrupted: its {} is not valid JSON ({})": (
        load(resign(VALID.replace(b'\\"class\\": ', b'\\"class\\"  ', 1))), "its metadata is not valid JSON",
    ),
    "container.py::verify: not a kvcache_plugins cache file: too short": (load(VALID[:7]), "too short"),
    "container.py::verify: not a kvcache_plugins cache file, or it is truncated (bad safetensors header size)": (
        load(struct.pack("<Q", len(VALID)) + VALID[8:]), "bad safetensors header size",
    ),
    "container.py::verify: not a kvcache_plugins cache file (no kvcache_plugins metadata at the start of the header)": (
        load(header_edit(b'{"__metadata__":{"format"', b'{"__metadata__":{"formax"')), "no kvcache_plugins metadata",
    ),
    "container.py::verify: this cache file uses format version {}; this library reads version {} only (version 1 "
    "files carried a checksum that did not cover their metadata). Save the cache again from its source": (
        load(__import__("safetensors.torch").torch.save(
            {"x": torch.zeros(2)}, metadata={"kvcache_plugins": json.dumps({"format": "kvcache_plugins.cache", "version": 1})}
        )),
        "format version 1.*Save the cache again",
    ),
    "container.py::verify: unsupported cache format version {}; this library reads version {}": (
        load(header_edit(b'"version":"2"', b'"version":"3"')), "unsupported cache format version '3'",
    ),
    "container.py::verify: cache file is corrupted (no digest after the version)": (
        load(VALID.replace(b'","sha256":"', b'","sha257":"', 1)), "no digest after the version",  # nothing to re-sign
    ),
    "container.py::verify: cache file is corrupted, truncated or edited (SHA-256 checksum mismatch)": (
        load(VALID[:-1] + bytes([VALID[-1] ^ 1])), "SHA-256 checksum mismatch",
    ),
    "container.py::verify: cache file is invalid: its header is not a safetensors header": (
        load(resign(VALID.replace(b'"__metadata__":{"format"', b'"__metadata__":{"format"', 1).replace(
            b'"__metadata__"', b'"__metadataX_"', 1))),
        "not a safetensors header|no kvcache_plugins metadata",
    ),
    "container.py::verify: cache file is invalid: unexpected header metadata fields {}": (
        load(resign(VALID.replace(b'","kvcache_plugins":', b'","kvcache_pluginz":', 1))),
        r"unexpected header metadata fields \['format', 'kvcache_pluginz'",
    ),
    "container.py::verify: cache file is invalid: tensor {} has dtype {}; allowed {}": (
        load(header_edit(b'"dtype":"U8"', b'"dtype":"I8"')), "has dtype 'I8'; allowed",
    ),
    "container.py::cache_from_bytes: this cache was saved for another model (saved vs this model): {}": (
        load(forge(lambda m: m["fingerprint"].update(head_dim=32))), r"another model.*'head_dim': \(32, 16\)",
    ),
    "container.py::cache_from_bytes: cache file is invalid: {}": (
        load(header_edit(b'"data_offsets":[0,', b'"data_offsets":[1,')), "cache file is invalid: ",
    ),
    "container.py::cache_from_bytes: saved layer kind {} does not fit this cache's layer {} ({})": (
        load(forge(lambda m: m["layers"][0].update(kind="mixed"))), "saved layer kind 'mixed' does not fit",
    ),
    "container.py::cache_from_bytes: saved cache is invalid: tensors that no field refers to: {}": (
        load(forge(edit_tensors=lambda t: t.update({"layers.0.smuggled": torch.zeros(3)}))),
        r"no field refers to: \['layers.0.smuggled'\]",
    ),
    # coding.py: the zstd frame
    "coding.py::decompress: the zstd frame declares {} content size from {} bytes (at most {} times the input)": (
        load(coding.ZSTD_MAGIC + b"\x00" + b"\x00" * 8), "declares|damaged zstd frame",
    ),
    "coding.py::decompress: damaged zstd frame ({})": (
        load(bytearray(coding.compress(VALID, "zstd"))[:-6] + b"\xff" * 6), "damaged zstd frame|declares",
    ),
    "coding.py::decompress: damaged zstd frame header ({})": (
        load(coding.ZSTD_MAGIC + b"\xff"), "damaged zstd frame header",
    ),
    # state.py: the reader of every field
    "state.py::cache_class: unknown saved cache class {}; this library reads {}": (
        load(forge(lambda m: m.update({"class": "DynamicCache"}))), "unknown saved cache class 'DynamicCache'",
    ),
    "state.py::__init__: expected an object, got {}": (
        load(forge(lambda m: m["layers"].__setitem__(0, 5))), r"layers\[0\]: expected an object, got int",
    ),
    "state.py::fields: expected the fields {} (optional: {}), missing {}, unknown {}": (
        load(forge(lambda m: m["layers"][1].update(colour="red"))), r"unknown \['colour'\]",
    ),
    "state.py::raw: missing field {}": (load(forge(lambda m: m["layers"][1].pop("kind"))), "missing field 'kind'"),
    "state.py::int: {} must be an int in [{}, {}]{}, got {}": (
        load(forge(lambda m: spec1(m).update(residual_length=-1))), r"residual_length must be an int in \[0, ",
    ),
    "state.py::str: {} must be {}{}, got {}": (
        load(forge(lambda m: spec1(m)["key"].update(axis="head"))), r"axis must be one of \['token', 'channel'\]",
    ),
    "state.py::model_dtype: {} {} is not this model's dtype {}": (
        load(forge(lambda m: m["layers"][0].update(dtype="torch.float16"))), "is not this model's dtype torch.float32",
    ),
    "state.py::items: {} must be a list{}": (
        load(forge(lambda m: m["layers"].pop())), "layers must be a list of 2 entries",
    ),
    "state.py::tensor: tensor {} is missing": (
        load(forge(edit_tensors=lambda t: t.pop("layers.0.values"))), "tensor 'layers.0.values' is missing",
    ),
    "state.py::tensor: tensor {} must be {}, got {}": (
        load(forge(edit_tensors=set_tensor("layers.1.s0.body.scale", lambda x: x.float()))),
        "'layers.1.s0.body.scale' must be torch.float16, got torch.float32",
    ),
    "state.py::tensor: tensor {} must have shape {}, got {}": (
        load(forge(edit_tensors=set_tensor("layers.0.values", lambda x: x[:, :, :-1]))),
        r"'layers.0.values' must have shape \[1, 2, 20, 16\]",
    ),
    "state.py::finite: tensor {} holds infinite or NaN values": (
        load(forge(edit_tensors=set_tensor("layers.0.keys", lambda x: x.clone().index_fill_(2, torch.tensor([3]), float("nan"))))),
        "'layers.0.keys' holds infinite or NaN values",
    ),
    "state.py::is_empty: empty must be true when given": (
        load(forge(lambda m: m["layers"].__setitem__(0, {"kind": "dynamic", "empty": False}),
                   lambda t: (t.pop("layers.0.keys"), t.pop("layers.0.values")))),
        "empty must be true when given",
    ),
    "state.py::read_tensor_spec: bits must be one of {}, got {}": (
        load(forge(lambda m: spec1(m)["key"].update(bits=5))), "bits must be one of",
    ),
    "state.py::read_tensor_spec: {}": (  # the spec's own refusal, e.g. a group that does not divide head_dim
        load(forge(lambda m: spec1(m)["key"].update(group_size=5))), "group_size",
    ),
    "state.py::read_layer_spec: {}": (  # channel groups need a residual window of at least one group
        load(forge(lambda m: spec1(m)["value"].update(axis="channel"))), "residual",
    ),
    "state.py::read_stored: {}.scale holds negative scales": (
        load(forge(edit_tensors=set_tensor("layers.1.s0.body.scale", lambda x: -x.abs() - 1))),
        "body.scale holds negative scales",
    ),
    "state.py::read_stored: {}.{} without {}.codes": (
        load(forge(edit_tensors=lambda t: t.pop("layers.1.s0.body.codes"))), "body.scale without s0.body.codes",
    ),
    "state.py::_dynamic_load_state: keys of shape {} hold no token": (
        load(forge(edit_tensors=lambda t: t.update({k: t[k][:, :, :0] for k in ("layers.0.keys", "layers.0.values")}))),
        r"keys of shape \[1, 2, 0, 16\] hold no token",
    ),
    # caches: the layers and caches' own checks
    "mixed.py::load_state: {}: {} residual tokens, at most {}": (
        load(forge(edit_tensors=set_tensor("layers.1.s0.residual", lambda x: torch.cat([x, x[:, :, :1]], 2)))),
        "3 residual tokens, at most 2",
    ),
    "mixed.py::load_state: paired keys and values need an even number of rows": (
        load(forge(edit_tensors=lambda t: t.update({k: v[:1] for k, v in t.items() if k.startswith("layers.1.")}))),
        "paired keys and values need an even number of rows",
    ),
    "mixed.py::load_state: an initialized layer holds no token": (
        load(forge(edit_tensors=lambda t: [t.pop(k) for k in list(t) if k.startswith("layers.1.")])),
        "an initialized layer holds no token",
    ),
    "base.py::require_layers_agree: layers disagree on (rows, tokens): {}": (
        load(forge(edit_tensors=lambda t: t.update({k: t[k][:, :, 1:] for k in ("layers.0.keys", "layers.0.values")}))),
        r"layers disagree on \(rows, tokens\): \[\(1, 19\), \(1, 20\)\]",
    ),
    "slots.py::load_state: positions must be [B >= 1, 1 or {}, S], got {}": (
        load(forge(edit_tensors=set_tensor("layers.0.positions", lambda x: x.expand(2, 3, 14).contiguous()), base=COMPRESSED)),
        r"positions must be \[B >= 1, 1 or 2, S\], got \[2, 3, 14\]",
    ),
    "slots.py::load_state: positions must lie in [-1, logical={})": (
        load(forge(edit_tensors=set_tensor("layers.0.positions", lambda x: _poke(x, -1, 24)), base=COMPRESSED)),
        r"positions must lie in \[-1, logical=24\)",
    ),
    "slots.py::load_state: unused slots (-1) must precede the used ones": (
        load(forge(edit_tensors=set_tensor("layers.0.positions", lambda x: _poke(x, -1, -1)), base=COMPRESSED)),
        "unused slots",
    ),
    "slots.py::load_state: kept positions must increase strictly": (
        load(forge(edit_tensors=set_tensor("layers.0.positions", lambda x: _poke(x, 1, int(x[0, 0, 0]))), base=COMPRESSED)),
        "kept positions must increase strictly",
    ),
    "slots.py::load_state: the last {} slots must hold the newest positions": (
        load(forge(lambda m: m["layers"][0].update(tail=5), base=COMPRESSED)), "the last 5 slots must hold the newest",
    ),
    "slots.py::load_state: acc is saved only with decode_policy='h2o'": (
        load(forge(edit_tensors=lambda t: t.update({"layers.0.acc": torch.zeros(2, 2, 14)}), base=COMPRESSED)),
        "acc is saved only with decode_policy='h2o'",
    ),
    "compressed_state.py::finish_state: compressed layers disagree on the tokens seen": (
        load(forge(lambda m: m["layers"][1].update(logical=25), base=COMPRESSED)), "disagree on the tokens seen",
    ),
    "compressed_state.py::finish_state: question spans {} differ from question_len {}": (
        load(forge(lambda m: m["cache"]["layout"].update(question_len=[4, 5]), base=COMPRESSED)),
        r"question spans \[4, 5\] differ from question_len 4",
    ),
    # scout/selection.py: the selection wire format and constructor
    "selection.py::_init_header: selector must be an ASCII name of at most {} characters, got {}": (
        sel_args(selector="qé"), "ASCII name",
    ),
    "selection.py::_init_header: the vocabulary fingerprint is 8 bytes": (sel_args(fingerprint=b"F" * 7), "8 bytes"),
    "selection.py::__init__: positions, prompt_len and question_len need one entry per row (at least one row)": (
        sel_args(question_len=[2, 2]), "one entry per row",
    ),
    "selection.py::__init__: a per-layer selection has at least one layer, and positions are layer 0's": (
        sel_args(layer_positions=[[[2, 5]]]), "positions are layer 0's",
    ),
    "selection.py::__init__: every layer needs one position list per row": (
        sel_args(layer_positions=[[[2, 4]], []]), "one position list per row",
    ),
    "selection.py::__init__: row {}: sinks and question span exceed the prompt": (
        sel_args(positions=[[]], sinks=9), "row 0: sinks and question span exceed the prompt",
    ),
    "selection.py::__init__: row {}: kept positions must be sorted, unique and inside the context span": (
        sel_args(positions=[[4, 2]]), "sorted, unique and inside",
    ),
    "wire.py::decode: selection bytes exceed {} bytes (max_bytes): not a selection": (
        sel(b"\0" * (__import__("kvcache_plugins.scout.selection").scout.selection.MAX_SELECTION_BYTES + 1)),
        "not a selection",
    ),
    "wire.py::decode: not a kvcache_plugins selection (bad magic bytes)": (
        sel(_message(b"KVSX" + _head()[4:] + _row())), "bad magic bytes",
    ),
    "wire.py::decode: unsupported selection format version {}; this library reads version {}": (
        sel(_message(_head(version=2) + _row())), "format version 2",
    ),
    "wire.py::decode: selection bytes are corrupted or truncated (checksum mismatch)": (
        sel(_message(_head() + _row())[:-1] + b"\0"), "checksum mismatch",
    ),
    "wire.py::decode: unknown selection flags {}": (sel(_message(_head(flags=2) + _row())), "flags 2"),
    "wire.py::decode: the selector name in the selection bytes is not ASCII": (
        sel(_message(_head(name="é".encode()) + _row())), "not ASCII",
    ),
    "wire.py::decode: selection header is inconsistent (no rows, or per-layer flag vs layer count)": (
        sel(_message(_head(flags=1) + _row())), "header is inconsistent",
    ),
    "wire.py::decode: selection header claims {} rows x {} layers, more than its {} bytes hold": (
        sel(_message(_head(rows=3) + _row())), "claims 3 rows x 1 layers",
    ),
    "wire.py::decode: selection rows disagree between layers": (
        sel(_message(_head(layers=2) + _row() + _row(p=11))), "disagree between layers",
    ),
    "wire.py::varint: the selection's {} is {}, above the cap {}": (  # a kept count above the context span
        sel(_message(_head() + _row(kept=8))), r"kept count \(at most the context span\) is 8, above the cap 7",
    ),
    "wire.py::decode: selection row claims more kept positions than its bytes hold": (
        sel(_message(_head() + _row(p=400, kept=300))), "claims more kept positions",
    ),
    "wire.py::decode: unknown row encoding {}": (sel(_message(_head() + _row(encoding=7))), "row encoding 7"),
    "wire.py::_decode_bitmap: selection row does not decode to its declared size": (
        sel(_message(_head() + _row(encoding=0, payload=b"\x01"))), "declared size",
    ),
    "wire.py::decode: trailing bytes after the selection": (
        sel(_message(_head() + _row() + b"\0")), "trailing bytes",
    ),
    "wire.py::_delta_end: selection bytes are truncated": (
        sel(_message(_head() + _row(encoding=0, payload=b""))), "selection bytes are truncated",
    ),
    "wire.py::decode: selection row is inconsistent (sinks and question span exceed the prompt)": (
        sel(_message(_head(sinks=2**20) + _row())), "sinks and question span exceed the prompt",
    ),
    "wire.py::varint: malformed varint in selection bytes (more than 5 bytes)": (
        sel(_message(_head()[:6] + b"\xff" * 6 + b"\x01" + _row())), "malformed varint",
    ),
}

#: refusals in the validation modules that are not load or wire-format validation, each with why
NOT_LOAD_VALIDATION = {
    "container.py::cache_to_bytes: layer {}: {}": "saving, not loading",
    "coding.py::compress: unknown compress={}; choose one of {} or None": "an argument of saving",
    "coding.py::decompress: this cache is zstd-coded (compress='zstd'): {}": "no zstd module installed (environment)",
    "state.py::register_layer_functions: layer kind {} is already registered for {}": "registration at import",
    "state.py::deco: cache kind {} is already registered for {}": "registration at import",
    "state.py::require: {}": "not a check: the function every require(...) row goes through",
    "selection.py::selection_overlap: selections describe different prompts (lengths, question spans or sinks differ)": "a metric",
    "wire.py::varint: varints are unsigned": "writing",
    "selection.py::map_selection: map_selection carries global selections; per-layer positions have no meaning across models": "an argument",
    "selection.py::map_selection: row {}: the source tokenizer gives {} tokens, the selection was made for {}": "an argument",
}

#: checks that still need a row (issue 25 leaves them for the next round); the meta-test keeps this list honest
NEEDS_A_ROW = {
    # issue 29's receiver caps and the vectorised decoder: each refusal has a test in tests/test_wire_caps.py
    "wire.py::decode: the selection keeps more than {} positions in all (max_positions)",
    "wire.py::decode: the selection's {} rows x {} layers exceed the cap of {} (layer, row) entries (max_entries)",
    "wire.py::decode: selection row does not decode to its declared size",
    "wire.py::_decode_delta: selection row does not decode to its declared size",
    "wire.py::_decode_delta: malformed varint in selection bytes (more than 5 bytes)",
    "wire.py::byte: selection bytes are truncated",
    "wire.py::take: selection bytes are truncated",
    "wire.py::varint: selection bytes are truncated",
    "selection.py::_init_header: positions, prompt_len and question_len need one entry per row (at least one row)",
    "selection.py::_row_array: row {}: kept positions must be sorted, unique and inside the context span",
    # zstd paths of the other zstd implementation (Python 3.14's compression.zstd) or unreachable with zstandard
    "coding.py::decompress: the zstd frame declares {} bytes from {} (at most {} times the input)",
    "coding.py::decompress: bytes after the zstd frame, or a frame that does not end",
    "coding.py::decompress: the zstd frame declares {} bytes and holds {}",
    "state.py::float: {} must be a number in [{}, {}]{}, got {}",
    "state.py::bool: {} must be true or false, got {}",
    "state.py::int_list: {}",
    "state.py::tensor: tensor {} is used twice",
    "state.py::read_stored: {}: {} per-channel tokens is not a multiple of group_size {}",
    "state.py::_dynamic_load_state: a sliding-window layer (window {}) that has seen {} tokens holds {}, got {}",
    # the cache classes' own cross-checks (several have forged-file tests in test_integrity.py / test_lowrank.py,
    # not yet rows of this table)
    'compressed_state.py::from_state_args: selector_options must map names to plain values',
    'compressed_state.py::finish_state: a cache holding tokens needs its prompt layout',
    "compressed_state.py::finish_state: a kept position lies in a row's left padding",
    'compressed_state.py::finish_state: a layer has seen {} tokens, fewer than the prompt',
    'compressed_state.py::finish_state: a layer holds more than the {} slots allowed',
    'compressed_state.py::finish_state: a layer holds {} rows, the layout {}',
    "compressed_state.py::finish_state: a ragged layer's prompt part covers {} positions, the prompt {}",
    'compressed_state.py::finish_state: layers disagree on the tokens seen',
    'compressed_state.py::finish_state: max_tokens={} cannot hold the {} protected tokens',
    'compressed_state.py::finish_state: padding, sinks and question exceed the prompt',
    'compressed_state.py::finish_state: row {} does not keep its sinks and question span',
    'compressed_state.py::finish_state: some compressed layers are empty, others are not',
    'compressed_state.py::finish_state: the layout has no row',
    'compressed_state.py::finish_state: {} rows cannot come from question_len {}',
    'mixed.py::load_state: {}: a 16-bit stream holds a residual only',
    'mixed.py::load_state: {}: keys and values hold different token counts',
    'mixed.py::load_state: {}: tokens after an incomplete sink span',
    'mixed.py::load_state: {}: {} sink tokens, the spec {}',
    "lowrank_store.py::_read_layout: ranks {} differ from this layer's {} (key, value)",
    'lowrank.py::_read_stores: a low-rank layer holds {} slots, {} of them after the selection: none selected',
    'base.py::require_layers_agree: a sliding-window layer has seen {} tokens of {} rows, the other layers {} of {}',
    'lowrank.py::load_state: keys hold {} tokens, values {}',
    'lowrank_store.py::read_ranks: {} must be a list of {} [key_rank, value_rank] pairs, each null or an int in 1..{}',
    'lowrank_store.py::read_store: {} holds no token',
    'lowrank_store.py::read_store: {}.left of shape [{}, {}, {}, {}] factors no token',
    'lowrank_store.py::read_store: {}.tail holds no token',
    'base.py::require_layers_agree: a sliding-window layer has seen {} tokens of {} rows, the other layers {} of {}',
    'ragged.py::load_state: counts must be [B >= 1, {}], got {}',
    'ragged.py::load_state: counts must be non-negative and sum to the {} entries of flat_positions',
    'ragged.py::load_state: flat_positions must increase strictly within each head',
    'ragged.py::load_state: flat_positions must lie in [0, {})',
    'ragged.py::load_state: logical={} leaves no prompt before the {} generated tokens',
    'ragged.py::load_state: the generated part holds no token (omit keys and values instead)',
    'ragged.py::load_state: the generated part needs both keys and values',
    'scout_masked.py::from_state_args: the selection is larger than any selection this library writes',
    "scout_masked.py::finish_state: prompt lengths {} differ from the selection's {}",
    'scout_masked.py::finish_state: {} rows cannot come from a selection of {}',
}


def _render(node: ast.AST) -> str:
    if isinstance(node, ast.Constant):
        return str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(_render(v) if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp):
        return _render(node.left) + _render(node.right)
    return "{}"


def _own_nodes(func: ast.AST):
    """The nodes of ``func``'s body, not those of functions defined inside it (they are checked as themselves)."""
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))


def source_checks() -> set[str]:
    """Every ``require(cond, message)`` under caches/, layers/, persist/ and every ``raise ValueError(...)`` / ``raise
    <reader>.error(...)`` / ``raise _refuse(...)`` in the validation modules, as ``file::function: message``."""
    found = set()
    paths = {ROOT / p for p in VALIDATION} | {p for d in STATE_FOLDERS for p in (ROOT / d).glob("*.py")}
    for path in sorted(paths):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in _own_nodes(func):
                message = None
                if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "require":
                    message = node.args[1] if len(node.args) >= 2 else None
                elif (
                    str(path.relative_to(ROOT)) in VALIDATION and isinstance(node, ast.Raise)
                    and isinstance(node.exc, ast.Call) and node.exc.args
                    and getattr(node.exc.func, "attr", getattr(node.exc.func, "id", None)) in ("ValueError", "error", "_refuse")
                ):
                    message = node.exc.args[0]
                if message is not None:
                    found.add(f"{path.name}::{func.name}: {_render(message)}")
    return found


def test_every_check_in_the_source_has_a_row():
    checks = source_checks()
    listed = set(ROWS) | set(NOT_LOAD_VALIDATION) | NEEDS_A_ROW
    missing = sorted(checks - listed)
    stale = sorted(listed - checks)
    assert not missing, "checks without a row (add one to ROWS):\n" + "\n".join(missing)
    assert not stale, "rows for checks the source no longer has:\n" + "\n".join(stale)
    assert not set(ROWS) & NEEDS_A_ROW


@pytest.mark.parametrize("check", list(ROWS))
def test_each_forged_defect_is_refused_naming_it(check):
    thunk, message = ROWS[check]
    with pytest.raises(ValueError, match=message):
        thunk()
