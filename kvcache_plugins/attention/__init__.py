"""Observing the model's attention (queries and masks) for the caches that need it."""

from .observer import attach, attention_modules, detach, is_attached, observing

__all__ = ["attach", "attention_modules", "detach", "is_attached", "observing"]
