"""The selection wire format (version 1): encoding and a bounded, vectorised decoder.

Layout, little-endian, no pickle::

    b"KVSL" | version u8 | flags u8 (bit 0: per layer) | varint rows | varint layers | varint sinks
    | 8-byte vocabulary fingerprint | varint len + selector name (ASCII)
    | for every (layer, row):  varint prompt_len | varint question_len | varint kept | u8 encoding | payload
    | CRC-32 of everything before (u32)

``encoding`` 0 is a bitmap over the context span (``ceil(context / 8)`` bytes, bit ``i`` of byte ``i // 8`` counted
from the least significant bit is context position ``sinks + i``), 1 is delta-varints of the sorted kept positions
(``p_0 - sinks``, then ``p_j - p_{j-1} - 1``); each row uses whichever is smaller.

The bytes are untrusted (the CRC-32 catches damage, not forgery). What a receiver accepts is capped
(:class:`Caps`): the message length, the rows, the layers, the (layer, row) entries, the prompt length and the
kept positions in all. Every cap is checked from a header field before anything it sizes is allocated, and every
count against the bytes that remain (an entry takes at least 4 bytes, a delta position at least one, a bitmap
``ceil(context / 8)``). Payloads decode with numpy, a bounded slice at a time, into one ``int32`` array: with the
default caps any message parses or is refused in well under a second and under 200 MB (measured by
``python -m kvcache_plugins.bench.wire_cost``).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

MAGIC = b"KVSL"
VERSION = 1
BITMAP, DELTA = 0, 1
#: largest message accepted (a 1M-token prompt's bitmap is 128 kB per row and layer)
MAX_SELECTION_BYTES = 64 << 20
#: prompt lengths (and so positions) must be below this: positions are stored as int32
MAX_PROMPT_LEN = 2**31 - 1
MAX_SELECTOR_NAME = 64
#: default receiver caps (see :class:`Caps`)
MAX_ROWS = 4096
MAX_LAYERS = 1024
MAX_ENTRIES = 2**17
MAX_TOKENS = 2**23
MAX_POSITIONS = 2**25
#: fewest bytes one (layer, row) entry takes: three varints and the encoding byte
MIN_ENTRY_BYTES = 4
#: payloads of at most this many bytes decode in Python (a numpy call costs more than that)
_SMALL = 24
#: bytes of a payload decoded per numpy step (bounds the temporaries: 8 bits and 8 index bytes per bitmap bit)
_SLICE = 1 << 17
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


@dataclass(frozen=True)
class Caps:
    """What a receiver accepts; every field is checked from the header, before the allocation it sizes.

    Defaults: :data:`MAX_ROWS` rows (batch prompts), :data:`MAX_LAYERS` layers of a per-layer selection,
    :data:`MAX_ENTRIES` (layer, row) entries in all, prompts of at most :data:`MAX_TOKENS` tokens (8M; a receiver
    that knows its context length passes ``max_tokens``), :data:`MAX_POSITIONS` kept positions in all (32M, 128 MB
    as int32), messages of at most :data:`MAX_SELECTION_BYTES` bytes.
    """

    max_rows: int = MAX_ROWS
    max_layers: int = MAX_LAYERS
    max_entries: int = MAX_ENTRIES
    max_tokens: int = MAX_TOKENS
    max_positions: int = MAX_POSITIONS
    max_bytes: int = MAX_SELECTION_BYTES


@dataclass
class Decoded:
    """A parsed message: header fields, per-row lengths, and every entry's kept positions.

    ``flat`` ``int32 [N]`` holds the kept context positions of entry ``e = layer * rows + row`` at
    ``flat[offsets[e] : offsets[e + 1]]`` (``offsets`` ``int64 [entries + 1]``).
    """

    rows: int
    layers: int
    sinks: int
    fingerprint: bytes
    selector: str
    prompt_len: list[int]
    question_len: list[int]
    flat: np.ndarray
    offsets: np.ndarray


def varint(value: int) -> bytes:
    """Unsigned LEB128."""
    if value < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_entry(kept: np.ndarray, start: int, span: int) -> bytes:
    """Encoding byte and payload of one row's kept positions ``kept`` (sorted, in ``[start, start + span)``)."""
    rel = kept.astype(np.int64) - start
    gaps = np.diff(rel, prepend=-1) - 1
    sizes = np.ones(len(gaps), np.int64)
    for k in range(1, 5):
        sizes += gaps >= 1 << (7 * k)
    bitmap_bytes = (span + 7) // 8
    if int(sizes.sum()) < bitmap_bytes:
        out = np.empty(int(sizes.sum()), np.uint8)
        first = np.cumsum(sizes) - sizes
        for k in range(5):
            has = sizes > k
            more = (sizes > k + 1).astype(np.int64) << 7
            out[first[has] + k] = (((gaps[has] >> (7 * k)) & 0x7F) | more[has]).astype(np.uint8)
        return bytes([DELTA]) + out.tobytes()
    bits = np.zeros(bitmap_bytes * 8, np.uint8)
    bits[rel] = 1
    return bytes([BITMAP]) + np.packbits(bits, bitorder="little").tobytes()


