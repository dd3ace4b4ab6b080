"""kvcache-bench on a local model and fixture data (the path a GPU user takes with a real model)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import FIXTURES, make_text_model

from kvcache_plugins.bench import run
from kvcache_plugins.bench.plot import figure, series_name
from kvcache_plugins.specs import parse_spec


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_text_model(str(tmp_path_factory.mktemp("benchmodel")))


def test_bench_runs_a_local_model_on_fixture_data(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    caches = ["full", "int4", "q2c:0.5", "snapkv:0.5+int8", "full@construction", "int4@construction"]
    assert run.main([
        "--model", model_dir, "--task", "kv_squad_v2", "--data", f"{FIXTURES}/squad_v2.jsonl", "--limit", "6",
        "--caches", *caches, "--out", str(out), "--no-progress", "--batch-size", "3",
    ]) == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["cache"]: r for r in data["rows"]}
    assert list(rows) == caches
    assert rows["int4"]["kv_bytes"] < rows["full"]["kv_bytes"]
    assert rows["q2c:0.5"]["bandwidth"] < rows["full"]["bandwidth"]
    # the transmission protocol (padded batches, a question length per prompt): lossless with the full cache
    assert rows["full@construction"]["score"] == rows["full"]["score"]
    assert rows["int4@construction"]["bandwidth"] == pytest.approx(rows["int4"]["bandwidth"], rel=0.05)
    assert all(r["prompts"] == 6 and 0.0 <= r["score"] <= 1.0 for r in rows.values())
    assert {"score_has_answer", "score_no_answer", "mean_prompt_tokens"} <= set(rows["full"]["extra"])
    assert data["environment"]["dtype"] == "torch.float32"
    assert "task: kv_squad_v2" in capsys.readouterr().out


def test_bench_needle_in_a_haystack_lengths(model_dir, tmp_path):
    out = tmp_path / "out"
    run.main([
        "--model", model_dir, "--task", "kv_niah", "--data", f"{FIXTURES}/squad_v2.jsonl", "--tokens", "192", "256",
        "--limit", "2", "--caches", "full", "q2c:0.25", "--out", str(out), "--no-progress",
    ])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["cache"], r["tokens"]) for r in rows} == {(c, n) for c in ("full", "q2c:0.25") for n in (192, 256)}
    assert all(r["extra"]["mean_prompt_tokens"] <= r["tokens"] for r in rows)


def test_bad_arguments_are_usage_errors_before_loading(tmp_path, capsys):
    # argparse's convention: a message naming what is allowed, exit code 2, no traceback, and no model loaded
    for argv, message in [
        (["--model", "/nonexistent", "--caches", "full", "int5"], "invalid cache spec 'int5'"),
        (["--model", "/nonexistent", "--task", "kv_nope"], "unknown benchmark task 'kv_nope'"),
        (["--task", "kv_squad_v2", "--data", f"{FIXTURES}/squad_v2.jsonl"], "reads only its own task"),
        (["--limit", "0"], "must be at least 1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            run.main([*argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "usage: kvcache-bench" in err and "Traceback" not in err


def test_every_flag_has_help():
    parser = run.build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_rows_carry_intervals_and_the_decode_pass_changes_no_answer(model_dir, tmp_path):
    # the decode timing continues the first batch after scoring: scores and bytes must equal a run without it
    common = ["--model", model_dir, "--task", "kv_squad_v2", "--data", f"{FIXTURES}/squad_v2.jsonl", "--limit", "6",
              "--caches", "full", "int4", "q2c:0.5", "--no-progress", "--batch-size", "3"]
    run.main([*common, "--out", str(tmp_path / "timed"), "--decode-steps", "8"])
    run.main([*common, "--out", str(tmp_path / "untimed"), "--decode-steps", "0"])
    timed = json.loads((tmp_path / "timed" / "results.json").read_text())
    untimed = json.loads((tmp_path / "untimed" / "results.json").read_text())
    assert timed["environment"]["decode_steps"] == 8
    for a, b in zip(timed["rows"], untimed["rows"]):
        same = ("cache", "score", "kv_bytes", "extra")
        assert [a[k] for k in same] == [b[k] for k in same]
        assert a["decode_tokens_per_s"] > 0 and math.isnan(b["decode_tokens_per_s"])
        low, high = a["score_ci95"]
        assert low <= a["score"] <= high and high - low > 0.1  # 6 prompts: a wide interval
        for kind, (low, high) in a["score_ci95_by_kind"].items():
            assert low <= a["extra"][f"score_{kind}"] <= high
    assert [r["series"] for r in timed["rows"]] == ["full", "int4", "q2c"]
    assert [r["retention"] for r in timed["rows"]] == [None, None, 0.5]


@pytest.mark.parametrize("text, series", [
    ("full", "full"), ("int4", "int4"), ("q2c:0.5", "q2c"), ("q2c:0.5+mixed_l0", "q2c+mixed_l0"),
    ("snapkv:1:head", "snapkv:head"), ("q2c:0.25:global@construction", "q2c:global@construction"),
    ("scout=embedded:q2c:0.5@construction", "scout=embedded:q2c@construction"),
])
def test_series_is_the_spec_without_its_retention(text, series):
    assert series_name(parse_spec(text)) == series


def _default_grid_rows() -> list:
    """Rows of the default grid at two lengths with made-up scores and intervals (no model runs)."""
    rows = []
    for tokens in (512, 2048):
        for i, text in enumerate(run.DEFAULT_CACHES):
            spec = parse_spec(text)
            score = 1.0 - (i % 7) / 10
            bandwidth = spec.retention or {"int8": 0.28, "int4": 0.16, "int2": 0.09, "mixed_l0": 0.37}.get(text, 1.0)
            ci = [score - 0.1, min(1.0, score + 0.08)]
            rows.append(run.Row(text, tokens, "kv_retrieval", score=score, score_ci95=ci, series=series_name(spec),
                                retention=spec.retention, bandwidth=bandwidth, prompts=48))
    return rows


def test_plot_draws_a_line_per_series_with_error_bars_and_no_overlapping_text():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.container import ErrorbarContainer
    from matplotlib.text import Text

    rows = _default_grid_rows()
    fig = figure(rows)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2  # one panel per length
    series = {r.series for r in rows} - {"full"}
    for ax, tokens in zip(axes, (512, 2048)):
        bars = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
        assert set(bars) == series
        q2c = [r for r in rows if r.series == "q2c" and r.tokens == tokens]
        line = bars["q2c"].lines[0]
        assert list(line.get_ydata()) == [r.score for r in sorted(q2c, key=lambda r: r.bandwidth)]
        assert line.get_linestyle() == "-" and bars["q2c:global@construction"].lines[0].get_marker() == "^"
        assert bars["int8"].lines[0].get_linestyle() == "None"  # a preset is a point, not a line
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip()]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"
    legend_texts = {t.get_text() for t in fig.legends[0].get_texts()}
    assert series <= legend_texts
