"""What the lm-eval startup hook calls right after lm-eval imports one of its modules."""

from __future__ import annotations

from typing import Any


def patch_hflm_module(module: Any) -> None:
    from .lm_eval_model import patch_hflm

    patch_hflm(module.HFLM)


def patch_evaluator_module(module: Any) -> None:
    from .lm_eval_model import patch_evaluator

    patch_evaluator(module)
