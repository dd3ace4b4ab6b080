"""kvcache-plugins: KV-cache compression for Hugging Face transformers, as drop-in ``DynamicCache`` subclasses."""

from .caches import CacheBytes, CompressedCache, MixedPrecisionCache, question_length
from .diagnostics import LayerDiagnosis, diagnose_layers
from .quant import LayerQuantSpec, TensorQuantSpec

__version__ = "0.1.0"

__all__ = [
    "CacheBytes",
    "CompressedCache",
    "LayerDiagnosis",
    "LayerQuantSpec",
    "MixedPrecisionCache",
    "TensorQuantSpec",
    "__version__",
    "diagnose_layers",
    "question_length",
]
