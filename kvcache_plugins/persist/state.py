"""Saved state of caches and cache layers: the contract that makes a class serializable, and its validation.

The container (:mod:`kvcache_plugins.persist.container`) knows no concrete class. It asks every cache and every
layer for its state, and on loading it hands each piece of the file, through a :class:`StateReader`, to the class
registered under the saved kind name. The reader validates as it reads: a field of the wrong type, out of range or
missing, a tensor of the wrong dtype or shape, an unknown or repeated name, all raise ``ValueError`` naming the
field and what is allowed. So damaged or foreign input fails with ``ValueError`` before any tensor reaches a model.

**A layer kind** (a ``transformers`` cache layer class) becomes serializable with two methods and a registration::

    @register_layer("my_kind")
    class MyLayer(DynamicLayer):
        def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            # tensors by local name (the container prefixes them with the layer index), and JSON metadata
            # (None, bool, int, float, str, lists and str-keyed dicts of them)
        def load_state(self, state: StateReader, facts: ModelFacts) -> None:
            # fill this layer, freshly built by its cache (so it already knows its spec), from ``state``:
            # read every field and tensor through ``state`` (state.int("logical"), state.tensor("keys", dtype,
            # shape), ...), check every cross-field fact (lengths agree, positions inside the logical length,
            # shapes follow the spec and ``facts``) with ``state.require(cond, message)``; afterwards the layer
            # is exactly what ``to_state`` saw.

``load_state`` is an instance method rather than a constructor: a cache builds its layers from its own arguments
(the quantization spec of each layer), and the file only fills them, so a file cannot change how a layer is
stored, and the container can check that the saved kind is the kind the cache built. Layers that are empty save
``({}, {"empty": True})`` (see :func:`empty_state`). ``transformers``' own ``DynamicLayer`` and
``DynamicSlidingWindowLayer`` are registered here through :func:`register_layer_functions`.

**A cache class** implements ``to_state() -> dict`` (its constructor arguments and anything else it holds besides
its layers), ``from_state(cls, state, model, tokenizer)`` (a classmethod that validates those and returns an empty
cache) and ``finish_state(state)`` (cross-checks after the layers are loaded), and registers with
:func:`register_cache`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..quant.groupwise import AXES, META_DTYPES, QuantizedTensor, check_group_size
from ..quant.packing import packed_last_dim
from ..quant.spec import ALLOWED_BITS, LayerQuantSpec, TensorQuantSpec

#: dtypes a saved tensor may have, by their safetensors names
DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8, "I32": torch.int32,
    "I64": torch.int64,
}
#: model dtypes a cache may hold keys and values in, by name
MODEL_DTYPES: dict[str, torch.dtype] = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}
SCALE_DTYPES: dict[str, torch.dtype] = {str(d): d for d in META_DTYPES}

#: sane caps on sizes read from a file (a larger value is damage, not a cache)
MAX_INT = 2**53


@dataclass(frozen=True)
class ModelFacts:
    """What a loaded layer must fit: the model's KV heads, head_dim and dtype, and the device of the layer."""

    num_kv_heads: int
    head_dim: int
    device: torch.device
    dtype: torch.dtype


# ---------------------------------------------------------------------------------------------------- registries

_LAYERS: dict[str, tuple[type, Callable, Callable]] = {}
_CACHES: dict[str, type] = {}


def register_layer_functions(kind: str, cls: type, to_state: Callable, load_state: Callable) -> None:
    """Register ``cls`` (exactly that class, not subclasses) as layer kind ``kind`` with the two state functions."""
    if kind in _LAYERS and _LAYERS[kind][0] is not cls:
        raise ValueError(f"layer kind {kind!r} is already registered for {_LAYERS[kind][0].__name__}")
    _LAYERS[kind] = (cls, to_state, load_state)


def register_layer(kind: str):
    """Class decorator: the class's ``to_state``/``load_state`` methods serialize layers of kind ``kind``."""

    def deco(cls):
        register_layer_functions(kind, cls, cls.to_state, cls.load_state)
        cls.state_kind = kind
        return cls

    return deco


def register_cache(kind: str):
    """Class decorator: caches of this class save and load under the name ``kind``."""

    def deco(cls):
        if kind in _CACHES and _CACHES[kind] is not cls:
            raise ValueError(f"cache kind {kind!r} is already registered for {_CACHES[kind].__name__}")
        _CACHES[kind] = cls
        cls.state_kind = kind
        return cls

    return deco


