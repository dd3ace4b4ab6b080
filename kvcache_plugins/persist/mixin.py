"""Save/load/fork methods shared by the package's caches (see :mod:`kvcache_plugins.persist.container`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from .coding import compress as code
from .container import cache_from_bytes, cache_to_bytes
from .state import StateReader


class PersistentCache:
    """Mixin: ``save``, ``to_bytes``, ``from_bytes`` and ``fork`` for a cache that records ``model_config``.

    A subclass registered with :func:`~kvcache_plugins.persist.state.register_cache` implements ``to_state``,
    ``from_state`` and (optionally) ``finish_state`` (see :mod:`kvcache_plugins.persist.state`).
    """

    model_config: Any

    def to_bytes(self, compress: str | None = None) -> bytes:
        """The cache as safetensors bytes: its byte accounting plus a small JSON header. ``compress="zstd"`` wraps
        them in one zstd frame (see :mod:`kvcache_plugins.persist.coding`; loading detects it)."""
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
        cache = cache_from_bytes(data, model, tokenizer)
        if not isinstance(cache, cls):
            raise TypeError(f"these bytes hold a {type(cache).__name__}, not a {cls.__name__}")
        return cache

    def finish_state(self, state: StateReader) -> None:
        """Cross-checks once every layer is loaded (none by default)."""

    def fork(self):
        """An independent copy sharing nothing mutable: answer another question from the same encoded context.

        Tensors recorded by autograd (a cache filled without ``torch.no_grad()``) are copied detached: a fork
        holds values, not the graph that produced them.
        """
        memo: dict[int, Any] = {}
        workspace = getattr(self, "workspace", None)
        if workspace is not None:
            memo[id(workspace)] = type(workspace)()
        for t in _graph_tensors(self):
            memo[id(t)] = t.detach().clone()
        return copy.deepcopy(self, memo)


def _graph_tensors(root: Any) -> list[torch.Tensor]:
    """Tensors reachable from ``root`` through attributes, lists, tuples and dicts that ``deepcopy`` cannot copy
    (non-leaf tensors of an autograd graph)."""
    found, seen, stack = [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.grad_fn is not None or obj.requires_grad:
                found.append(obj)
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            stack.extend(vars(obj).values())
    return found
