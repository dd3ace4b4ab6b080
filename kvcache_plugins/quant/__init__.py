"""Quantization core shared by every cache: packing, group-wise quantization and per-layer specs."""

from .groupwise import QuantizedTensor, packed_nbytes, quantize
from .packing import SUPPORTED_BITS, code_planes, pack, packed_last_dim, unpack
from .spec import PRESETS, LayerQuantSpec, TensorQuantSpec, preset_names, resolve_layer_specs

__all__ = [
    "PRESETS",
    "SUPPORTED_BITS",
    "LayerQuantSpec",
    "QuantizedTensor",
    "TensorQuantSpec",
    "code_planes",
    "pack",
    "packed_last_dim",
    "packed_nbytes",
    "preset_names",
    "quantize",
    "resolve_layer_specs",
    "unpack",
]
