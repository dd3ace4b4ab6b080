"""Selection wire caps (issue 29): each receiver cap is refused from the header with a ValueError naming it, legit
messages parse, and random selections round-trip through to_bytes/from_bytes with every accessor unchanged."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache_plugins.scout.selection import MAGIC, Selection, _varint
from kvcache_plugins.scout import wire


def _message(rows: int, layers: int, entries: bytes, sinks: int = 0) -> bytes:
    body = MAGIC + bytes([1, 1 if layers else 0]) + _varint(rows) + _varint(layers) + _varint(sinks) + b"F" * 8
    body += _varint(3) + b"q2c" + entries
    return body + struct.pack("<I", zlib.crc32(body))


EMPTY = _varint(0) + _varint(0) + _varint(0) + b"\1"


def _bitmap_row(span: int) -> bytes:
    return _varint(span) + _varint(0) + _varint(span) + b"\0" + b"\xff" * (span // 8)


CASES = {
    # cap keyword: (message, limit it is refused at, message accepted with the cap raised)
    "max_rows": (_message(9, 0, EMPTY * 9), 8),
    "max_layers": (_message(1, 9, EMPTY * 9), 8),
    "max_entries": (_message(3, 3, EMPTY * 9), 8),
    "max_tokens": (_message(1, 0, _bitmap_row(64)), 63),
    "max_positions": (_message(2, 0, _bitmap_row(32) * 2), 63),
    "max_bytes": (_message(1, 0, _bitmap_row(64)), 20),
}


@pytest.mark.parametrize("cap", list(CASES))
def test_each_cap_is_refused_naming_it_and_raising_it_accepts(cap):
    data, limit = CASES[cap]
    with pytest.raises(ValueError, match=rf"\({cap}\)"):
        Selection.from_bytes(data, **{cap: limit})
    Selection.from_bytes(data, **{cap: limit + 1 if cap != "max_bytes" else len(data)})


def test_issue_messages_are_refused_at_the_header_by_default():
    """The issue's three messages (67M-bit bitmap, 209,715 empty per-layer rows, 209,715 empty rows)."""
    full = _message(1, 0, _bitmap_row(2**26))
    with pytest.raises(ValueError, match=r"prompt length \(max_tokens\) is 67108864"):
        Selection.from_bytes(full)
    with pytest.raises(ValueError, match=r"layer count \(max_layers\) is 209715"):
        Selection.from_bytes(_message(1, 209_715, EMPTY * 209_715))
    with pytest.raises(ValueError, match=r"row count \(max_rows\) is 209715"):
        Selection.from_bytes(_message(209_715, 0, EMPTY * 209_715))


def test_a_large_legit_bitmap_decodes_exactly():
    sel = Selection.from_bytes(_message(1, 0, _bitmap_row(2**20)))
    assert torch.equal(sel.kept_positions(0), torch.arange(2**20))
    assert sel.kept_tokens(0) == list(range(2**20))


def test_bad_cap_arguments_are_type_checked():
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        Selection.from_bytes(b"KVSL", max_tokens=1.5)
    with pytest.raises(ValueError, match="max_rows must be an int"):
        Selection.from_bytes(b"KVSL", max_rows=0)


@st.composite
def selections(draw):
    rows = draw(st.integers(1, 3))
    sinks = draw(st.integers(0, 3))
    layers = draw(st.sampled_from([0, 1, 3]))
    prompt_len, question_len = [], []
    for _ in range(rows):
        q = draw(st.integers(0, 5))
        prompt_len.append(sinks + q + draw(st.sampled_from([0, 1, 7, 8, 9, 200, 5000])))
        question_len.append(q)
    all_layers = []
    for _ in range(max(layers, 1)):
        per_row = []
        for r in range(rows):
            span = prompt_len[r] - question_len[r] - sinks
            share = draw(st.sampled_from([0.0, 0.01, 0.2, 0.9, 1.0]))
            seed = draw(st.integers(0, 2**16))
            k = int(span * share)
            pos = torch.randperm(span, generator=torch.Generator().manual_seed(seed))[:k].sort().values + sinks
            per_row.append(pos.tolist())
        all_layers.append(per_row)
    return Selection(all_layers[0], prompt_len, question_len, sinks, draw(st.binary(min_size=8, max_size=8)),
                     "h2o", all_layers if layers else None), all_layers


@settings(max_examples=120, deadline=None)
@given(selections())
def test_random_selections_round_trip_with_every_accessor(drawn):
    sel, lists = drawn
    back = Selection.from_bytes(sel.to_bytes())
    assert back == sel
    assert back.positions == lists[0]
    assert back.layer_positions == (lists if sel.per_layer else None)
    for layer in range(max(sel.num_layers, 1)):
        for row in range(sel.rows):
            end = sel.prompt_len[row] - sel.question_len[row]
            expected = list(range(sel.sinks)) + lists[layer][row] + list(range(end, sel.prompt_len[row]))
            assert back.kept_tokens(row, layer) == expected
            assert back.kept_index(row, layer).tolist() == expected
    assert back.to_bytes() == sel.to_bytes()


def test_encoder_matches_the_reference_varints():
    gaps = [0, 127, 128, 16383, 16384, 2**21, 2**28, 2**31 - 2]
    kept = torch.tensor(gaps).add(1).cumsum(0).sub(1).numpy()
    payload = wire.encode_entry(kept, 0, int(kept[-1]) + 1)
    assert payload == b"\1" + b"".join(_varint(g) for g in gaps)
