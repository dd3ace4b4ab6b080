"""Save, load and send caches: encode a document once, answer questions elsewhere.

The container knows no concrete cache or layer class: each registers its state under a kind name (the contract is
in :mod:`kvcache_plugins.persist.state`). A saved cache is untrusted input; this module checks it in this order:

1. **Integrity.** The file is a safetensors file whose header begins with a fixed prefix that carries the format
   name, the format version and a SHA-256 digest::

       <u64 header length> {"__metadata__":{"format":"kvcache_plugins.cache","version":"2","sha256":"<64 hex>",
                            "kvcache_plugins":"<JSON>"}, <tensor entries>} <tensor bytes>

   The digest covers every byte of the file except the 64 hex characters of the digest itself: the header
   (tensor names, dtypes, shapes, offsets), the JSON metadata and the tensor bytes, up to the last byte (so
   truncation and appended bytes fail too). It is verified before anything else in the file is interpreted.
   A digest is not a signature: anyone can recompute it, so it catches damage, and step 3 catches forgery.
2. **Model.** The saved model fingerprint (architecture, layer count, KV heads, head_dim, RoPE parameters) must
   equal the model's.
3. **Validation.** Every field's type and range and every cross-field fact, through
   :class:`~kvcache_plugins.persist.state.StateReader`: the cache's arguments, each layer's kind (it must be the
   kind the cache builds for that layer), dtypes, tensor shapes against the spec, the model and the lengths,
   positions inside the logical length, and that every tensor of the file is used exactly once.

Damaged, foreign or forged input raises ``ValueError`` and nothing else, before any tensor reaches the model.
``to_bytes()`` is the cache's byte accounting plus a small header (the JSON); continuing from a loaded cache gives
exactly the tokens and logits that continuing the original would have. No pickle anywhere.

**zstd.** ``cache.to_bytes(compress="zstd")`` wraps the container above in exactly one zstd frame
(:mod:`kvcache_plugins.persist.coding`). Loading recognises the frame by its magic number (a container starts with
its header length, never with it) and decompresses it before step 1: the frame must declare its content size,
at most ``coding.MAX_RATIO`` times the input, output is bounded by that size and bytes after the frame are
refused, all with ``ValueError``. The digest inside covers every byte of the decompressed container, so an edit of
the frame either fails to decompress, fails the digest, or decodes to the very same container.

Format versions: this library writes and reads version 2. Version 1 files (written before the digest covered the
metadata and header) are refused with a ``ValueError`` that says to save the cache again from its source.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from transformers import PreTrainedModel

from .._model import attention_modules, head_dim, text_config
from .coding import decompress, is_compressed
from .state import DTYPES, ModelFacts, StateReader, cache_class, cache_kind, layer_functions, layer_kind

FORMAT = "kvcache_plugins.cache"
VERSION = 2
_PREFIX = b'{"__metadata__":{"format":"' + FORMAT.encode() + b'","version":"'
_DIGEST_AT = b'","sha256":"'
_NAMES = {v: k for k, v in DTYPES.items()}
#: largest header (JSON) accepted; a cache's header is a few kB per layer
MAX_HEADER_BYTES = 64 << 20


def model_fingerprint(model_or_config: Any) -> dict[str, Any]:
    """What a cache's tensors depend on: architecture, layer count, KV heads, head_dim and RoPE parameters."""
    cfg = text_config(model_or_config)
    rope = {}
    for name in ("rope_theta", "partial_rotary_factor", "rotary_pct", "rope_scaling", "rope_parameters", "rotary_emb_base"):
        value = getattr(cfg, name, None)
        if value is not None:
            rope[name] = value
    return {
        "model_type": cfg.model_type,
        "num_layers": int(cfg.num_hidden_layers),
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        "head_dim": int(head_dim(cfg)),
        "hidden_size": int(cfg.hidden_size),
        "rope": json.loads(json.dumps(rope, sort_keys=True, default=str)),
    }


# ---------------------------------------------------------------------------------------------------- writing


