"""kvcache-plugins: KV-cache compression for Hugging Face transformers, as drop-in ``DynamicCache`` subclasses."""

from .caches import CacheBytes, MixedPrecisionCache
from .diagnostics import LayerDiagnosis, diagnose_layers
from .quant import LayerQuantSpec, TensorQuantSpec

__version__ = "0.1.0"

__all__ = [
    "CacheBytes",
    "LayerDiagnosis",
    "LayerQuantSpec",
    "MixedPrecisionCache",
    "TensorQuantSpec",
    "__version__",
    "diagnose_layers",
]
