"""Diagnostics that tell which layers tolerate which bit widths."""

from .layer_sensitivity import LayerDamage, LayerDiagnosis, classify, diagnose_layers

__all__ = ["LayerDamage", "LayerDiagnosis", "classify", "diagnose_layers"]
