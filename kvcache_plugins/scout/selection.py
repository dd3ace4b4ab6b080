"""``Selection``: which prompt positions to keep, as a scout hands it to a large model, and its wire format.

A selection names, per prompt row, the kept *context* positions counted from the row's first real token (so the
two models may pad differently). Sinks and the question span are implied (always kept). It also records what is
needed to refuse a mismatched use: each row's prompt and question length, the sink count, the number of layers of
a per-layer selection, and a fingerprint of the tokenizer vocabulary the positions refer to.

Wire format (version 1), little-endian, no pickle::

    b"KVSL" | version u8 | flags u8 (bit 0: per layer) | varint rows | varint layers | varint sinks
    | 8-byte vocabulary fingerprint | varint len + selector name (ASCII)
    | for every (layer, row):  varint prompt_len | varint question_len | varint kept | u8 encoding | payload
    | CRC-32 of everything before (u32)

``encoding`` 0 is a bitmap over the context span (``ceil(context / 8)`` bytes), 1 is delta-varints of the sorted
kept positions; each row uses whichever is smaller.

The bytes are untrusted (the CRC-32 catches damage, not forgery): every count is checked against the bytes that
remain before anything is allocated (a (layer, row) entry takes at least 4 bytes, a kept position of a delta row
at least one, a bitmap ``ceil(context / 8)``), and against caps (:data:`MAX_SELECTION_BYTES`, prompt lengths below
:data:`MAX_PROMPT_LEN`, :data:`MAX_SELECTOR_NAME` ASCII characters), so parsing time and memory are linear in the
message length.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .._checks import check_int

MAGIC = b"KVSL"
VERSION = 1
_BITMAP, _DELTA = 0, 1
#: largest message accepted (a 1M-token prompt's bitmap is 128 kB per row and layer)
MAX_SELECTION_BYTES = 64 << 20
#: prompt lengths (and so positions) must be below this: positions are stored as int32 in the caches
MAX_PROMPT_LEN = 2**31 - 1
MAX_SELECTOR_NAME = 64
#: fewest bytes one (layer, row) entry takes: three varints and the encoding byte
_MIN_ROW_BYTES = 4


def vocabulary_fingerprint(tokenizer: Any) -> bytes:
    """8 bytes identifying a tokenizer's token -> id mapping (equal vocabularies give equal fingerprints)."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        digest.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return digest.digest()[:8]


