"""kvcache-bench on a local model and fixture data (the path a GPU user takes with a real model)."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, make_text_model

from kvcache_plugins.bench import run


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


def test_bad_arguments_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="invalid cache spec 'int5'"):
        run.main(["--model", "/nonexistent", "--caches", "full", "int5", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown benchmark task 'kv_nope'"):
        run.main(["--model", "/nonexistent", "--task", "kv_nope", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="reads only its own task"):
        run.main(["--task", "kv_squad_v2", "--data", f"{FIXTURES}/squad_v2.jsonl", "--out", str(tmp_path)])
