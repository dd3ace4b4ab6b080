"""The embedded reference model: loads offline, solves its task, and shows the lab's findings in miniature;
``kvcache-bench`` runs by default; the example notebooks execute top to bottom."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, DynamicCache
from conftest import SUBPROCESS_TIMEOUT_S

from kvcache_plugins._compat import cache_kwargs, no_hub_kernels
from kvcache_plugins import MixedPrecisionCache
from kvcache_plugins.specs import make_cache
from kvcache_plugins.reference import (
    REFERENCE_DIR,
    SCOUT_DIR,
    load_reference_model,
    reference_tokenizer_path,
    training_log,
)
from kvcache_plugins.tasks.kv_retrieval import exact_match, make_dataset

ROOT = Path(__file__).resolve().parents[1]
FRESH_SEED = 777_001  # not the training seed, not the training log's evaluation seed


@pytest.fixture(scope="module")
def reference():
    return load_reference_model()


def _accuracy(model, tok, factory, tokens, count, multi_hop=0.0, seed=FRESH_SEED):
    """Exact match over ``count`` fresh prompts; ``factory(examples, input_ids)`` builds each batch's cache."""
    examples = make_dataset(seed + tokens, count, tokens, multi_hop)
    correct = 0
    for start in range(0, count, 8):
        chunk = examples[start : start + 8]
        ids = tok([e.prompt for e in chunk], return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, factory(chunk, ids)),
                             max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        correct += sum(exact_match(t, e) for t, e in zip(tok.batch_decode(out[:, ids.shape[1] :]), chunk))
    return correct / count


