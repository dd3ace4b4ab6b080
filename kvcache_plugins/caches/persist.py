"""Save/load/fork methods shared by the package's caches (see :mod:`kvcache_plugins.caches.serialization`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


class PersistentCache:
    """Mixin: ``save``, ``to_bytes``, ``from_bytes`` and ``fork`` for a cache that records ``model_config``."""

    model_config: Any

    def to_bytes(self, compress: str | None = None) -> bytes:
        """The cache as safetensors bytes: its byte accounting plus a small JSON header; ``compress="zstd"`` wraps
        them in a zstd frame (see :mod:`kvcache_plugins.caches.coding`; loading detects it)."""
        from .coding import compress as code
        from .serialization import cache_to_bytes

        return code(cache_to_bytes(self, self.model_config), compress)

    def save(self, path: str | Path, compress: str | None = None) -> int:
        """Write the cache to ``path`` (safetensors + JSON metadata, zstd-coded with ``compress="zstd"``); returns
        the bytes written."""
        data = self.to_bytes(compress)
        Path(path).write_bytes(data)
        return len(data)

    @classmethod
    def from_bytes(cls, data: bytes, model: Any, tokenizer: Any = None):
        """Rebuild a cache from :meth:`to_bytes` output for ``model`` (the saved class, which must be ``cls``)."""
        from .serialization import cache_from_bytes

        cache = cache_from_bytes(data, model, tokenizer)
        if not isinstance(cache, cls):
            raise TypeError(f"these bytes hold a {type(cache).__name__}, not a {cls.__name__}")
        return cache

    def fork(self):
        """An independent copy sharing nothing mutable: answer another question from the same encoded context."""
        memo: dict[int, Any] = {}
        workspace = getattr(self, "workspace", None)
        if workspace is not None:
            memo[id(workspace)] = type(workspace)()
        return copy.deepcopy(self, memo)
