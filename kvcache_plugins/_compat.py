"""The cache keyword of the installed transformers.

transformers 5.24 renamed the keyword that carries a cache through ``forward`` and ``generate`` from
``past_key_values`` to ``cache`` (the old name warns; removal in 5.40 for ``forward``, 6.0 for ``generate``). Before
5.24 ``forward(cache=...)`` is *silently ignored* and ``generate(cache=...)`` raises. So the package never passes
either name unconditionally: every call site asks :func:`cache_kwargs` for the keyword the model in hand accepts.
Users can do the same: ``model.generate(ids, **kvcache_plugins.cache_kwargs(model, cache))`` runs on every release.

transformers 5.25 made ``from_pretrained`` kernelize models from the Hub by default (``use_kernels=True``, with
``kernels`` a hard dependency): without ``kernels`` every load raises, with it a load may fetch code from the Hub.
The package's own loads ask :func:`no_hub_kernels` for the keyword that keeps them offline and on torch's kernels.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import DynamicLayer

NEW_NAME = "cache"
OLD_NAME = "past_key_values"
#: the first transformers release whose models take ``cache=``
RENAMED_IN = Version("5.24.0")
#: the first transformers release whose ``from_pretrained`` defaults to ``use_kernels=True``
KERNELS_BY_DEFAULT_IN = Version("5.25.0")


def _installed_takes_new_name() -> bool:
    return Version(Version(transformers.__version__).base_version) >= RENAMED_IN


@lru_cache(maxsize=1)
def _installed_kernelizes_by_default() -> bool:
    return Version(Version(transformers.__version__).base_version) >= KERNELS_BY_DEFAULT_IN


def no_hub_kernels() -> dict[str, Any]:
    """Keywords for the package's own ``from_pretrained`` calls so that they never use hub kernels:
    ``{"use_kernels": False}`` from transformers 5.25 on (where the default became ``True``), ``{}`` before (where
    hub kernels were opt-in). ``AutoModelForCausalLM.from_pretrained(path, **no_hub_kernels())`` then loads offline
    whether or not ``kernels`` is installed, and ``model.train()`` does not kernelize either. A user's own loads
    are left as they wrote them."""
    return {"use_kernels": False} if _installed_kernelizes_by_default() else {}


@lru_cache(maxsize=None)
def _keyword_of_class(cls: type) -> str | None:
    """The cache keyword ``cls.forward`` names, or ``None`` when it names neither (a wrapper's ``**kwargs``)."""
    forward = getattr(cls, "forward", None)
    if forward is None:
        return None
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    if NEW_NAME in params:
        return NEW_NAME
    if OLD_NAME in params:
        return OLD_NAME
    return None


def cache_keyword(model: Any) -> str:
    """``"cache"`` when ``model``'s forward takes it (transformers >= 5.24), else ``"past_key_values"``.

    Read off the forward signature; wrappers (``DistributedDataParallel``, PEFT) are looked through, and a forward
    that names neither keyword falls back to the installed transformers version.
    """
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        keyword = _keyword_of_class(type(model))
        if keyword is not None:
            return keyword
        inner = getattr(model, "module", None)  # torch's DataParallel / DistributedDataParallel
        if inner is None and hasattr(model, "get_base_model"):  # PEFT
            inner = model.get_base_model()
        model = inner
    return NEW_NAME if _installed_takes_new_name() else OLD_NAME


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


@lru_cache(maxsize=1)
def _crop_takes_length() -> bool:
    """Whether the installed ``DynamicLayer.crop(n)`` reads ``n >= 0`` as the length to keep (5.4) rather than
    refusing positive values (5.23, 5.24). Asked of transformers' own layer, so our layers agree with it."""
    probe = DynamicLayer()
    states = torch.zeros(1, 1, 2, 1)
    probe.update(states, states)
    try:
        probe.crop(1)
    except ValueError:
        return False
    return True


def crop_count(length: int, tokens_to_remove: int) -> int:
    """How many of the newest tokens ``crop(tokens_to_remove)`` drops from a layer holding ``length`` tokens, the way
    the installed ``DynamicLayer.crop`` does it: ``-n`` drops ``n``; ``n >= 0`` keeps ``n`` on releases that take a
    length (so ``crop(0)`` empties the layer there), and on newer ones ``0`` drops nothing and ``n > 0`` is refused
    with transformers' own ``ValueError``."""
    if tokens_to_remove < 0:
        return min(length, -tokens_to_remove)
    if _crop_takes_length():
        return max(0, length - tokens_to_remove)
    if tokens_to_remove == 0:
        return 0
    DynamicLayer().crop(tokens_to_remove)  # raises transformers' own message
    raise ValueError(f"crop({tokens_to_remove}): use a negative count of tokens to remove")  # pragma: no cover