@dataclass
class Selection:
    """Kept context positions for a batch of prompts.

    Attributes:
        positions: per row, the kept context positions (sorted, relative to the row's first real token); for a
            per-layer selection, ``layer_positions[l][row]`` holds them and ``positions`` is layer 0's.
        prompt_len: real (non-padding) tokens per row.
        question_len: question tokens at the end of each row.
        sinks: leading tokens always kept.
        fingerprint: vocabulary fingerprint of the tokenizer the positions refer to (8 bytes).
        selector: name of the selector that chose them.
        layer_positions: per-layer positions, or ``None`` for one selection shared by all layers.
    """

    positions: list[list[int]]
    prompt_len: list[int]
    question_len: list[int]
    sinks: int
    fingerprint: bytes
    selector: str = ""
    layer_positions: list[list[list[int]]] | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.selector, str) or not self.selector.isascii() or len(self.selector) > MAX_SELECTOR_NAME:
            raise ValueError(
                f"selector must be an ASCII name of at most {MAX_SELECTOR_NAME} characters, got {self.selector!r}"
            )
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != 8:
            raise ValueError("the vocabulary fingerprint is 8 bytes")
        self.sinks = check_int("sinks", self.sinks, 0, MAX_PROMPT_LEN)
        self.prompt_len = [check_int(f"prompt_len[{i}]", p, 0, MAX_PROMPT_LEN) for i, p in enumerate(self.prompt_len)]
        self.question_len = [
            check_int(f"question_len[{i}]", q, 0, MAX_PROMPT_LEN) for i, q in enumerate(self.question_len)
        ]
        rows = len(self.prompt_len)
        if rows == 0 or len(self.question_len) != rows or len(self.positions) != rows:
            raise ValueError("positions, prompt_len and question_len need one entry per row (at least one row)")
        if self.layer_positions is not None and (not self.layer_positions or self.layer_positions[0] != self.positions):
            raise ValueError("a per-layer selection has at least one layer, and positions are layer 0's")
        for layer in self.layer_positions or [self.positions]:
            if len(layer) != rows:
                raise ValueError("every layer needs one position list per row")
            for row, kept in enumerate(layer):
                start, end = self.sinks, self.prompt_len[row] - self.question_len[row]
                if end < start:
                    raise ValueError(f"row {row}: sinks and question span exceed the prompt")
                if not all(type(p) is int for p in kept):
                    raise TypeError(f"row {row}: kept positions must be ints")
                if any(p < start or p >= end for p in kept) or any(a >= b for a, b in zip(kept, kept[1:])):
                    raise ValueError(f"row {row}: kept positions must be sorted, unique and inside the context span")

    @property
    def rows(self) -> int:
        return len(self.prompt_len)

    @property
    def per_layer(self) -> bool:
        return self.layer_positions is not None

    @property
    def num_layers(self) -> int:
        return len(self.layer_positions) if self.layer_positions is not None else 0

    def context_len(self, row: int) -> int:
        return self.prompt_len[row] - self.question_len[row] - self.sinks

    def kept_tokens(self, row: int, layer: int = 0) -> list[int]:
        """Every kept position of a row (sinks, chosen context, question), relative to its first real token."""
        kept = self.layer_positions[layer][row] if self.layer_positions is not None else self.positions[row]
        return list(range(self.sinks)) + list(kept) + list(range(self.prompt_len[row] - self.question_len[row], self.prompt_len[row]))

    # ------------------------------------------------------------------ wire format
    def to_bytes(self) -> bytes:
        """The compact, versioned wire format (see the module docstring)."""
        out = bytearray(MAGIC)
        out += bytes([VERSION, 1 if self.per_layer else 0])
        name = self.selector.encode("ascii")
        out += _varint(self.rows) + _varint(self.num_layers) + _varint(self.sinks) + self.fingerprint
        out += _varint(len(name)) + name
        for layer in self.layer_positions or [self.positions]:
            for row, kept in enumerate(layer):
                out += _varint(self.prompt_len[row]) + _varint(self.question_len[row]) + _varint(len(kept))
                start, span = self.sinks, self.context_len(row)
                bitmap = bytearray((span + 7) // 8)
                for p in kept:
                    bitmap[(p - start) >> 3] |= 1 << ((p - start) & 7)
                deltas = bytearray()
                prev = start - 1
                for p in kept:
                    deltas += _varint(p - prev - 1)
                    prev = p
                if len(deltas) < len(bitmap):
                    out += bytes([_DELTA]) + deltas
                else:
                    out += bytes([_BITMAP]) + bitmap
        out += struct.pack("<I", zlib.crc32(out))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Selection:
        """Parse :meth:`to_bytes` output; raises ``ValueError`` for truncated, corrupted, forged or foreign bytes
        (time and memory linear in ``len(data)``, see the module docstring)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Selection.from_bytes takes bytes, got {type(data).__name__}")
        if len(data) > MAX_SELECTION_BYTES:
            raise ValueError(f"selection bytes exceed {MAX_SELECTION_BYTES} bytes: not a selection")
        data = bytes(data)
        if len(data) < len(MAGIC) + 2 + 4 or data[:4] != MAGIC:
            raise ValueError("not a kvcache_plugins selection (bad magic bytes)")
        if data[4] != VERSION:
            raise ValueError(f"unsupported selection format version {data[4]}; this library reads version {VERSION}")
        body, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
        if zlib.crc32(body) != crc:
            raise ValueError("selection bytes are corrupted or truncated (checksum mismatch)")
        if body[5] not in (0, 1):
            raise ValueError(f"unknown selection flags {body[5]}")
        per_layer = body[5] == 1
        reader = _Reader(body, 6)
        rows, layers = reader.varint(), reader.varint()
        sinks = reader.varint(MAX_PROMPT_LEN)
        fingerprint = reader.take(8)
        name = reader.take(reader.varint(MAX_SELECTOR_NAME))
        if not name.isascii():
            raise ValueError("the selector name in the selection bytes is not ASCII")
        if per_layer != (layers > 0) or rows == 0:
            raise ValueError("selection header is inconsistent (no rows, or per-layer flag vs layer count)")
        if rows * max(layers, 1) * _MIN_ROW_BYTES > reader.remaining:
            raise ValueError(
                f"selection header claims {rows} rows x {max(layers, 1)} layers, more than its {reader.remaining} bytes hold"
            )
        all_layers: list[list[list[int]]] = []
        prompt_len: list[int] = []
        question_len: list[int] = []
        for layer in range(max(layers, 1)):
            this_layer = []
            for row in range(rows):
                p_len, q_len, kept = reader.varint(MAX_PROMPT_LEN), reader.varint(MAX_PROMPT_LEN), reader.varint()
                if layer == 0:
                    prompt_len.append(p_len)
                    question_len.append(q_len)
                elif (p_len, q_len) != (prompt_len[row], question_len[row]):
                    raise ValueError("selection rows disagree between layers")
                start, span = sinks, p_len - q_len - sinks
                if span < 0 or kept > span:
                    raise ValueError("selection row is inconsistent (more kept tokens than context)")
                encoding = reader.take(1)[0]
                if encoding == _BITMAP:
                    bitmap = reader.take((span + 7) // 8)  # checked against the remaining bytes first
                    positions = [start + i for i in range(span) if bitmap[i >> 3] >> (i & 7) & 1]
                elif encoding == _DELTA:
                    if kept > reader.remaining:
                        raise ValueError("selection row claims more kept positions than its bytes hold")
                    positions, prev = [], start - 1
                    for _ in range(kept):
                        prev = prev + reader.varint(MAX_PROMPT_LEN) + 1
                        positions.append(prev)
                else:
                    raise ValueError(f"unknown row encoding {encoding}")
                if len(positions) != kept or (positions and positions[-1] >= start + span):
                    raise ValueError("selection row does not decode to its declared size")
                this_layer.append(positions)
            all_layers.append(this_layer)
        if reader.pos != len(body):
            raise ValueError("trailing bytes after the selection")
        return cls(
            positions=all_layers[0], prompt_len=prompt_len, question_len=question_len, sinks=sinks,
            fingerprint=fingerprint, selector=name.decode("ascii"), layer_positions=all_layers if per_layer else None,
        )

    @property
    def nbytes(self) -> int:
        """Size of the wire format in bytes."""
        return len(self.to_bytes())


def kv_cache_bytes(config: Any, tokens: int, bytes_per_element: int = 2, batch: int = 1) -> int:
    """Bytes of a 16-bit KV cache of ``tokens`` tokens for a model config: ``2 * L * H_kv * D * T * 2``."""
    cfg = config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * tokens * bytes_per_element * batch


def selection_overlap(a: Selection, b: Selection) -> float:
    """The lab's agreement metric: mean over rows (and layers) of ``|A & B| / |A|`` for kept context positions."""
    if a.prompt_len != b.prompt_len or a.question_len != b.question_len or a.sinks != b.sinks:
        raise ValueError("selections describe different prompts (lengths, question spans or sinks differ)")
    layers_a = a.layer_positions or [a.positions]
    layers_b = b.layer_positions or [b.positions]
    if len(layers_a) != len(layers_b):
        layers_a, layers_b = [a.positions], [b.positions]
    scores = []
    for la, lb in zip(layers_a, layers_b):
        for pa, pb in zip(la, lb):
            scores.append(len(set(pa) & set(pb)) / len(pa) if pa else 1.0)
    return sum(scores) / len(scores)


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varints are unsigned")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.remaining:
            raise ValueError("selection bytes are truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self, cap: int = MAX_SELECTION_BYTES * 8) -> int:
        """An unsigned LEB128 varint, at most ``cap`` (counts never exceed the bits of the message)."""
        value = shift = 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if value > cap:
                    raise ValueError(f"a count in the selection bytes is {value}, above its limit {cap}")
                return value
            shift += 7
            if shift > 35:
                raise ValueError("malformed varint in selection bytes")


def map_selection(
    selection: Selection,
    prompts: Sequence[str],
    source_tokenizer: Any,
    target_tokenizer: Any,
    target_question_len: Sequence[int],
    target_sinks: int | None = None,
) -> Selection:
    """Carry a selection to another tokenizer through character offsets.

    Rule: a target context token is kept when its character span overlaps the character span of any kept source
    token. Both tokenizers must be fast tokenizers (offset mappings) and must tokenize ``prompts`` without special
    tokens in between; special tokens have no characters and are never kept unless they are sinks or question.
    Limits: a target token straddling a kept and an evicted source token is kept (the map errs towards keeping),
    so the target may keep slightly more than the source's share; whitespace-only tokens follow their neighbours'
    character spans as the tokenizers report them.
    """
    if selection.per_layer:
        raise ValueError("map_selection carries global selections; per-layer positions have no meaning across models")
    sinks = selection.sinks if target_sinks is None else target_sinks
    new_positions, prompt_len = [], []
    for row, text in enumerate(prompts):
        src = source_tokenizer(text, return_offsets_mapping=True)
        tgt = target_tokenizer(text, return_offsets_mapping=True)
        if len(src["input_ids"]) != selection.prompt_len[row]:
            raise ValueError(f"row {row}: the source tokenizer gives {len(src['input_ids'])} tokens, the selection "
                             f"was made for {selection.prompt_len[row]}")
        kept_chars = [src["offset_mapping"][p] for p in selection.positions[row]]
        n = len(tgt["input_ids"])
        start, end = sinks, n - target_question_len[row]
        kept = []
        for p in range(start, end):
            a, b = tgt["offset_mapping"][p]
            if b > a and any(a < kb and ka < b for ka, kb in kept_chars):
                kept.append(p)
        new_positions.append(kept)
        prompt_len.append(n)
    return Selection(
        positions=new_positions, prompt_len=prompt_len, question_len=list(target_question_len), sinks=sinks,
        fingerprint=vocabulary_fingerprint(target_tokenizer), selector=selection.selector,
    )