def _safetensors(tensors: dict[str, torch.Tensor], meta_json: str) -> bytes:
    """A safetensors file with the fixed metadata prefix and the digest of everything but the digest."""
    entries, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype not in _NAMES:
            raise TypeError(f"cannot save tensor {name!r} of dtype {t.dtype}")
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        entries[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    placeholder = "0" * 64
    head = _PREFIX + str(VERSION).encode() + _DIGEST_AT + placeholder.encode() + b'","kvcache_plugins":'
    head += json.dumps(meta_json).encode() + b"}"
    for name, entry in entries.items():
        head += b"," + json.dumps(name).encode() + b":" + json.dumps(entry, separators=(",", ":")).encode()
    head += b"}"
    head += b" " * (-len(head) % 8)
    data = bytearray(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    at = 8 + len(_PREFIX) + len(str(VERSION)) + len(_DIGEST_AT)
    digest = hashlib.sha256()
    digest.update(data[:at])
    digest.update(data[at + 64 :])
    data[at : at + 64] = digest.hexdigest().encode()
    return bytes(data)


def cache_to_bytes(cache: Any, model_or_config: Any) -> bytes:
    """Serialize ``cache`` (see the module docstring); ``model_or_config`` gives the fingerprint."""
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(cache.layers):
        kind, to_state, _ = layer_kind(layer)
        try:
            layer_tensors, layer_meta = to_state(layer)
        except ValueError as err:
            raise ValueError(f"layer {i}: {err}") from None
        for name, t in layer_tensors.items():
            tensors[f"layers.{i}.{name}"] = t
        layers.append({"kind": kind, **layer_meta})
    meta = {
        "class": cache_kind(cache),
        "fingerprint": model_fingerprint(model_or_config),
        "cache": cache.to_state(),
        "layers": layers,
    }
    return _safetensors(tensors, json.dumps(meta, allow_nan=False))


# ---------------------------------------------------------------------------------------------------- reading


def _strict_json(text: str | bytes, what: str) -> Any:
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"cache file is corrupted: its {what} is not valid JSON ({err})") from None


def _legacy_version(header: bytes) -> Any:
    """The version an older file declares (its metadata layout differed), or ``None`` for a foreign file."""
    try:
        meta = json.loads(json.loads(header)["__metadata__"]["kvcache_plugins"])
        return meta.get("version") if meta.get("format") == FORMAT else None
    except Exception:  # anything unreadable is simply not one of ours
        return None


def verify(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the digest, then parse: ``(safetensors header, kvcache_plugins metadata)`` (``ValueError`` if bad)."""
    if len(data) < 8:
        raise ValueError("not a kvcache_plugins cache file: too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > MAX_HEADER_BYTES:
        raise ValueError("not a kvcache_plugins cache file, or it is truncated (bad safetensors header size)")
    header = data[8 : 8 + n]
    if not header.startswith(_PREFIX):
        legacy = _legacy_version(header)
        if legacy is not None:
            raise ValueError(
                f"this cache file uses format version {legacy!r}; this library reads version {VERSION} only (version 1 "
                "files carried a checksum that did not cover their metadata). Save the cache again from its source"
            )
        raise ValueError("not a kvcache_plugins cache file (no kvcache_plugins metadata at the start of the header)")
    rest = header[len(_PREFIX) :]
    end = rest.find(b'"', 0, 16)
    version = rest[:end].decode("ascii", "replace") if end >= 0 else rest[:16].decode("ascii", "replace")
    if version != str(VERSION):
        raise ValueError(f"unsupported cache format version {version!r}; this library reads version {VERSION}")
    at = 8 + len(_PREFIX) + end
    if data[at : at + len(_DIGEST_AT)] != _DIGEST_AT:
        raise ValueError("cache file is corrupted (no digest after the version)")
    at += len(_DIGEST_AT)
    saved = data[at : at + 64]
    digest = hashlib.sha256()
    digest.update(data[:at])
    digest.update(data[at + 64 :])
    if not hmac.compare_digest(digest.hexdigest().encode(), saved):
        raise ValueError("cache file is corrupted, truncated or edited (SHA-256 checksum mismatch)")

    parsed = _strict_json(header, "safetensors header")
    if not isinstance(parsed, dict) or not isinstance(parsed.get("__metadata__"), dict):
        raise ValueError("cache file is invalid: its header is not a safetensors header")
    md = parsed["__metadata__"]
    if set(md) != {"format", "version", "sha256", "kvcache_plugins"} or not isinstance(md["kvcache_plugins"], str):
        raise ValueError(f"cache file is invalid: unexpected header metadata fields {sorted(md)}")
    for name, entry in parsed.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in DTYPES:
            raise ValueError(f"cache file is invalid: tensor {name!r} has dtype {dtype!r}; allowed {sorted(DTYPES)}")
    return parsed, _strict_json(md["kvcache_plugins"], "metadata")


def _layer_placement(model: Any, n: int) -> list[tuple[torch.device, torch.dtype]]:
    """Device and dtype of every layer's attention (where the cache's tensors of that layer must live)."""
    default = (next(model.parameters()).device, model.dtype)
    out = [default] * n
    for module in attention_modules(model):
        if module.layer_idx < n:
            params = [p for p in module.parameters() if p.is_floating_point()]
            if params:
                out[module.layer_idx] = (params[0].device, params[0].dtype)
    return out


def cache_from_bytes(data: bytes, model: Any, tokenizer: Any = None) -> Any:
    """Rebuild a cache from :func:`cache_to_bytes` output for ``model`` (checks everything first, see the module
    docstring)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected the bytes of a saved cache, got {type(data).__name__}")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"loading a cache needs the model it will serve (a transformers PreTrainedModel), got {type(model).__name__}"
        )
    data = bytes(data)
    if is_compressed(data):  # compress="zstd": one bounded frame around the container (see .coding)
        data = decompress(data)
    _, meta = verify(data)
    top = StateReader("metadata", meta)
    top.fields(["class", "fingerprint", "cache", "layers"])
    expected = model_fingerprint(model)
    saved = top.raw("fingerprint")
    if saved != expected:
        saved = saved if isinstance(saved, dict) else {}
        diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        raise ValueError(f"this cache was saved for another model (saved vs this model): {diff}")
    cls = cache_class(top.raw("class"))
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types for malformed data
        raise ValueError(f"cache file is invalid: {err}") from None

    used: set[str] = set()
    cache = cls.from_state(StateReader("cache", top.raw("cache"), tensors, "", used), model, tokenizer)
    layer_states = top.items("layers", len(cache.layers))
    placement = _layer_placement(model, len(cache.layers))
    for i, (layer, state) in enumerate(zip(cache.layers, layer_states)):
        kind = state.str("kind")
        built, _, _ = layer_kind(layer)
        if kind != built:
            raise state.error(f"saved layer kind {kind!r} does not fit this cache's layer {i} ({built!r})")
        _, _, load_state = layer_functions(kind)
        body = dict(state.meta)
        del body["kind"]
        facts = ModelFacts(expected["num_kv_heads"], expected["head_dim"], *placement[i])
        load_state(layer, StateReader(state.where, body, tensors, f"layers.{i}.", used), facts)
    cache.finish_state(StateReader("cache", top.raw("cache"), tensors, "", used))
    unused = sorted(set(tensors) - used)
    if unused:
        raise ValueError(f"saved cache is invalid: tensors that no field refers to: {unused[:5]}")
    return cache


def save_cache(cache: Any, path: str | Path, model_or_config: Any) -> int:
    """Write ``cache`` to ``path``; returns the number of bytes written."""
    data = cache_to_bytes(cache, model_or_config)
    Path(path).write_bytes(data)
    return len(data)


def load_cache(path: str | Path, model: Any, tokenizer: Any = None) -> Any:
    """Read a cache saved with ``cache.save(path)`` for ``model``; returns the right cache class, ready for
    ``generate`` to continue after the saved prompt. Raises ``ValueError`` for another model's cache, a damaged,
    edited or forged file, or an unknown format version, before any tensor reaches the model (and ``TypeError``
    when ``model`` is not a model)."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"load_cache(path, model) needs the model (a transformers PreTrainedModel), got {type(model).__name__}"
        )
    return cache_from_bytes(Path(path).read_bytes(), model, tokenizer)
