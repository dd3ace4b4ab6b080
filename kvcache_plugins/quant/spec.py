"""Per-layer quantization specs and the named presets.

A *spec* says how each layer stores its keys and values. Accepted forms (``n`` = number of layers):

* a preset name: ``"full"`` (16-bit), ``"int8"``, ``"int4"``, ``"int3"``, ``"int2"``, ``"mixed_l0"`` (layer 0 at model
  precision, every other layer int4 per-token: the lab's recipe for Qwen2.5-7B), ``"kivi4"``/``"kivi2"`` (keys
  per-channel, values per-token, 128-token full-precision residual);
* an ``int`` bit width (2, 3, 4, 8 or 16) for every layer;
* a :class:`TensorQuantSpec` (keys and values alike) or :class:`LayerQuantSpec` for every layer;
* a ``dict`` mapping layer indices to per-layer entries, plus an optional ``"default"`` entry for the others
  (default 16 bits), e.g. ``{0: 16, 5: 8, "default": 4}``;
* a ``list``/``tuple`` of exactly ``n`` per-layer entries.

A per-layer entry is an ``int`` bit width, a preset-style string (``"int4"``, ``"fp16"``), a
:class:`TensorQuantSpec`, a :class:`LayerQuantSpec`, or ``{"key": entry, "value": entry}`` for different
key/value settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Union

from .groupwise import AXES, check_group_size
from .packing import SUPPORTED_BITS

ALLOWED_BITS: tuple[int, ...] = (*SUPPORTED_BITS, 16)
DEFAULT_GROUP_SIZE = 32


@dataclass(frozen=True)
class TensorQuantSpec:
    """How one of K or V is stored: ``bits`` (16 = model dtype), grouping ``axis`` and ``group_size``."""

    bits: int = 16
    axis: str = "token"
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"unsupported bits={self.bits!r}; choose one of {ALLOWED_BITS} (16 = model precision)")
        if self.axis not in AXES:
            raise ValueError(f"unsupported axis={self.axis!r}; choose one of {AXES}")
        check_group_size(self.group_size, None, self.axis, self.bits if self.quantized else None)

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    def describe(self) -> str:
        return "16" if not self.quantized else f"int{self.bits}/{self.axis}/g{self.group_size}"


@dataclass(frozen=True)
class LayerQuantSpec:
    """Storage of one layer: key and value specs, full-precision residual window and sink tokens.

    ``residual_length`` newest tokens (plus, on the channel axis, the tokens of a not yet complete group) and the
    first ``sink_tokens`` tokens stay in the model dtype; everything else is quantized as it arrives.
    """

    key: TensorQuantSpec = TensorQuantSpec()
    value: TensorQuantSpec = TensorQuantSpec()
    residual_length: int = 0
    sink_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("residual_length", "sink_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        for which, t in (("key", self.key), ("value", self.value)):
            if t.quantized and t.axis == "channel" and self.residual_length < t.group_size:
                raise ValueError(
                    f"{which}s use per-channel groups of {t.group_size} tokens, which need a full-precision residual "
                    f"window of at least group_size tokens; got residual_length={self.residual_length}"
                )

    @property
    def quantized(self) -> bool:
        return self.key.quantized or self.value.quantized

    def describe(self) -> str:
        if self.key == self.value:
            body = self.key.describe()
        else:
            body = f"k:{self.key.describe()} v:{self.value.describe()}"
        extras = []
        if self.quantized and self.residual_length:
            extras.append(f"residual={self.residual_length}")
        if self.quantized and self.sink_tokens:
            extras.append(f"sinks={self.sink_tokens}")
        return body + (f" ({', '.join(extras)})" if extras else "")


Entry = Union[int, str, TensorQuantSpec, LayerQuantSpec, Mapping]
Spec = Union[str, int, TensorQuantSpec, LayerQuantSpec, Mapping, Sequence]

_WIDTH_NAMES = {
    "full": 16,
    "fp16": 16,
    "bf16": 16,
    "16": 16,
    "int16": 16,
    "int8": 8,
    "int4": 4,
    "int3": 3,
    "int2": 2,
}

PRESETS: dict[str, str] = {
    "full": "every layer at model precision (lossless; equals DynamicCache)",
    "int8": "every layer int8 per-token",
    "int4": "every layer int4 per-token",
    "int3": "every layer int3 per-token",
    "int2": "every layer int2 per-token",
    "mixed_l0": "layer 0 at model precision, every other layer int4 per-token",
    "kivi4": "keys int4 per-channel, values int4 per-token, 128-token residual",
    "kivi2": "keys int2 per-channel, values int2 per-token, 128-token residual",
}


def preset_names() -> list[str]:
    return list(PRESETS)


@dataclass(frozen=True)
class _Defaults:
    group_size: int
    key_axis: str
    value_axis: str
    residual_length: int | None
    sink_tokens: int


def _tensor_spec(bits: int, axis: str, d: _Defaults) -> TensorQuantSpec:
    return TensorQuantSpec(bits=bits, axis=axis, group_size=d.group_size)


def _entry_to_layer(entry: Any, d: _Defaults, where: str) -> LayerQuantSpec:
    residual = d.residual_length if d.residual_length is not None else 0
    if isinstance(entry, LayerQuantSpec):
        return entry
    if isinstance(entry, TensorQuantSpec):
        return LayerQuantSpec(entry, entry, residual, d.sink_tokens)
    if isinstance(entry, str):
        name = entry.strip().lower()
        if name not in _WIDTH_NAMES:
            raise ValueError(
                f"{where}: unknown per-layer setting {entry!r}; use a bit width {ALLOWED_BITS} or one of "
                f"{sorted(_WIDTH_NAMES)}"
            )
        entry = _WIDTH_NAMES[name]
    if isinstance(entry, bool):
        raise TypeError(f"{where}: expected a bit width, got {entry!r}")
    if isinstance(entry, int):
        if entry not in ALLOWED_BITS:
            raise ValueError(f"{where}: unsupported bits={entry}; choose one of {ALLOWED_BITS}")
        return LayerQuantSpec(_tensor_spec(entry, d.key_axis, d), _tensor_spec(entry, d.value_axis, d), residual, d.sink_tokens)
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"key", "value"}
        if unknown or not entry:
            raise ValueError(f"{where}: a per-layer dict takes the keys 'key' and 'value', got {sorted(map(str, entry))}")
        key = _entry_to_layer(entry.get("key", 16), d, where + "['key']").key
        value = _entry_to_layer(entry.get("value", 16), d, where + "['value']").value
        return LayerQuantSpec(key, value, residual, d.sink_tokens)
    raise TypeError(
        f"{where}: cannot use {type(entry).__name__} as a per-layer setting; use an int bit width, a string like "
        "'int4', a TensorQuantSpec, a LayerQuantSpec or {'key': ..., 'value': ...}"
    )


def _preset_table(name: str, d: _Defaults, num_layers: int) -> list[LayerQuantSpec]:
    if name in _WIDTH_NAMES:
        return [_entry_to_layer(_WIDTH_NAMES[name], d, f"preset {name!r}")] * num_layers
    if name == "mixed_l0":
        rest = _entry_to_layer(4, d, "preset 'mixed_l0'")
        return [_entry_to_layer(16, d, "preset 'mixed_l0'")] + [rest] * (num_layers - 1)
    if name in ("kivi4", "kivi2"):
        bits = int(name[-1])
        residual = 128 if d.residual_length is None else d.residual_length
        layer = LayerQuantSpec(
            TensorQuantSpec(bits, "channel", d.group_size), TensorQuantSpec(bits, "token", d.group_size), residual, d.sink_tokens
        )
        return [layer] * num_layers
    raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")


def resolve_layer_specs(
    spec: Spec,
    num_layers: int,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    key_axis: str = "token",
    value_axis: str = "token",
    residual_length: int | None = None,
    sink_tokens: int = 0,
    head_dim: int | None = None,
) -> list[LayerQuantSpec]:
    """Turn any accepted spec form into one :class:`LayerQuantSpec` per layer (see the module docstring).

    ``group_size``, ``key_axis``, ``value_axis``, ``residual_length`` and ``sink_tokens`` fill in what a spec
    form leaves open. Raises ``ValueError``/``TypeError`` naming the valid choices for anything else.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    for name, axis in (("key_axis", key_axis), ("value_axis", value_axis)):
        if axis not in AXES:
            raise ValueError(f"{name} must be one of {AXES}, got {axis!r}")
    check_group_size(group_size)
    d = _Defaults(group_size, key_axis, value_axis, residual_length, sink_tokens)

    if isinstance(spec, str):
        layers = _preset_table(spec.strip().lower(), d, num_layers)
    elif isinstance(spec, Mapping):
        default = spec.get("default", 16)
        layers = [_entry_to_layer(default, d, "spec['default']")] * num_layers
        for k, entry in spec.items():
            if k == "default":
                continue
            if isinstance(k, bool) or not isinstance(k, int):
                raise TypeError(f"spec keys must be layer indices (int) or 'default', got {k!r}")
            if not 0 <= k < num_layers:
                raise ValueError(f"layer index {k} is beyond the model: valid layer indices are 0..{num_layers - 1}")
            layers[k] = _entry_to_layer(entry, d, f"spec[{k}]")
    elif isinstance(spec, (list, tuple)):
        if len(spec) != num_layers:
            raise ValueError(f"a per-layer list needs exactly {num_layers} entries (one per layer), got {len(spec)}")
        layers = [_entry_to_layer(e, d, f"spec[{i}]") for i, e in enumerate(spec)]
    elif isinstance(spec, (int, TensorQuantSpec, LayerQuantSpec)) and not isinstance(spec, bool):
        layers = [_entry_to_layer(spec, d, "spec")] * num_layers
    else:
        raise TypeError(
            f"unsupported spec of type {type(spec).__name__}; use a preset name ({', '.join(PRESETS)}), a bit width, "
            "a dict {layer: bits, 'default': bits} or a list with one entry per layer"
        )

    if head_dim is not None:
        for i, layer in enumerate(layers):
            for t in (layer.key, layer.value):
                if t.quantized:
                    try:
                        check_group_size(t.group_size, head_dim, t.axis, t.bits)
                    except ValueError as err:
                        raise ValueError(f"layer {i}: {err}") from None
    return layers


def with_overrides(layer: LayerQuantSpec, **changes: Any) -> LayerQuantSpec:
    """A copy of ``layer`` with some fields replaced (validated again)."""
    return replace(layer, **changes)
