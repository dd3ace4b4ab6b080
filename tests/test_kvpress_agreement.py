"""The kvpress agreement script's own plumbing (kvpress itself is never needed: it runs in another environment)."""

from __future__ import annotations

import ast
import json
import sys

import pytest

from kvcache_plugins.bench import kvpress_agreement as agreement
from kvcache_plugins.reference import reference_available

pytestmark = pytest.mark.skipif(not reference_available(), reason="the embedded reference model is not installed")


def test_exports_inputs_and_compares_positions(tmp_path, capsys):
    assert agreement.main(["--out", str(tmp_path), "--tokens", "300"]) == 0
    assert "kvpress_side.py" in capsys.readouterr().out
    ast.parse((tmp_path / "kvpress_side.py").read_text())  # valid Python for the other environment
    inputs = json.loads((tmp_path / "inputs.json").read_text())
    assert set(inputs["methods"]) == set(agreement.METHODS) and 290 <= len(inputs["ids"]) <= 300
    assert "kvpress" not in sys.modules  # never imported here
    ours = agreement.our_positions(inputs)
    kept = int(len(inputs["ids"]) * 0.25)
    heads = ours["snapkv"]["0"]
    assert len(heads) == 2 and all(len(h) == kept for h in heads)
    assert sum(len(h) for h in ours["snapkv+adakv"]["0"]) == 2 * kept
    # a "kvpress" result equal to ours agrees fully; one that keeps other positions does not
    theirs = {"kvpress_version": "test", "transformers": "test", "methods": ours}
    (tmp_path / "same.json").write_text(json.dumps(theirs))
    agreement.main(["--out", str(tmp_path), "--tokens", "300", "--kvpress-positions", str(tmp_path / "same.json")])
    report = json.loads((tmp_path / "agreement.json").read_text())
    assert all(r["overlap"] == 1.0 for r in report.values())
    shifted = {layer: [[p + 1 for p in h] for h in hs] for layer, hs in ours["knorm"].items()}
    assert agreement.overlap(ours["knorm"], shifted)[0] < 1.0
    with pytest.raises(ValueError, match=r"--compression must be in \(0, 1\)"):
        agreement.main(["--out", str(tmp_path), "--compression", "1.5"])
