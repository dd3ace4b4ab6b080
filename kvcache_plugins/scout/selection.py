"""``Selection``: which prompt positions to keep, as a scout hands it to a large model, and its wire format.

A selection names, per prompt row, the kept *context* positions counted from the row's first real token (so the
two models may pad differently). Sinks and the question span are implied (always kept). It also records what is
needed to refuse a mismatched use: each row's prompt and question length, the sink count, the number of layers of
a per-layer selection, and a fingerprint of the tokenizer vocabulary the positions refer to.

The positions live in one ``int32`` array (``flat``, with an offset per (layer, row) entry); the list accessors
(:attr:`Selection.positions`, :attr:`Selection.layer_positions`, :meth:`Selection.kept_tokens`) build Python lists
on each call, the tensor accessors (:meth:`Selection.kept_positions`, :meth:`Selection.kept_index`) do not.

The wire format (version 1) and its bounded decoder are in :mod:`kvcache_plugins.scout.wire`: a receiver's caps on
rows, layers, entries, prompt length and kept positions are checked from the header before anything they size is
allocated (``Selection.from_bytes(data, max_tokens=...)`` and the other ``max_*`` keywords tighten or widen them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._checks import check_int
from . import wire
from .wire import MAGIC, MAX_PROMPT_LEN, MAX_SELECTION_BYTES, MAX_SELECTOR_NAME, VERSION, Caps  # noqa: F401
from .wire import varint as _varint  # noqa: F401  (tests forge messages with it)


def vocabulary_fingerprint(tokenizer: Any) -> bytes:
    """8 bytes identifying a tokenizer's token -> id mapping (equal vocabularies give equal fingerprints)."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
        digest.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return digest.digest()[:8]


def _row_array(kept: Any, row: int) -> np.ndarray:
    """One row's kept positions (a list of ints, or a 1-D integer tensor / array) as ``int64 [k]``."""
    if isinstance(kept, torch.Tensor):
        kept = kept.detach().cpu().numpy()
    if isinstance(kept, np.ndarray):
        if kept.ndim != 1 or kept.dtype.kind not in "iu":
            raise TypeError(f"row {row}: kept positions must be ints (a 1-D integer tensor), got {kept.dtype}")
        return kept.astype(np.int64)
    kept = list(kept)
    if not all(type(p) is int for p in kept):
        raise TypeError(f"row {row}: kept positions must be ints")
    if any(p < 0 or p > MAX_PROMPT_LEN for p in kept):
        raise ValueError(f"row {row}: kept positions must be sorted, unique and inside the context span")
    return np.array(kept, dtype=np.int64)


