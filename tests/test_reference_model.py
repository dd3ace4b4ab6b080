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
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvcache_plugins._compat import cache_kwargs
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(REFERENCE_DIR)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(reference_tokenizer_path())!r})\n"
        "assert len(t('<s> K17 V40 ; Q : K17', add_special_tokens=False).input_ids) == 7\n"
        "print(type(m).__name__, m.config.num_key_value_heads < m.config.num_attention_heads, len(t))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
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


def test_shape_of_the_lab_findings(reference):
    # multi-hop prompts: the second hop is read from the (compressed) cache while decoding
    model, tok = reference
    count, tokens = 48, 512

    def score(factory):
        return _accuracy(model, tok, factory, tokens, count, multi_hop=1.0)

    full = score(lambda c, ids: DynamicCache(config=model.config))
    int8 = score(lambda c, ids: MixedPrecisionCache(model, "int8"))
    int4 = score(lambda c, ids: MixedPrecisionCache(model, "int4"))
    mixed = score(lambda c, ids: MixedPrecisionCache(model, "mixed_l0"))
    int2 = score(lambda c, ids: MixedPrecisionCache(model, "int2"))
    assert abs(int8 - full) <= 0.01  # int8 within 1 point of full (here: no prompt of 48 changes; 97.9% both)
    assert int2 < full - 0.3  # int2 collapses (here: 47.9%)
    assert mixed >= int4 - 1 / count  # protecting layer 0 never costs


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
        capture_output=True, text=True, timeout=900, cwd=str(tmp_path),
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
    for r in data["rows"]:  # half of the prompts of each length are single-hop, half multi-hop
        single, multi = r["extra"]["score_single_hop"], r["extra"]["score_multi_hop"]
        assert r["score"] == pytest.approx((single + multi) / 2)


NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "the committed notebook shows its outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    streams = [o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream"]
    assert not any("FutureWarning" in s or "DeprecationWarning" in s for s in streams), streams


def test_encode_once_example_runs_as_two_processes():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "encode_once_answer_elsewhere.py"), "demo", "--questions", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "answered 4 questions from one encoded document" in proc.stdout


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
    assert 0.0 < scores["overlap"] <= 1.0 and scores["full"] >= 0.75
    assert "scout selection EM" in out.getvalue()
