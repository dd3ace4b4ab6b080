"""Selection policy on plain tensors (never importing a layer or a cache): scorers, budgets, the prompt layout, the
selection plan and decode eviction.

Scorers, one per file, behind one contract: ``score(ScoreContext) -> [B, H, n]`` over a prompt and
``score_held(HeldContext) -> [B, H, T]`` over the slots held during a chunked prefill (higher is kept). Add a
selector by writing a ``Selector`` subclass with a ``name``, ``score`` and (to prefill in chunks) ``score_held``,
decorated with ``@register``; ``CompressedCache(selector="<name>")`` then finds it, chunked or not.
"""

from .base import (
    HeldContext,
    ScoreContext,
    Selector,
    chunked_selector_names,
    context_budget,
    make_selector,
    register,
    select,
    select_slots,
    selector_names,
)
from .layout import PromptLayout, left_padding, per_row, slot_roles
from .plan import Cut, SelectionPlan
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
    "Cut",
    "ExpectedAttention",
    "H2O",
    "HeldContext",
    "KNorm",
    "KeyDiff",
    "LagKV",
    "PromptLayout",
    "Q2C",
    "RandomSelector",
    "ScoreContext",
    "SelectionPlan",
    "Selector",
    "SnapKV",
    "Streaming",
    "TOVA",
    "chunked_selector_names",
    "context_budget",
    "left_padding",
    "make_selector",
    "per_row",
    "register",
    "select",
    "select_slots",
    "selector_names",
    "slot_roles",
]
