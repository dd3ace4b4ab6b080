"""Procedurally generated tasks shipped with the package (the embedded reference model is trained on them)."""

from .kv_retrieval import Example, exact_match, make_dataset, make_example, vocabulary

__all__ = ["Example", "exact_match", "make_dataset", "make_example", "vocabulary"]
