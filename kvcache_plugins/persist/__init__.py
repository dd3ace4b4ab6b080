"""Saving, loading and sending caches: the state contract (``state``), the container (``container``: safetensors +
JSON metadata + digest + validation), the optional zstd frame (``coding``) and the cache methods (``mixin``).
Knows no concrete cache or layer class: those register themselves by kind name."""
