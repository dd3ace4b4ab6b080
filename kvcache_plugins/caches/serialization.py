"""Save, load and send compressed caches: encode a document once, answer questions elsewhere.

Format: one safetensors file (or the same bytes in memory). The tensors are exactly what the cache holds (packed
codes, scales, zeros, full-precision parts, kept positions); the safetensors ``__metadata__`` holds one JSON string
with the format version, the cache class and its constructor arguments, each layer's state (kind, logical length,
quantization parameters), the model fingerprint (architecture, layer count, KV heads, head_dim, RoPE parameters)
and a SHA-256 of all tensor bytes. No pickle anywhere.

Loading checks, before any tensor reaches the model: the magic and version, the checksum (truncated or corrupted
data), and that the model's fingerprint equals the saved one. So ``to_bytes()`` is the cache's byte accounting plus
a small header (the JSON), and continuing from a loaded cache gives exactly the tokens and logits that continuing
the original would have.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .._model import head_dim, text_config
from ..attention import observer
from ..quant.groupwise import QuantizedTensor
from ..quant.spec import LayerQuantSpec, TensorQuantSpec
from .compressed import CompressedCache, CompressedLayer, PromptLayout
from .layers import KVStream, MixedPrecisionLayer
from .mixed_precision import MixedPrecisionCache
from .ragged import RaggedLayer

FORMAT = "kvcache_plugins.cache"
VERSION = 1
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int32, torch.int64)}


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


# ---------------------------------------------------------------------------------------------------- capture


def _spec_json(spec: TensorQuantSpec) -> dict[str, Any]:
    return {"bits": spec.bits, "axis": spec.axis, "group_size": spec.group_size}


def _layer_spec_json(spec: LayerQuantSpec) -> dict[str, Any]:
    return {
        "key": _spec_json(spec.key), "value": _spec_json(spec.value),
        "residual_length": spec.residual_length, "sink_tokens": spec.sink_tokens,
    }


def _layer_spec(data: dict[str, Any]) -> LayerQuantSpec:
    return LayerQuantSpec(
        TensorQuantSpec(**data["key"]), TensorQuantSpec(**data["value"]), data["residual_length"], data["sink_tokens"]
    )


class _Writer:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, name: str, t: torch.Tensor | None) -> str | None:
        if t is None:
            return None
        self.tensors[name] = t.detach().to("cpu").contiguous()
        return name

    def put_stored(self, name: str, t: torch.Tensor | QuantizedTensor | None) -> dict[str, Any] | None:
        if t is None:
            return None
        if isinstance(t, QuantizedTensor):
            return {
                "quantized": True, "codes": self.put(f"{name}.codes", t.codes), "scale": self.put(f"{name}.scale", t.scale),
                "zero": self.put(f"{name}.zero", t.zero), "bits": t.bits, "group_size": t.group_size, "axis": t.axis,
                "head_dim": t.head_dim,
            }
        return {"quantized": False, "data": self.put(name, t)}


def _capture_layer(i: int, layer: Any, w: _Writer) -> dict[str, Any]:
    p = f"layers.{i}"
    if isinstance(layer, MixedPrecisionLayer):
        if not layer.is_initialized:
            return {"kind": "mixed", "empty": True}
        streams = []
        for j, s in enumerate(layer.streams):
            streams.append({
                "sink": w.put(f"{p}.s{j}.sink", s.sink),
                "body": w.put_stored(f"{p}.s{j}.body", s.body),
                "residual": w.put(f"{p}.s{j}.residual", s.residual),
            })
        return {
            "kind": "mixed", "dtype": str(layer.dtype), "scale_dtype": str(layer.scale_dtype), "paired": layer.paired,
            "streams": streams,
        }
    if isinstance(layer, CompressedLayer):
        if layer.pending is not None:
            raise ValueError(f"layer {i} still holds an unselected prompt: save the cache after its prefill")
        if isinstance(layer, RaggedLayer) and layer.ragged:
            tensors, state = layer.to_state()
            return {"kind": "ragged", "state": state, "tensors": {k: w.put(f"{p}.{k}", t) for k, t in tensors.items()}}
        if not layer.is_initialized:
            return {"kind": "compressed", "empty": True}
        return {
            "kind": "compressed", "dtype": str(layer.dtype), "scale_dtype": str(layer.scale_dtype),
            "logical": layer.logical, "tail": layer.tail,
            "keys": w.put_stored(f"{p}.keys", layer.stored_keys), "values": w.put_stored(f"{p}.values", layer.stored_values),
            "positions": w.put(f"{p}.positions", layer.positions), "acc": w.put(f"{p}.acc", layer.acc),
        }
    if isinstance(layer, DynamicLayer):
        kind = "sliding" if isinstance(layer, DynamicSlidingWindowLayer) else "dynamic"
        if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
            return {"kind": kind, "empty": True}
        out = {"kind": kind, "keys": w.put(f"{p}.keys", layer.keys), "values": w.put(f"{p}.values", layer.values)}
        if kind == "sliding":
            out["cumulative_length"] = int(layer.cumulative_length)
        return out
    raise TypeError(f"layer {i}: cannot save a {type(layer).__name__}")


def _cache_args(cache: DynamicCache) -> dict[str, Any]:
    from .scout_masked import ScoutMaskedCache

    if isinstance(cache, ScoutMaskedCache):
        return {"selection": cache.selection.to_bytes().hex(), "mode": cache.mode}
    if isinstance(cache, CompressedCache):
        selector = cache.selector
        options = {k: v for k, v in vars(selector).items() if not k.startswith("_")}
        ql = cache.question_len
        return {
            "selector": selector.name, "selector_options": options, "retention": cache.retention,
            "max_tokens": cache.max_tokens, "question_len": ql.tolist() if isinstance(ql, torch.Tensor) else ql,
            "sink_tokens": cache.sink_tokens, "granularity": cache.granularity, "decode_policy": cache.decode_policy,
            "evict_every": cache.evict_every, "recent_tokens": cache.recent_tokens, "seed": cache.seed,
            "budget": {"name": cache.budget.name, "options": dict(vars(cache.budget))},
        }
    if isinstance(cache, MixedPrecisionCache):
        return {}
    raise TypeError(f"cannot save a {type(cache).__name__}; kvcache_plugins caches only")


def cache_to_bytes(cache: DynamicCache, model_or_config: Any) -> bytes:
    """Serialize ``cache`` (see the module docstring); ``model_or_config`` gives the fingerprint."""
    w = _Writer()
    layers = [_capture_layer(i, layer, w) for i, layer in enumerate(cache.layers)]
    specs = getattr(cache, "layer_specs", None)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "class": type(cache).__name__,
        "args": _cache_args(cache),
        "layer_specs": [_layer_spec_json(s) for s in specs] if specs is not None else None,
        "layers": layers,
        "fingerprint": model_fingerprint(model_or_config),
        "logical_length": cache.get_seq_length(),
    }
    if isinstance(cache, CompressedCache) and cache.layout is not None:
        lay = cache.layout
        meta["layout"] = {
            "length": lay.length, "pad": lay.pad.tolist(), "question_len": lay.question_len.tolist(),
            "sinks": lay.sinks.tolist(),
        }
    digest = hashlib.sha256()
    for name in sorted(w.tensors):
        digest.update(name.encode())
        digest.update(w.tensors[name].view(torch.uint8).reshape(-1).numpy().tobytes())
    meta["sha256"] = digest.hexdigest()
    return st_save(w.tensors, metadata={"kvcache_plugins": json.dumps(meta)})


# ---------------------------------------------------------------------------------------------------- restore


def _read_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ValueError("not a kvcache_plugins cache file: too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100_000_000:
        raise ValueError("not a kvcache_plugins cache file, or it is truncated (bad safetensors header size)")
    try:
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["kvcache_plugins"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"not a kvcache_plugins cache file (no readable metadata): {err}") from None
    if meta.get("format") != FORMAT:
        raise ValueError("not a kvcache_plugins cache file (foreign safetensors metadata)")
    if meta.get("version") != VERSION:
        raise ValueError(f"unsupported cache format version {meta.get('version')}; this library reads version {VERSION}")
    return meta


def _layer_devices(model: Any, n: int) -> list[torch.device]:
    default = next(model.parameters()).device
    devices = [default] * n
    for module in observer.attention_modules(model):
        if module.layer_idx < n:
            devices[module.layer_idx] = next(module.parameters()).device
    return devices


def _get_stored(entry: dict[str, Any] | None, tensors: dict[str, torch.Tensor], device) -> Any:
    if entry is None:
        return None
    if entry["quantized"]:
        return QuantizedTensor(
            tensors[entry["codes"]].to(device), tensors[entry["scale"]].to(device), tensors[entry["zero"]].to(device),
            entry["bits"], entry["group_size"], entry["axis"], entry["head_dim"],
        )
    return tensors[entry["data"]].to(device)


def _get(name: str | None, tensors: dict[str, torch.Tensor], device) -> torch.Tensor | None:
    return None if name is None else tensors[name].to(device)


def _restore_layer(layer: Any, state: dict[str, Any], tensors, device) -> None:
    if state.get("empty"):
        return
    kind = state["kind"]
    if kind == "mixed":
        if not isinstance(layer, MixedPrecisionLayer):
            raise ValueError(f"saved layer kind {kind!r} does not fit a {type(layer).__name__}")
        layer.dtype, layer.device = _DTYPES[state["dtype"]], device
        layer.scale_dtype = _DTYPES[state["scale_dtype"]]
        layer._new_streams()
        for stream, s in zip(layer.streams, state["streams"]):
            stream.dtype = layer.dtype
            stream.meta_dtype = layer.scale_dtype
            stream.sink = _get(s["sink"], tensors, device)
            stream.body = _get_stored(s["body"], tensors, device)
            stream.residual = _get(s["residual"], tensors, device)
        layer.is_initialized = True
    elif kind == "compressed":
        if not isinstance(layer, CompressedLayer):
            raise ValueError(f"saved layer kind {kind!r} does not fit a {type(layer).__name__}")
        layer.dtype, layer.device = _DTYPES[state["dtype"]], device
        layer.scale_dtype = _DTYPES[state["scale_dtype"]]
        layer.stored_keys = _get_stored(state["keys"], tensors, device)
        layer.stored_values = _get_stored(state["values"], tensors, device)
        layer.positions = _get(state["positions"], tensors, device)
        layer.acc = _get(state["acc"], tensors, device)
        layer.logical, layer.tail = state["logical"], state["tail"]
        layer.is_initialized = True
    elif kind == "ragged":
        if not isinstance(layer, RaggedLayer):
            raise ValueError(f"saved layer kind {kind!r} does not fit a {type(layer).__name__}")
        layer.from_state({k: tensors[v] for k, v in state["tensors"].items()}, state["state"], device, _DTYPES)
    elif kind in ("dynamic", "sliding"):
        if not isinstance(layer, DynamicLayer) or isinstance(layer, (MixedPrecisionLayer, CompressedLayer)):
            raise ValueError(f"saved layer kind {kind!r} does not fit a {type(layer).__name__}")
        keys, values = _get(state["keys"], tensors, device), _get(state["values"], tensors, device)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        if kind == "sliding":
            layer.cumulative_length = state["cumulative_length"]
    else:
        raise ValueError(f"unknown saved layer kind {kind!r}")


def _budget(saved: dict[str, Any] | None) -> Any:
    from ..selection.budget import BUDGETS

    if saved is None:
        return "uniform"
    if saved.get("name") not in BUDGETS:
        raise ValueError(f"unknown saved budget {saved.get('name')!r}; known: {sorted(BUDGETS)}")
    return BUDGETS[saved["name"]](**saved.get("options", {}))


def cache_from_bytes(data: bytes, model: Any, tokenizer: Any = None) -> DynamicCache:
    """Rebuild a cache from :func:`cache_to_bytes` output for ``model`` (checks everything first)."""
    from ..scout.selection import Selection
    from .scout_masked import ScoutMaskedCache

    data = bytes(data)
    meta = _read_header(data)
    expected = model_fingerprint(model)
    if meta["fingerprint"] != expected:
        diff = {k: (meta["fingerprint"].get(k), v) for k, v in expected.items() if meta["fingerprint"].get(k) != v}
        raise ValueError(f"this cache was saved for another model (saved vs this model): {diff}")
    try:
        tensors = st_load(data)
    except Exception as err:  # safetensors raises its own error types for malformed data
        raise ValueError(f"cache file is truncated or corrupted: {err}") from None
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes())
    if digest.hexdigest() != meta["sha256"]:
        raise ValueError("cache file is corrupted (checksum mismatch)")

    specs = [_layer_spec(s) for s in meta["layer_specs"]] if meta["layer_specs"] is not None else None
    args = meta["args"]
    cls = meta["class"]
    if cls == "MixedPrecisionCache":
        cache: DynamicCache = MixedPrecisionCache(model, specs)
    elif cls == "ScoutMaskedCache":
        selection = Selection.from_bytes(bytes.fromhex(args["selection"]))
        if tokenizer is None:
            raise ValueError("loading a ScoutMaskedCache needs the model's tokenizer (tokenizer=...) to check its vocabulary")
        cache = ScoutMaskedCache(selection, model, tokenizer=tokenizer, mode=args["mode"], quant=specs)
    elif cls == "CompressedCache":
        from ..selection import make_selector

        selector = make_selector(args["selector"], **args["selector_options"])
        cache = CompressedCache(
            model, selector=selector, retention=args["retention"], max_tokens=args["max_tokens"],
            question_len=args["question_len"], sink_tokens=args["sink_tokens"], granularity=args["granularity"],
            quant=specs, decode_policy=args["decode_policy"], evict_every=args["evict_every"],
            recent_tokens=args["recent_tokens"], seed=args["seed"], budget=_budget(args.get("budget")),
        )
    else:
        raise ValueError(f"unknown saved cache class {cls!r}")
    if len(meta["layers"]) != len(cache.layers):
        raise ValueError(f"saved cache has {len(meta['layers'])} layers, this model {len(cache.layers)}")
    devices = _layer_devices(model, len(cache.layers))
    for layer, state, device in zip(cache.layers, meta["layers"], devices):
        _restore_layer(layer, state, tensors, device)
    if "layout" in meta:
        lay = meta["layout"]
        cache.layout = PromptLayout(
            lay["length"], torch.tensor(lay["pad"]), torch.tensor(lay["question_len"]), torch.tensor(lay["sinks"])
        )
    return cache


def save_cache(cache: DynamicCache, path: str | Path, model_or_config: Any) -> int:
    """Write ``cache`` to ``path``; returns the number of bytes written."""
    data = cache_to_bytes(cache, model_or_config)
    Path(path).write_bytes(data)
    return len(data)


def load_cache(path: str | Path, model: Any, tokenizer: Any = None) -> DynamicCache:
    """Read a cache saved with ``cache.save(path)`` for ``model``; returns the right cache class, ready for
    ``generate`` to continue after the saved prompt. Raises ``ValueError`` for another model's cache, a truncated or
    corrupted file, or an unknown format version, before any tensor reaches the model."""
    return cache_from_bytes(Path(path).read_bytes(), model, tokenizer)
