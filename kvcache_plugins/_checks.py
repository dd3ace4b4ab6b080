"""Strict checks of the numbers and names users pass: ints are ints, booleans are not numbers, ranges are
checked, and every error names what is allowed (``TypeError`` for a wrong type, ``ValueError`` for a wrong value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch


def _is_int(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an ``int`` in ``[lo, hi]``; ``TypeError`` for floats, strings and booleans."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{_range(lo, hi)}, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an int{_range(lo, hi)}, got {value}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """``value`` as a ``float`` in ``(0, 1]``; ``TypeError`` for strings and booleans."""
    if isinstance(value, bool) or not isinstance(value, Real) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be in (0, 1] (a number), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return value


def check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite ``float`` in ``[lo, hi]``; ``TypeError`` for strings, booleans and tensors."""
    if lo is not None and hi is not None:
        allowed = f"in [{lo:g}, {hi:g}]"
    elif lo is not None:
        allowed = f">= {lo:g}"
    else:
        allowed = f"<= {hi:g}" if hi is not None else "finite"
    if isinstance(value, bool) or not isinstance(value, Real) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be {allowed} (a number), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {allowed} (a finite number), got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if not (value is None and None in choices) and not (isinstance(value, str) and value in choices):
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")
    return value


def check_row_counts(name: str, value: Any) -> int | list[int]:
    """A non-negative ``int`` for every row, or one per row (a sequence or 1-D integer tensor)."""
    if _is_int(value):
        return check_int(name, value, 0)
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be an int or one int per row, got a {value.dtype} tensor of shape {list(value.shape)}"
            )
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not len(value):
        raise TypeError(f"{name} must be an int or a non-empty list with one int per row, got {value!r}")
    return [check_int(f"{name}[{i}]", v, 0) for i, v in enumerate(value)]


def _range(lo: int | None, hi: int | None) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return " >= 0" if lo == 0 else f" >= {lo}"
    return f" in [{lo}, {hi}]"


# ------------------------------------------------------------------ non-finite key/value states
def nonfinite_found(t: torch.Tensor) -> str:
    """What non-finite values ``t`` holds, e.g. ``"NaN (2 values) and +Inf (1 value)"``; ``""`` if none."""
    found = []
    for name, mask in (("NaN", torch.isnan(t)), ("+Inf", torch.isposinf(t)), ("-Inf", torch.isneginf(t))):
        n = int(mask.sum())
        if n:
            found.append(f"{name} ({n} value{'s' if n > 1 else ''})")
    return " and ".join(found)


def nonfinite_error(what: str, found: str, layer_idx: int | None = None) -> ValueError:
    where = "" if layer_idx is None else f"layer {layer_idx}: "
    return ValueError(
        f"{where}the {what} hold {found}; a quantized or low-rank cache cannot store non-finite states (a diverging "
        "model or an overflowing fp16 cast?); 16-bit layers (DynamicCache) store them as they are"
    )


def check_finite_states(keys: torch.Tensor, values: torch.Tensor, layer_idx: int | None = None) -> None:
    """``ValueError`` naming the layer, keys or values, and NaN / +Inf / -Inf, if either tensor is not finite.

    One pass and one host sync: call it where states enter a path that scores, factorises or quantizes them outside
    the decode hot path (there the quantizer's own range check finds them, see :func:`explain_nonfinite`)."""
    if bool(torch.isfinite(keys).all() & torch.isfinite(values).all()):
        return
    explain_nonfinite(keys, values, layer_idx)


def explain_nonfinite(keys: torch.Tensor, values: torch.Tensor, layer_idx: int | None = None) -> None:
    """After a failed range check: raise the clear error if ``keys`` or ``values`` hold non-finite values."""
    for what, t in (("keys", keys), ("values", values)):
        found = nonfinite_found(t)
        if found:
            raise nonfinite_error(what, found, layer_idx)
