"""Scout models: a small model chooses the prompt positions, a large model keeps only those."""

from .scout import Scout
from .selection import Selection, kv_cache_bytes, map_selection, selection_overlap, vocabulary_fingerprint

__all__ = ["Scout", "Selection", "kv_cache_bytes", "map_selection", "selection_overlap", "vocabulary_fingerprint"]
