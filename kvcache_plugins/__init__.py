"""kvcache-plugins: KV-cache compression for Hugging Face transformers, as drop-in ``DynamicCache`` subclasses."""

from ._compat import cache_kwargs
from .caches import (
    CacheBytes,
    CompressedCache,
    LowRankCache,
    MixedPrecisionCache,
    ScoutMaskedCache,
    load_cache,
    question_length,
)
from .diagnostics import LayerDiagnosis, diagnose_layers
from .quant import LayerQuantSpec, TensorQuantSpec
from .scout import Scout, Selection, selection_overlap

__version__ = "0.1.0"

__all__ = [
    "CacheBytes",
    "CompressedCache",
    "LayerDiagnosis",
    "LayerQuantSpec",
    "LowRankCache",
    "MixedPrecisionCache",
    "Scout",
    "ScoutMaskedCache",
    "Selection",
    "TensorQuantSpec",
    "__version__",
    "cache_kwargs",
    "diagnose_layers",
    "load_cache",
    "question_length",
    "selection_overlap",
]
