"""The cache keyword of the installed transformers.

transformers 5.24 renamed the keyword that carries a cache through ``forward`` and ``generate`` from
``past_key_values`` to ``cache`` (the old name warns; removal in 5.40 for ``forward``, 6.0 for ``generate``). Before
5.24 ``forward(cache=...)`` is *silently ignored*. So the package never passes either name unconditionally: every
call site asks :func:`cache_kwargs` for the keyword the model in hand accepts.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

NEW_NAME = "cache"
OLD_NAME = "past_key_values"


@lru_cache(maxsize=None)
def _forward_takes_cache(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    if forward is None:
        return False
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return NEW_NAME in params


def cache_keyword(model: Any) -> str:
    """``"cache"`` when ``model``'s forward takes it (transformers >= 5.24), else ``"past_key_values"``."""
    return NEW_NAME if _forward_takes_cache(type(model)) else OLD_NAME


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``model(...)`` and ``model.generate(...)``: ``model(ids, **cache_kwargs(model, c))``."""
    return {cache_keyword(model): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a model output carries (``.cache`` from 5.24 on, ``.past_key_values`` before), without the
    deprecation message the old attribute logs on new releases."""
    if isinstance(outputs, dict) and NEW_NAME in outputs:
        return outputs[NEW_NAME]
    cache = getattr(outputs, NEW_NAME, None) if NEW_NAME in getattr(type(outputs), "__dataclass_fields__", {}) else None
    if cache is not None:
        return cache
    return getattr(outputs, OLD_NAME, None)