class Selection:
    """Kept context positions for a batch of prompts.

    Args:
        positions: per row, the kept context positions (sorted, relative to the row's first real token; lists of
            ints or 1-D integer tensors); for a per-layer selection, layer 0's.
        prompt_len: real (non-padding) tokens per row.
        question_len: question tokens at the end of each row.
        sinks: leading tokens always kept.
        fingerprint: vocabulary fingerprint of the tokenizer the positions refer to (8 bytes).
        selector: name of the selector that chose them.
        layer_positions: per-layer positions ``[layer][row]``, or ``None`` for one selection shared by all layers.

    Row ``r``'s context span is ``[sinks, prompt_len[r] - question_len[r])``. Equality compares every field.
    """

    __hash__ = None  # type: ignore[assignment]  (mutable lists inside, like the dataclass it was)

    def __init__(
        self,
        positions: Sequence[Any],
        prompt_len: Sequence[int],
        question_len: Sequence[int],
        sinks: int,
        fingerprint: bytes,
        selector: str = "",
        layer_positions: Sequence[Sequence[Any]] | None = None,
    ) -> None:
        self._init_header(prompt_len, question_len, sinks, fingerprint, selector)
        rows = self.rows
        if len(positions) != rows:
            raise ValueError("positions, prompt_len and question_len need one entry per row (at least one row)")
        layers = [positions] if layer_positions is None else list(layer_positions)
        if layer_positions is not None and not layers:
            raise ValueError("a per-layer selection has at least one layer, and positions are layer 0's")
        arrays = []
        for layer in layers:
            if len(layer) != rows:
                raise ValueError("every layer needs one position list per row")
            for row, kept in enumerate(layer):
                start, end = self.sinks, self.prompt_len[row] - self.question_len[row]
                if end < start:
                    raise ValueError(f"row {row}: sinks and question span exceed the prompt")
                a = _row_array(kept, row)
                if len(a) and (a[0] < start or a[-1] >= end or bool((np.diff(a) <= 0).any())):
                    raise ValueError(f"row {row}: kept positions must be sorted, unique and inside the context span")
                arrays.append(a)
        if layer_positions is not None:
            first = [_row_array(kept, row) for row, kept in enumerate(positions)]
            if any(not np.array_equal(a, b) for a, b in zip(first, arrays[:rows])):
                raise ValueError("a per-layer selection has at least one layer, and positions are layer 0's")
        self._layers = len(layers) if layer_positions is not None else 0
        counts = np.array([len(a) for a in arrays], dtype=np.int64)
        self._offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self._flat = np.concatenate(arrays).astype(np.int32) if arrays else np.empty(0, np.int32)

    def _init_header(self, prompt_len, question_len, sinks, fingerprint, selector) -> None:
        if not isinstance(selector, str) or not selector.isascii() or len(selector) > MAX_SELECTOR_NAME:
            raise ValueError(
                f"selector must be an ASCII name of at most {MAX_SELECTOR_NAME} characters, got {selector!r}"
            )
        if not isinstance(fingerprint, bytes) or len(fingerprint) != 8:
            raise ValueError("the vocabulary fingerprint is 8 bytes")
        self.selector, self.fingerprint = selector, fingerprint
        self.sinks = check_int("sinks", sinks, 0, MAX_PROMPT_LEN)
        self.prompt_len = [check_int(f"prompt_len[{i}]", p, 0, MAX_PROMPT_LEN) for i, p in enumerate(prompt_len)]
        self.question_len = [check_int(f"question_len[{i}]", q, 0, MAX_PROMPT_LEN) for i, q in enumerate(question_len)]
        if not self.prompt_len or len(self.question_len) != len(self.prompt_len):
            raise ValueError("positions, prompt_len and question_len need one entry per row (at least one row)")

    # ------------------------------------------------------------------ shape
    @property
    def rows(self) -> int:
        return len(self.prompt_len)

    @property
    def per_layer(self) -> bool:
        return self._layers > 0

    @property
    def num_layers(self) -> int:
        return self._layers

    def context_len(self, row: int) -> int:
        return self.prompt_len[row] - self.question_len[row] - self.sinks

    # ------------------------------------------------------------------ positions
    def _entry(self, row: int, layer: int) -> np.ndarray:
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} out of range for a selection of {self.rows} rows")
        if not 0 <= layer < max(self._layers, 1):
            raise IndexError(f"layer {layer} out of range for a selection of {max(self._layers, 1)} layers")
        e = (layer if self._layers else 0) * self.rows + row
        return self._flat[self._offsets[e] : self._offsets[e + 1]]

    def kept_positions(self, row: int, layer: int = 0) -> torch.Tensor:
        """``LongTensor [k]``: the kept context positions of a row (of ``layer`` for a per-layer selection)."""
        return torch.from_numpy(self._entry(row, layer).astype(np.int64))

    def kept_index(self, row: int, layer: int = 0) -> torch.Tensor:
        """``LongTensor [sinks + k + question_len]``: every kept position of a row, as :meth:`kept_tokens`."""
        end = self.prompt_len[row] - self.question_len[row]
        parts = (torch.arange(self.sinks), self.kept_positions(row, layer), torch.arange(end, self.prompt_len[row]))
        return torch.cat(parts)

    @property
    def positions(self) -> list[list[int]]:
        """Per row, the kept context positions (layer 0's for a per-layer selection); a new list on each call."""
        return [self._entry(row, 0).tolist() for row in range(self.rows)]

    @property
    def layer_positions(self) -> list[list[list[int]]] | None:
        """``[layer][row]`` kept positions of a per-layer selection (a new list on each call), else ``None``."""
        if not self._layers:
            return None
        return [[self._entry(row, layer).tolist() for row in range(self.rows)] for layer in range(self._layers)]

    def kept_tokens(self, row: int, layer: int = 0) -> list[int]:
        """Every kept position of a row (sinks, chosen context, question), relative to its first real token."""
        return self.kept_index(row, layer).tolist()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        return (
            (self.prompt_len, self.question_len, self.sinks, self.fingerprint, self.selector, self._layers)
            == (other.prompt_len, other.question_len, other.sinks, other.fingerprint, other.selector, other._layers)
            and np.array_equal(self._offsets, other._offsets)
            and np.array_equal(self._flat, other._flat)
        )

    def __repr__(self) -> str:
        layers = f", layers={self._layers}" if self._layers else ""
        return (
            f"Selection(rows={self.rows}{layers}, kept={len(self._flat)}, prompt_len={self.prompt_len}, "
            f"question_len={self.question_len}, sinks={self.sinks}, selector={self.selector!r})"
        )

    # ------------------------------------------------------------------ wire format
    def to_bytes(self) -> bytes:
        """The compact, versioned wire format (see :mod:`kvcache_plugins.scout.wire`)."""
        name = self.selector.encode("ascii")
        out = bytearray(MAGIC)
        out += bytes([VERSION, 1 if self.per_layer else 0])
        out += _varint(self.rows) + _varint(self._layers) + _varint(self.sinks) + self.fingerprint
        out += _varint(len(name)) + name
        for layer in range(max(self._layers, 1)):
            for row in range(self.rows):
                kept = self._entry(row, layer)
                out += _varint(self.prompt_len[row]) + _varint(self.question_len[row]) + _varint(len(kept))
                out += wire.encode_entry(kept, self.sinks, self.context_len(row))
        out += wire.checksum(bytes(out))
        return bytes(out)

    @classmethod
    def from_bytes(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        max_tokens: int = wire.MAX_TOKENS,
        max_rows: int = wire.MAX_ROWS,
        max_layers: int = wire.MAX_LAYERS,
        max_entries: int = wire.MAX_ENTRIES,
        max_positions: int = wire.MAX_POSITIONS,
        max_bytes: int = MAX_SELECTION_BYTES,
    ) -> Selection:
        """Parse :meth:`to_bytes` output; ``ValueError`` for truncated, corrupted, forged or foreign bytes, and for
        a message beyond the receiver's caps (each named in the error, checked from the header before the
        allocation it sizes): prompts of more than ``max_tokens`` tokens, more than ``max_rows`` rows,
        ``max_layers`` layers, ``max_entries`` (layer, row) entries, ``max_positions`` kept positions in all, or
        ``max_bytes`` bytes. Defaults: :class:`~kvcache_plugins.scout.wire.Caps`."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Selection.from_bytes takes bytes, got {type(data).__name__}")
        caps = Caps(
            max_rows=check_int("max_rows", max_rows, 1),
            max_layers=check_int("max_layers", max_layers, 0),
            max_entries=check_int("max_entries", max_entries, 1),
            max_tokens=check_int("max_tokens", max_tokens, 0, MAX_PROMPT_LEN),
            max_positions=check_int("max_positions", max_positions, 0),
            max_bytes=check_int("max_bytes", max_bytes, 0),
        )
        d = wire.decode(data, caps)
        out = cls.__new__(cls)
        out._init_header(d.prompt_len, d.question_len, d.sinks, d.fingerprint, d.selector)
        out._layers, out._offsets, out._flat = d.layers, d.offsets, d.flat
        return out

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
    layers = max(a.num_layers, 1) if a.num_layers == b.num_layers else 1
    scores = []
    for layer in range(layers):
        for row in range(a.rows):
            pa, pb = a._entry(row, layer), b._entry(row, layer)
            scores.append(len(np.intersect1d(pa, pb, assume_unique=True)) / len(pa) if len(pa) else 1.0)
    return sum(scores) / len(scores)


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
