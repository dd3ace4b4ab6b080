"""Drop-in ``transformers.DynamicCache`` subclasses and their per-layer storage."""

from .accounting import CacheBytes
from .layers import KVStream, MixedPrecisionLayer
from .mixed_precision import MixedPrecisionCache

__all__ = ["CacheBytes", "KVStream", "MixedPrecisionCache", "MixedPrecisionLayer"]