def checksum(body: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(body))


class _Reader:
    """Sequential reads of the message body ``data[pos:end]`` (``end`` excludes the CRC)."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise ValueError("selection bytes are truncated")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ValueError("selection bytes are truncated")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self, cap: int, what: str) -> int:
        """An unsigned LEB128 varint of at most 5 bytes, at most ``cap`` (``what`` names the cap in the error)."""
        data, pos, end = self.data, self.pos, self.end
        if pos < end and data[pos] < 0x80:  # the common one-byte case
            value, self.pos = data[pos], pos + 1
        else:
            value = shift = 0
            while True:
                if pos >= end:
                    raise ValueError("selection bytes are truncated")
                byte = data[pos]
                pos += 1
                value |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 28:
                    raise ValueError("malformed varint in selection bytes (more than 5 bytes)")
            self.pos = pos
        if value > cap:
            raise ValueError(f"the selection's {what} is {value}, above the cap {cap}")
        return value


def _delta_end(arr: np.ndarray, data: bytes, pos: int, end: int, kept: int) -> int:
    """Offset just past the ``kept``-th varint starting at ``pos`` (a varint ends at a byte below 0x80)."""
    if kept <= _SMALL:
        found = 0
        while found < kept:
            if pos >= end:
                raise ValueError("selection bytes are truncated")
            found += data[pos] < 0x80
            pos += 1
        return pos
    found = 0
    while True:
        if pos >= end:
            raise ValueError("selection bytes are truncated")
        stop = min(end, pos + _SLICE)
        ends = arr[pos:stop] < 0x80
        here = int(np.count_nonzero(ends))
        if found + here >= kept:
            return pos + int(np.flatnonzero(ends)[kept - found - 1]) + 1
        found, pos = found + here, stop


def _decode_delta(arr: np.ndarray, off: int, stop: int, start: int, out: np.ndarray) -> None:
    """Delta varints ``arr[off:stop]`` (exactly ``len(out)`` of them) -> absolute positions in ``out``, a slice of
    at most :data:`_SLICE` bytes at a time (cut after a varint's last byte)."""
    written, prev = 0, start - 1
    while off < stop:
        raw = arr[off : min(stop, off + _SLICE)]
        ends = np.flatnonzero(raw < 0x80)  # the last byte of each varint
        if not len(ends):
            raise ValueError("malformed varint in selection bytes (more than 5 bytes)")
        raw = raw[: int(ends[-1]) + 1]
        first = np.concatenate(([0], ends[:-1] + 1))
        if int((ends - first).max()) > 4:
            raise ValueError("malformed varint in selection bytes (more than 5 bytes)")
        shift = 7 * (np.arange(len(raw)) - np.repeat(first, ends - first + 1))
        gaps = np.add.reduceat((raw & 0x7F).astype(np.int64) << shift, first)
        positions = np.cumsum(gaps + 1) + prev
        prev = int(positions[-1])
        if prev > MAX_PROMPT_LEN:
            raise ValueError("selection row does not decode to its declared size")
        out[written : written + len(positions)] = positions
        written += len(positions)
        off += len(raw)


def _decode_bitmap(arr: np.ndarray, off: int, nbytes: int, start: int, out: np.ndarray) -> int:
    """Set bits of ``arr[off : off + nbytes]`` -> ``start + i`` into ``out`` (at most ``len(out)``); returns the
    number of set bits and raises if there are more than ``len(out)``."""
    written = 0
    for s in range(0, nbytes, _SLICE):
        chunk = arr[off + s : off + min(nbytes, s + _SLICE)]
        count = int(_POPCOUNT[chunk].sum(dtype=np.int64))
        if written + count > len(out):
            raise ValueError("selection row does not decode to its declared size")
        if count:
            out[written : written + count] = np.flatnonzero(np.unpackbits(chunk, bitorder="little")) + (start + 8 * s)
        written += count
    return written


def decode(data: bytes | bytearray | memoryview, caps: Caps) -> Decoded:
    """Parse and check a message (see the module docstring); ``ValueError`` names what is wrong or which cap."""
    if len(data) > caps.max_bytes:
        raise ValueError(f"selection bytes exceed {caps.max_bytes} bytes (max_bytes): not a selection")
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) < len(MAGIC) + 2 + 4 or data[:4] != MAGIC:
        raise ValueError("not a kvcache_plugins selection (bad magic bytes)")
    if data[4] != VERSION:
        raise ValueError(f"unsupported selection format version {data[4]}; this library reads version {VERSION}")
    end = len(data) - 4
    if zlib.crc32(memoryview(data)[:end]) != struct.unpack("<I", data[end:])[0]:
        raise ValueError("selection bytes are corrupted or truncated (checksum mismatch)")
    if data[5] not in (0, 1):
        raise ValueError(f"unknown selection flags {data[5]}")
    per_layer = data[5] == 1
    reader = _Reader(data, 6, end)
    rows = reader.varint(caps.max_rows, "row count (max_rows)")
    layers = reader.varint(caps.max_layers, "layer count (max_layers)")
    sinks = reader.varint(caps.max_tokens, "sink count (max_tokens)")
    fingerprint = reader.take(8)
    name = reader.take(reader.varint(MAX_SELECTOR_NAME, "selector name length"))
    if not name.isascii():
        raise ValueError("the selector name in the selection bytes is not ASCII")
    if per_layer != (layers > 0) or rows == 0:
        raise ValueError("selection header is inconsistent (no rows, or per-layer flag vs layer count)")
    entries = rows * max(layers, 1)
    if entries > caps.max_entries:
        raise ValueError(f"the selection's {rows} rows x {layers} layers exceed the cap of {caps.max_entries} "
                         "(layer, row) entries (max_entries)")
    if entries * MIN_ENTRY_BYTES > reader.remaining:
        raise ValueError(
            f"selection header claims {rows} rows x {max(layers, 1)} layers, more than its {reader.remaining} bytes hold"
        )
    prompt_len: list[int] = []
    question_len: list[int] = []
    # pass 1: the entry headers, each payload's extent (nothing sized by the message is allocated here)
    spans, kinds, offs, stops, kept_counts = [], [], [], [], []
    total = 0
    arr = np.frombuffer(data, np.uint8)
    for e in range(entries):
        p_len = reader.varint(caps.max_tokens, "prompt length (max_tokens)")
        q_len = reader.varint(caps.max_tokens, "question length (max_tokens)")
        if e < rows:
            prompt_len.append(p_len)
            question_len.append(q_len)
        elif p_len != prompt_len[e % rows] or q_len != question_len[e % rows]:
            raise ValueError("selection rows disagree between layers")
        span = p_len - q_len - sinks
        if span < 0:
            raise ValueError("selection row is inconsistent (sinks and question span exceed the prompt)")
        kept = reader.varint(span, "kept count (at most the context span)")
        total += kept
        if total > caps.max_positions:
            raise ValueError(f"the selection keeps more than {caps.max_positions} positions in all (max_positions)")
        encoding = reader.byte()
        off = reader.pos
        if encoding == BITMAP:
            reader.take((span + 7) // 8)
        elif encoding == DELTA:
            if kept > reader.remaining:
                raise ValueError("selection row claims more kept positions than its bytes hold")
            reader.pos = _delta_end(arr, data, off, end, kept)
        else:
            raise ValueError(f"unknown row encoding {encoding}")
        spans.append(span)
        kinds.append(encoding)
        offs.append(off)
        stops.append(reader.pos)
        kept_counts.append(kept)
    if reader.pos != end:
        raise ValueError("trailing bytes after the selection")
    # pass 2: decode every payload into one int32 array
    offsets = np.zeros(entries + 1, np.int64)
    np.cumsum(kept_counts, out=offsets[1:])
    flat = np.empty(total, np.int32)
    for e in range(entries):
        kept, off, stop, span, lo = kept_counts[e], offs[e], stops[e], spans[e], int(offsets[e])
        out = flat[lo : lo + kept]
        if kinds[e] == DELTA:
            if not kept:
                continue
            if stop - off <= _SMALL:
                positions, prev = [], sinks - 1
                sub = _Reader(data, off, stop)
                for _ in range(kept):
                    prev += sub.varint(MAX_PROMPT_LEN, "position delta") + 1
                    positions.append(prev)
                out[:] = positions
            else:
                _decode_delta(arr, off, stop, sinks, out)
            last = int(out[-1])
        elif stop - off <= _SMALL:
            bits = int.from_bytes(data[off:stop], "little")
            if bits.bit_count() != kept:
                raise ValueError("selection row does not decode to its declared size")
            positions = []
            while bits:
                low = bits & -bits
                positions.append(sinks + low.bit_length() - 1)
                bits ^= low
            out[:] = positions
            last = positions[-1] if positions else -1
        else:
            if _decode_bitmap(arr, off, stop - off, sinks, out) != kept:
                raise ValueError("selection row does not decode to its declared size")
            last = int(out[-1]) if kept else -1
        if last >= sinks + span:
            raise ValueError("selection row does not decode to its declared size")
    return Decoded(rows, layers, sinks, fingerprint, name.decode("ascii"), prompt_len, question_len, flat, offsets)
