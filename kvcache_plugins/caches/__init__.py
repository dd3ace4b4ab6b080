"""Drop-in ``transformers.DynamicCache`` subclasses and their per-layer storage."""

from .accounting import CacheBytes
from .compressed import CompressedCache, CompressedLayer, question_length
from .layers import KVStream, MixedPrecisionLayer
from .lowrank import LowRankCache, LowRankCompressedLayer, LowRankLayer
from .mixed_precision import MixedPrecisionCache
from .ragged import RaggedLayer
from .scout_masked import ScoutMaskedCache
from .serialization import load_cache, model_fingerprint

__all__ = [
    "CacheBytes",
    "CompressedCache",
    "CompressedLayer",
    "KVStream",
    "LowRankCache",
    "LowRankCompressedLayer",
    "LowRankLayer",
    "MixedPrecisionCache",
    "MixedPrecisionLayer",
    "RaggedLayer",
    "ScoutMaskedCache",
    "load_cache",
    "model_fingerprint",
    "question_length",
]
