"""The demo and benchmark scripts run end to end (small sizes) and report what they promise."""

from __future__ import annotations

import io

from kvcache_plugins import demo
from kvcache_plugins.bench import quant_decode


def test_demo_runs_and_full_preset_is_exact():
    out = io.StringIO()
    rows = demo.run(prompt_tokens=96, new_tokens=6, out=out)
    by_name = {r["cache"]: r for r in rows}
    assert set(by_name) == set(demo.PRESETS)
    assert by_name["full"]["max_dlogp"] == 0.0 and by_name["full"]["same_tokens"] == 6
    assert by_name["int4"]["bytes"] < by_name["int8"]["bytes"] < by_name["full"]["bytes"]
    assert "bandwidth" in out.getvalue()


def test_quant_decode_benchmark_reports_ratios_and_closed_form():
    out = io.StringIO()
    rows = quant_decode.run([160], steps=4, rounds=1, dtype=quant_decode.torch.float32, out=out)
    names = {r["cache"] for r in rows}
    assert {"DynamicCache", "Mixed int4", "Mixed mixed_l0", "Mixed int8", "QuantizedCache quanto int4"} <= names
    for r in rows:
        if r["cache"].startswith("Mixed"):
            assert r["bytes"] == r["closed_form_bytes"]
        assert r["ratio_vs_dynamic"] > 0
    text = out.getvalue()
    assert "x Dyn" in text and "x Quanto" in text
