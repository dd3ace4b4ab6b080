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
    rows = quant_decode.run([160], steps=4, rounds=1, dtype=quant_decode.torch.float32, out=out, h2o=True)
    names = {r["cache"] for r in rows}
    assert {"DynamicCache", "Mixed int4", "Mixed mixed_l0", "Mixed int8", "QuantizedCache quanto int4"} <= names
    by_name = {r["cache"]: r for r in rows if r["batch"] == 1}
    # the prompt replayed into every cache: quantized caches reproduce DynamicCache's greedy tokens here, and the
    # fused h2o cache the reference path's
    assert by_name["Mixed int8"]["same_tokens"] and by_name["Compressed h2o int4"]["same_tokens"]
    assert by_name["Compressed h2o int4"]["same_tokens_as"] == "Compressed h2o int4 ref"
    assert by_name["Compressed h2o int4"]["bytes"] < by_name["Mixed int4"]["bytes"]  # it keeps half the prompt
    for r in rows:
        if r["cache"].startswith("Mixed"):
            assert r["bytes"] == r["closed_form_bytes"]
        assert r["ratio_vs_dynamic"] > 0
    text = out.getvalue()
    assert "x Dyn" in text and "x Quanto" in text and "warm-up s" in text and "h2o decode from the packed codes" in text
