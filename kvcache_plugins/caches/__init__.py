"""Drop-in ``transformers.DynamicCache`` subclasses and their per-layer storage."""

from .accounting import CacheBytes
from .compressed import CompressedCache, CompressedLayer, question_length
from .layers import KVStream, MixedPrecisionLayer
from .mixed_precision import MixedPrecisionCache

__all__ = [
    "CacheBytes",
    "CompressedCache",
    "CompressedLayer",
    "KVStream",
    "MixedPrecisionCache",
    "MixedPrecisionLayer",
    "question_length",
]