def test_loads_offline_with_plain_from_pretrained():
    """What a user writes; from transformers 5.25 on (``kernels`` a hard dependency, ``use_kernels=True`` the
    default) that is ``use_kernels=False`` where ``kernels`` is not installed (see tests/test_hub_kernels.py)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(REFERENCE_DIR)!r}, **{no_hub_kernels()!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(reference_tokenizer_path())!r})\n"
        "assert len(t('<s> K17 V40 ; Q : K17', add_special_tokens=False).input_ids) == 7\n"
        "print(type(m).__name__, m.config.num_key_value_heads < m.config.num_attention_heads, len(t))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=SUBPROCESS_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    name, gqa, _ = out.stdout.split()
    assert name == "Qwen2ForCausalLM" and gqa == "True"
    total = sum(f.stat().st_size for d in (REFERENCE_DIR, SCOUT_DIR) for f in d.rglob("*") if f.is_file())
    assert total < 12 * 2**20  # both models and their tokenizers: a few MB


def test_training_record_is_shipped():
    log = training_log()
    assert {"args", "history", "final", "minutes"} <= set(log)
    assert log["final"]["em_single_512"] >= 0.9 and log["final"]["em_single_2048"] >= 0.9


@pytest.mark.parametrize("tokens", [512, 2048])
def test_full_cache_solves_the_task_on_fresh_samples(reference, tokens):
    model, tok = reference
    count = 48 if tokens == 512 else 24
    acc = _accuracy(model, tok, lambda c, ids: DynamicCache(config=model.config), tokens, count)
    assert acc >= 0.9, acc


@pytest.mark.parametrize("protocol", ["storage", "transmission"])
def test_shape_of_the_lab_findings(reference, protocol):
    # storage: the whole prompt is one forward pass at full precision and quantization applies to what is stored,
    # so only decoding reads it: multi-hop prompts, whose second hop is read from the cache while decoding.
    # transmission (``<preset>@construction``, the lab's protocol): the context is stored quantized before the
    # question is read, so even a single-hop answer (one token) reads it.
    model, tok = reference
    count, tokens = 48, 512
    suffix, multi_hop = ("", 1.0) if protocol == "storage" else ("@construction", 0.0)

    def score(preset):
        return _accuracy(model, tok, lambda c, ids: make_cache(
            preset + suffix, model, question_len=[e.question_len for e in c], tokenizer=tok, input_ids=ids,
            attention_mask=torch.ones_like(ids)), tokens, count, multi_hop=multi_hop)

    full, int8, int4, mixed, int2 = (score(p) for p in ("full", "int8", "int4", "mixed_l0", "int2"))
    # measured, storage (multi-hop): full 97.9%, int8 97.9%, int4 87.5%, mixed_l0 87.5%, int2 47.9%
    # measured, transmission (single-hop): full 100%, int8 100%, int4 93.8%, mixed_l0 91.7%, int2 31.2%
    assert full >= 0.9
    assert abs(int8 - full) <= 0.01  # int8 within 1 point of full
    assert int2 < full - 0.3  # int2 collapses
    # protecting layer 0 never costs more than one prompt of 48 (chance: this model's sensitive layer is layer 1,
    # see test_diagnose_int2_under_transmission_reports_damage)
    assert mixed >= int4 - 1 / count - 1e-9


def test_diagnose_int2_under_transmission_reports_damage(reference):
    # without transmission the first answer token never reads the quantized cache: a single-hop answer (one value)
    # shows no damage at all and int2 would be recommended; read against the int2 context, it collapses
    from kvcache_plugins import diagnose_layers

    model, tok = reference
    examples = make_dataset(FRESH_SEED, 8, 512, multi_hop_share=0.0)
    prompts = [e.prompt for e in examples]
    storage = diagnose_layers(model, tok, prompts, bits=2, answer_tokens=2)
    sent = diagnose_layers(model, tok, prompts, bits=2, answer_tokens=2,
                           question_len=[e.question_len for e in examples])
    assert max(d.kl for d in storage.layers) < 0.01 and storage.recommended_spec == "int2"  # the blind spot
    assert min(d.kl for d in storage.layers + sent.layers) >= 0.0  # clamped: float noise never shows as "-0.00000"
    # measured: layer 1 carries the damage (KL 3.5 nats, top-1 agreement 69%; every other layer < 0.001), so the
    # recommendation is {1: 16, "default": 2}
    assert sent.pattern != "none" and sent.recommended_spec != "int2"
    assert max(d.kl for d in sent.layers) > 1.0 and min(d.top1_agreement for d in sent.layers) < 0.9
    assert sent.answer_positions == 8 * 2 and storage.answer_positions == 8 * 1
    # and the recommendation works: on 48 fresh single-hop prompts under transmission, int2 answers 31.2%, int2
    # with the recommended layer at model precision 97.9% (int2 with layer 0 protected instead: 31.2%)
    from kvcache_plugins.transmission import prefill_context

    def transmitted(spec):
        return _accuracy(model, tok, lambda c, ids: prefill_context(
            model, MixedPrecisionCache(model, spec), ids, question_len=[e.question_len for e in c]), 512, 48)

    assert transmitted(sent.recommended_spec) >= 0.9 and transmitted("int2") < 0.5


def test_bench_shows_int2_collapsing_under_transmission(tmp_path):
    from kvcache_plugins.bench import run

    out = tmp_path / "bench"
    caches = ["full", "int2", "int8@construction", "int2@construction"]
    assert run.main(["--caches", *caches, "--tokens", "512", "--limit", "32", "--out", str(out), "--no-progress"]) == 0
    rows = {r["cache"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    single = {c: rows[c]["extra"]["score_single_hop"] for c in caches}
    # measured: full 100%, int2 (storage) 100%, int8@construction 100%, int2@construction 25%
    assert single["full"] >= 0.9 and single["int2"] >= single["full"] - 1 / 16  # storage: the first token is safe
    assert single["int8@construction"] >= single["full"] - 1 / 16
    assert single["int2@construction"] < single["full"] - 0.4  # transmission: int2 collapses
    assert rows["int2@construction"]["kv_bytes"] < rows["int8@construction"]["kv_bytes"] < rows["full"]["kv_bytes"]


def test_q2c_beats_random_at_25_percent(reference):
    # The selection must act on what the answer is computed from. Applied after a full prefill (post hoc), a
    # single-hop answer comes from the prefill's own attention over the whole prompt, and every selector scores the
    # same. Applied during the prefill (``@construction``: the model scores its prompt, then prefills it with the
    # unselected context hidden), the answer depends on which facts were kept.
    # Measured (4 seeds x 48 prompts): q2c 25% 17-38% vs random 4-12%; q2c 50% 60-81% vs random 23-27%. Q2C's 25% is
    # mostly keys whose values it drops (the question is a key), and each orphan key is a distractor.
    model, tok = reference

    def score(spec, count):
        return _accuracy(model, tok, lambda c, ids: make_cache(
            spec, model, question_len=[e.question_len for e in c], tokenizer=tok, input_ids=ids,
            attention_mask=torch.ones_like(ids)), 512, count)

    q2c, rnd = score("q2c:0.25:global@construction", 96), score("random:0.25:global@construction", 96)
    assert q2c > rnd + 0.04, (q2c, rnd)  # here: 12.5% vs 5.2%
    q2c, rnd = score("q2c:0.5:global@construction", 48), score("random:0.5:global@construction", 48)
    assert q2c > rnd + 0.2, (q2c, rnd)  # here: 72.9% vs 22.9%


def test_bench_default_run(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "kvcache_plugins.bench.run", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    from kvcache_plugins.bench.run import DEFAULT_CACHES

    rows = {(r["cache"], r["tokens"]) for r in data["rows"]}
    assert rows == {(c, n) for c in DEFAULT_CACHES for n in (512, 2048)}
    assert {"torch", "transformers", "device", "dtype", "threads"} <= set(data["environment"])
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "% bw" in proc.stdout and "decode tok/s" in proc.stdout
    assert "single_hop" in proc.stdout and "multi_hop" in proc.stdout
    assert "±" in proc.stdout and "prefill ms/prompt" in proc.stdout
    for r in data["rows"]:  # half of the prompts of each length are single-hop, half multi-hop
        single, multi = r["extra"]["score_single_hop"], r["extra"]["score_multi_hop"]
        assert r["score"] == pytest.approx((single + multi) / 2)
        low, high = r["score_ci95"]
        assert low <= r["score"] <= high and high - low < 0.45  # n >= 20 prompts: a Wilson interval is at most 0.42 wide
        for kind, (low, high) in r["score_ci95_by_kind"].items():
            assert low <= r["extra"][f"score_{kind}"] <= high
        assert r["decode_tokens_per_s"] > 0 and r["prefill_ms"] > 0
    # the findings, with room for the intervals (measured figures in the comments: 512 / 2048 tokens)
    row = {(r["cache"], r["tokens"]): r for r in data["rows"]}

    def kind(cache, tokens, k):
        return row[cache, tokens]["extra"][f"score_{k}"]

    for n in (512, 2048):
        full = row["full", n]
        assert full["score"] >= 0.9  # the reference model solves its task
        assert abs(row["int8", n]["score"] - full["score"]) <= 2 / full["prompts"]  # int8 = full
        assert kind("int2", n, "multi_hop") <= kind("full", n, "multi_hop") - 0.3  # int2 collapses
        for selector in ("q2c", "snapkv", "h2o", "random"):  # post hoc: the first answer token comes from the prefill
            assert kind(f"{selector}:0.25", n, "single_hop") >= 0.9
        # during the prefill SnapKV keeps the asked fact where random does not: intervals apart
        snap = row["snapkv:0.25:global@construction", n]["score_ci95_by_kind"]["single_hop"]
        rand = row["random:0.25:global@construction", n]["score_ci95_by_kind"]["single_hop"]
        assert snap[0] > rand[1], (snap, rand)


NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "the committed notebook shows its outputs"
    saved = [o.get("text", "") for c in nb.cells for o in c.get("outputs", [])]
    assert not any("\r" in t or "it/s]" in t for t in saved), "progress bars in the committed outputs"
    assert any("checks passed" in t for t in saved), "the committed notebook ran its checks"
    # the notebook's last code cells assert its key figures against bounds: an error fails the execution
    NotebookClient(nb, timeout=SUBPROCESS_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    assert any("checks passed" in o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    streams = [o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    assert not any("FutureWarning" in s or "DeprecationWarning" in s for s in streams), streams


def test_encode_once_example_answers_like_the_full_cache(reference, tmp_path):
    import importlib.util
    import re

    script = ROOT / "examples" / "encode_once_answer_elsewhere.py"
    proc = subprocess.run([sys.executable, str(script), "demo"], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"answered 5 questions from one encoded document: (\d+)% exact match", proc.stdout)
    assert found, proc.stdout
    demo = int(found.group(1)) / 100
    # the same document and questions with the full cache, in one process: the model reading the whole prompt
    spec = importlib.util.spec_from_file_location("encode_once", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    document, asked = example.questions_about(512, 5, 7)  # the demo's defaults
    assert all(q.startswith("Q : K") and a.startswith("V") and a.endswith(" </s>") for q, a in asked)
    model, tok = reference
    full = 0
    for question, answer in asked:
        ids = tok(f"{document} {question}", return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        full += tok.decode(out[0, ids.shape[1] :]).startswith(answer)
    assert demo >= 0.8 and demo >= full / 5 - 0.2, (demo, full)  # here: 5 of 5, as the full cache


def test_tokenizer_round_trips_the_task(reference):
    _, tok = reference
    ex = make_dataset(5, 1, 128)[0]
    assert tok.decode(tok(ex.prompt, add_special_tokens=False).input_ids) == ex.prompt
    auto = AutoTokenizer.from_pretrained(reference_tokenizer_path())
    assert auto(ex.prompt, add_special_tokens=False).input_ids == tok(ex.prompt, add_special_tokens=False).input_ids


def test_scout_transfer_report_on_the_embedded_models():
    import io

    from kvcache_plugins.bench.scout_transfer import embedded_report

    out = io.StringIO()
    scores = embedded_report(512, 8, out=out)
    assert {"own", "scout", "full", "overlap"} <= set(scores)
    assert 0.0 < scores["overlap"] < 1.0 and scores["full"] >= 0.75
    # measured (fixed prompts): full 100%, own selection 25%, scout's selection 62.5%, overlap 57%. Keeping half the
    # context costs multi-hop answers, whoever chose it; the scout's choice does at least as well as the model's own
    assert scores["own"] < scores["full"] and scores["scout"] < scores["full"]
    assert scores["scout"] >= scores["own"]
    text = out.getvalue()
    assert f"own selection EM {scores['own']:.1%}" in text and f"scout selection EM {scores['scout']:.1%}" in text
