"""Drop-in ``transformers.DynamicCache`` subclasses: containers that compose layers (:mod:`kvcache_plugins.layers`),
selection policy (:mod:`kvcache_plugins.selection`) and the attention callbacks (:mod:`kvcache_plugins.attention`)."""

from ..layers import (
    CacheBytes,
    CompressedLayer,
    KVStream,
    LowRankCompressedLayer,
    LowRankLayer,
    MixedPrecisionLayer,
    RaggedLayer,
)
from ..persist.container import load_cache, model_fingerprint
from ..selection.layout import question_length
from .compressed import CompressedCache
from .lowrank import LowRankCache
from .mixed_precision import MixedPrecisionCache
from .scout_masked import ScoutMaskedCache

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
