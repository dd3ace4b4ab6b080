"""Token selectors, one per file, behind one contract: ``score(ScoreContext) -> [B, H, n]`` (higher is kept).

Add a selector by writing a ``Selector`` subclass with a ``name`` and a ``score`` method and decorating it with
``@register``; ``CompressedCache(selector="<name>")`` then finds it.
"""

from .base import (
    PromptLayout,
    ScoreContext,
    Selector,
    context_budget,
    make_selector,
    register,
    select,
    select_slots,
    selector_names,
)
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .keydiff import KeyDiff
from .knorm import KNorm
from .lagkv import LagKV
from .q2c import Q2C
from .random import RandomSelector
from .snapkv import SnapKV
from .streaming import Streaming
from .tova import TOVA

__all__ = [
    "ExpectedAttention",
    "H2O",
    "KNorm",
    "KeyDiff",
    "LagKV",
    "PromptLayout",
    "Q2C",
    "RandomSelector",
    "ScoreContext",
    "Selector",
    "SnapKV",
    "Streaming",
    "TOVA",
    "context_budget",
    "make_selector",
    "register",
    "select",
    "select_slots",
    "selector_names",
]