def layer_kind(layer: Any) -> tuple[str, Callable, Callable]:
    """``(kind, to_state, load_state)`` for a layer; ``TypeError`` for a class nobody registered."""
    for kind, (cls, to_state, load_state) in _LAYERS.items():
        if type(layer) is cls:
            return kind, to_state, load_state
    raise TypeError(f"cannot save a {type(layer).__name__}: no layer kind is registered for it")


def layer_functions(kind: str) -> tuple[type, Callable, Callable]:
    return _LAYERS[kind]


def cache_class(kind: Any) -> type:
    if not isinstance(kind, str) or kind not in _CACHES:
        raise ValueError(f"unknown saved cache class {kind!r}; this library reads {sorted(_CACHES)}")
    return _CACHES[kind]


def cache_kind(cache: Any) -> str:
    kind = getattr(type(cache), "state_kind", None)
    if kind is None or _CACHES.get(kind) is not type(cache):
        raise TypeError(f"cannot save a {type(cache).__name__}; kvcache_plugins caches only")
    return kind


# ---------------------------------------------------------------------------------------------------- reading


class StateReader:
    """A validated view of one saved metadata object and the tensors under its name prefix.

    Every accessor raises ``ValueError`` naming ``where`` the field sits and what is allowed. Each tensor may be
    read once; the container checks at the end that every tensor of the file was read (nothing smuggled in).
    """

    def __init__(
        self, where: str, meta: Any, tensors: Mapping[str, torch.Tensor] | None = None, prefix: str = "",
        used: set[str] | None = None,
    ) -> None:
        self.where = where
        self.tensors = tensors if tensors is not None else {}
        self.prefix = prefix
        self.used = used if used is not None else set()
        if not isinstance(meta, dict):
            raise self.error(f"expected an object, got {type(meta).__name__}")
        self.meta = meta

    def error(self, why: str) -> ValueError:
        return ValueError(f"saved cache is invalid at {self.where}: {why}")

    def require(self, condition: bool, why: str) -> None:
        if not condition:
            raise self.error(why)

    def fields(self, required: Sequence[str], optional: Sequence[str] = ()) -> None:
        """The object has every ``required`` key and no key outside ``required`` and ``optional``."""
        missing = [k for k in required if k not in self.meta]
        extra = sorted(set(self.meta) - set(required) - set(optional))
        if missing or extra:
            raise self.error(
                f"expected the fields {sorted(required)} (optional: {sorted(optional)}), "
                f"missing {missing}, unknown {extra}"
            )

    def has(self, key: str) -> bool:
        return key in self.meta

    def raw(self, key: str) -> Any:
        if key not in self.meta:
            raise self.error(f"missing field {key!r}")
        return self.meta[key]

    def int(self, key: str, lo: int = 0, hi: int = MAX_INT, *, optional: bool = False) -> int | None:
        value = self.raw(key)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error(f"{key} must be an int in [{lo}, {hi}]{' or null' if optional else ''}, got {value!r}")
        return value

    def float(self, key: str, lo: float, hi: float, *, optional: bool = False) -> float | None:
        value = self.raw(key)
        if value is None and optional:
            return None
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not number or not lo <= value <= hi:
            raise self.error(f"{key} must be a number in [{lo}, {hi}]{' or null' if optional else ''}, got {value!r}")
        return float(value)

    def bool(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.error(f"{key} must be true or false, got {value!r}")
        return value

    def str(self, key: str, choices: Sequence[str] | None = None, *, optional: bool = False) -> str | None:
        value = self.raw(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or (choices is not None and value not in choices):
            allowed = f"one of {list(choices)}" if choices is not None else "a string"
            raise self.error(f"{key} must be {allowed}{' or null' if optional else ''}, got {value!r}")
        return value

    def int_list(self, key: str, length: int | None = None, lo: int = 0, hi: int = MAX_INT) -> list[int]:
        value = self.raw(key)
        if not isinstance(value, list) or (length is not None and len(value) != length) or not all(
            not isinstance(v, bool) and isinstance(v, int) and lo <= v <= hi for v in value
        ):
            n = f"{length} " if length is not None else ""
            raise self.error(f"{key} must be a list of {n}ints in [{lo}, {hi}], got {value!r}"[:300])
        return value

    def dtype(self, key: str, allowed: Mapping[str, torch.dtype]) -> torch.dtype:
        return allowed[self.str(key, list(allowed))]

    def model_dtype(self, facts: ModelFacts, key: str = "dtype") -> torch.dtype:
        """The keys' and values' dtype, which must be the model's (it computes them)."""
        dtype = self.dtype(key, MODEL_DTYPES)
        self.require(dtype == facts.dtype, f"{key} {dtype} is not this model's dtype {facts.dtype}")
        return dtype

    def sub(self, key: str) -> StateReader:
        return StateReader(f"{self.where}.{key}", self.raw(key), self.tensors, self.prefix, self.used)

    def items(self, key: str, length: int | None = None) -> list[StateReader]:
        value = self.raw(key)
        if not isinstance(value, list) or (length is not None and len(value) != length):
            raise self.error(f"{key} must be a list{f' of {length} entries' if length is not None else ''}")
        return [
            StateReader(f"{self.where}.{key}[{i}]", v, self.tensors, self.prefix, self.used) for i, v in enumerate(value)
        ]

    def tensor(
        self, name: str, dtype: torch.dtype, shape: Sequence[int | None], device: torch.device | None = None,
        *, optional: bool = False,
    ) -> torch.Tensor | None:
        """The tensor ``name`` of this object, checked to have ``dtype`` and ``shape`` (``None``: any size)."""
        full = self.prefix + name
        t = self.tensors.get(full)
        if t is None:
            if optional:
                return None
            raise self.error(f"tensor {full!r} is missing")
        if full in self.used:
            raise self.error(f"tensor {full!r} is used twice")
        if t.dtype != dtype:
            raise self.error(f"tensor {full!r} must be {dtype}, got {t.dtype}")
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise self.error(f"tensor {full!r} must have shape {want}, got {list(t.shape)}")
        self.used.add(full)
        return t if device is None else t.to(device)

    def finite(self, name: str, t: torch.Tensor | None) -> None:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise self.error(f"tensor {self.prefix + name!r} holds infinite or NaN values")


def empty_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return {}, {"empty": True}


def is_empty(state: StateReader) -> bool:
    if state.has("empty"):
        state.fields(["empty"])
        state.require(state.meta["empty"] is True, "empty must be true when given")
        return True
    return False


# ---------------------------------------------------------------------------------------------------- quantized


def tensor_spec_state(spec: TensorQuantSpec) -> dict[str, Any]:
    return {"bits": spec.bits, "axis": spec.axis, "group_size": spec.group_size}


def layer_spec_state(spec: LayerQuantSpec) -> dict[str, Any]:
    return {
        "key": tensor_spec_state(spec.key), "value": tensor_spec_state(spec.value),
        "residual_length": spec.residual_length, "sink_tokens": spec.sink_tokens,
    }


def read_tensor_spec(state: StateReader, head_dim: int) -> TensorQuantSpec:
    state.fields(["bits", "axis", "group_size"])
    bits = state.int("bits", 2, 16)
    state.require(bits in ALLOWED_BITS, f"bits must be one of {ALLOWED_BITS}, got {bits}")
    axis = state.str("axis", AXES)
    group = state.int("group_size", 1, 1 << 20)
    try:
        spec = TensorQuantSpec(bits, axis, group)
        if spec.quantized:
            check_group_size(group, head_dim, axis, bits)
    except ValueError as err:
        raise state.error(str(err)) from None
    return spec


def read_layer_spec(state: StateReader, head_dim: int) -> LayerQuantSpec:
    state.fields(["key", "value", "residual_length", "sink_tokens"])
    key, value = read_tensor_spec(state.sub("key"), head_dim), read_tensor_spec(state.sub("value"), head_dim)
    try:
        return LayerQuantSpec(key, value, state.int("residual_length"), state.int("sink_tokens"))
    except ValueError as err:
        raise state.error(str(err)) from None


def put_stored(tensors: dict[str, torch.Tensor], name: str, t: torch.Tensor | QuantizedTensor | None) -> None:
    """Add a plain or quantized tensor to ``tensors`` (``name``, or ``name.codes/.scale/.zero``)."""
    if t is None:
        return
    if isinstance(t, QuantizedTensor):
        tensors[f"{name}.codes"], tensors[f"{name}.scale"], tensors[f"{name}.zero"] = t.codes, t.scale, t.zero
    else:
        tensors[name] = t


def read_stored(
    state: StateReader, name: str, spec: TensorQuantSpec, dtype: torch.dtype, scale_dtype: torch.dtype,
    shape: tuple[int | None, int, int | None, int], device: torch.device, *, optional: bool = False,
) -> torch.Tensor | QuantizedTensor | None:
    """Read what :func:`put_stored` wrote for a ``[B, H, T, D]`` tensor stored as ``spec`` says.

    Codes must be ``uint8 [B, H, T, packed(D)]``; scales and zeros ``scale_dtype``, ``[B, H, T, D/g]`` per token or
    ``[B, H, T/g, D]`` per channel, finite, scales non-negative. ``None`` entries of ``shape`` are read off the
    first tensor; a plain tensor is ``dtype`` and must be finite.
    """
    B, H, T, D = shape
    if not spec.quantized:
        t = state.tensor(name, dtype, shape, optional=optional)
        state.finite(name, t)
        return None if t is None else t.to(device)
    codes = state.tensor(f"{name}.codes", torch.uint8, (B, H, T, packed_last_dim(D, spec.bits)), optional=optional)
    if codes is None:
        for part in ("scale", "zero"):
            state.require(f"{state.prefix}{name}.{part}" not in state.tensors, f"{name}.{part} without {name}.codes")
        return None
    B, H, T = codes.shape[:3]
    g = spec.group_size
    if spec.axis == "token":
        meta_shape = (B, H, T, D // g)
    else:
        state.require(T % g == 0, f"{name}: {T} per-channel tokens is not a multiple of group_size {g}")
        meta_shape = (B, H, T // g, D)
    scale = state.tensor(f"{name}.scale", scale_dtype, meta_shape)
    zero = state.tensor(f"{name}.zero", scale_dtype, meta_shape)
    state.finite(f"{name}.scale", scale)
    state.finite(f"{name}.zero", zero)
    state.require(bool((scale >= 0).all()), f"{name}.scale holds negative scales")
    return QuantizedTensor(codes.to(device), scale.to(device), zero.to(device), spec.bits, g, spec.axis, D)


# ---------------------------------------------------------------------------------------------------- transformers layers


def _dynamic_to_state(layer: DynamicLayer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return empty_state()
    meta: dict[str, Any] = {"dtype": str(layer.keys.dtype)}
    if isinstance(layer, DynamicSlidingWindowLayer):
        meta["cumulative_length"] = int(layer.cumulative_length)
    return {"keys": layer.keys, "values": layer.values}, meta


def _dynamic_load_state(layer: DynamicLayer, state: StateReader, facts: ModelFacts) -> None:
    if is_empty(state):
        return
    sliding = isinstance(layer, DynamicSlidingWindowLayer)
    state.fields(["dtype", "cumulative_length"] if sliding else ["dtype"])
    dtype = state.model_dtype(facts)
    keys = state.tensor("keys", dtype, (None, facts.num_kv_heads, None, facts.head_dim))
    values = state.tensor("values", dtype, tuple(keys.shape))
    state.require(keys.shape[0] >= 1 and keys.shape[2] >= 1, f"keys of shape {list(keys.shape)} hold no token")
    state.finite("keys", keys)
    state.finite("values", values)
    keys, values = keys.to(facts.device), values.to(facts.device)
    if sliding:
        cumulative = state.int("cumulative_length", 1)
        stored = min(cumulative, layer.sliding_window - 1)
        state.require(
            keys.shape[2] == stored,
            f"a sliding-window layer (window {layer.sliding_window}) that has seen {cumulative} tokens holds "
            f"{stored}, got {keys.shape[2]}",
        )
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    if sliding:
        layer.cumulative_length = cumulative


def dynamic_length(layer: Any) -> int | None:
    """Tokens a plain ``DynamicLayer`` holds (``None`` for other kinds or when empty)."""
    if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.numel():
        return int(layer.keys.shape[2])
    return None


register_layer_functions("dynamic", DynamicLayer, _dynamic_to_state, _dynamic_load_state)
register_layer_functions("sliding", DynamicSlidingWindowLayer, _dynamic_to_state, _dynamic_load_state)
