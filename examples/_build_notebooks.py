"""Builds the example notebooks from the cell sources below; ``--execute`` also runs them and stores the outputs.

    python examples/_build_notebooks.py --execute

The committed notebooks carry their outputs (tables, plots), as Hub example notebooks do. The test suite executes
every notebook again, so they cannot rot.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """import os, warnings
os.environ.setdefault("TQDM_DISABLE", "1")  # static outputs: no progress bars in the saved notebook
warnings.filterwarnings("ignore", message="IProgress not found")
import torch
import transformers
transformers.utils.logging.disable_progress_bar()
from kvcache_plugins import cache_kwargs  # {"cache": c} on transformers >= 5.24, {"past_key_values": c} before
from kvcache_plugins.reference import load_reference_model
from kvcache_plugins.tasks.kv_retrieval import make_dataset, exact_match

torch.manual_seed(0)
model, tokenizer = load_reference_model()   # shipped with the package: no download
print(model.config.model_type, model.config.num_hidden_layers, "layers,", sum(p.numel() for p in model.parameters()), "parameters")"""

EVAL_HELPER = """def evaluate(make_cache, tokens=512, count=48, multi_hop_share=1.0, seed=7):
    \"\"\"Exact match and mean KV bytes of a cache factory on held-out retrieval prompts (batched, greedy).\"\"\"
    examples = make_dataset(seed + tokens, count, tokens, multi_hop_share)
    correct, kv, ref = 0, 0, 0
    for start in range(0, count, 8):
        chunk = examples[start : start + 8]
        ids = tokenizer([e.prompt for e in chunk], return_tensors="pt", add_special_tokens=False).input_ids
        cache = make_cache(chunk)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=4,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, ids.shape[1]:])
        correct += sum(exact_match(t, e) for t, e in zip(texts, chunk))
        if hasattr(cache, "memory_footprint"):
            fp = cache.memory_footprint()
            kv += fp.total
            ref += fp.reference * model.dtype.itemsize // 2  # the footprint's reference is 16-bit K/V
        else:
            held = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
            kv += held
            ref += held
    # bandwidth: bytes held over what a full cache holds for the same tokens in the model dtype
    return correct / count, kv / count, kv / ref"""

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "01_quickstart.ipynb": [
        ("md", """# Quickstart: compress the KV cache of a model you already use

`kvcache-plugins` caches are drop-in `transformers.DynamicCache` subclasses: pass one to `model.generate` (as
`cache=` on transformers >= 5.24, as `past_key_values=` before; both are supported) and the cache is compressed while
the model runs. The cells write `**cache_kwargs(model, cache)`, which picks the keyword of the installed release. This
notebook uses the embedded reference model, a small Qwen2 trained on a key-value retrieval task that ships with the
package, so it runs offline on a CPU."""),
        ("code", SETUP),
        ("md", "A prompt of the task: facts, then a question about one of them."),
        ("code", """example = make_dataset(seed=1, count=1, num_tokens=160)[0]
print(example.prompt[:200], "...", example.prompt[-40:])
print("answer:", example.answer)"""),
        ("md", "Generate with a plain `DynamicCache` and with a `MixedPrecisionCache` (`mixed_l0`: layer 0 at model precision, the other layers int4)."),
        ("code", """from transformers import DynamicCache
from kvcache_plugins import MixedPrecisionCache

ids = tokenizer(example.prompt, return_tensors="pt", add_special_tokens=False).input_ids
for name, cache in [("DynamicCache", DynamicCache(config=model.config)), ("mixed_l0", MixedPrecisionCache(model, "mixed_l0"))]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=4, do_sample=False)
    print(f"{name:>12}: {tokenizer.decode(out[0, ids.shape[1]:])}")"""),
        ("md", "What the compressed cache really holds: packed codes, scales and zeros, counted byte by byte."),
        ("code", """fp = cache.memory_footprint()
print(fp)
print(f"bandwidth: {fp.bandwidth:.1%} of 16-bit keys and values")
print(cache.describe())"""),
        ("md", """Accuracy and bytes over 48 held-out multi-hop prompts of 512 tokens, for a few presets. Multi-hop because the
first answer token comes from the prefill, which attends to the whole uncompressed prompt; the second hop is looked
up in the compressed cache while decoding, which is where a cache can lose the answer."""),
        ("code", EVAL_HELPER),
        ("code", """rows = []
for preset in ["full", "int8", "int4", "mixed_l0", "int2"]:
    factory = (lambda chunk: DynamicCache(config=model.config)) if preset == "full" else (lambda chunk, p=preset: MixedPrecisionCache(model, p))
    em, kv, bw = evaluate(factory)
    rows.append((preset, em, kv, bw))
print(f"{'cache':<10}{'exact match':>12}{'KV bytes':>12}{'bandwidth':>11}")
for name, em, kv, bw in rows:
    print(f"{name:<10}{em:>12.1%}{kv:>12,.0f}{bw:>11.1%}")"""),
        ("md", "With 48 prompts a score moves by about ±10 points between samples, so the checks below compare within that."),
        ("code", """# checks: the test suite runs this notebook, and these bounds must hold
em = {name: e for name, e, _, _ in rows}
bw = {name: b for name, _, _, b in rows}
assert em["full"] >= 0.8 and abs(em["int8"] - em["full"]) <= 1 / 48  # int8 = full, to one prompt
assert em["int2"] <= em["full"] - 0.3                                  # int2 collapses
assert abs(em["mixed_l0"] - em["int4"]) <= 0.1                         # equal within the noise of 48 prompts
assert 0.27 < bw["int8"] < 0.29 and bw["int4"] < bw["mixed_l0"] < 0.5
print("checks passed")"""),
    ],
    "02_mixed_precision_and_diagnose.ipynb": [
        ("md", """# Mixed precision and the layer diagnostic

The lab found that INT4 damage in Qwen2.5-7B sits in layer 0 alone, so keeping layer 0 at full precision
(`mixed_l0`) recovers the accuracy. `diagnose_layers` runs that protocol on any model: quantize one layer at a time,
measure the damage, and recommend a spec."""),
        ("code", SETUP),
        ("code", """from kvcache_plugins import diagnose_layers, MixedPrecisionCache

prompts = [tokenizer(e.prompt, return_tensors="pt", add_special_tokens=False).input_ids
           for e in make_dataset(seed=3, count=6, num_tokens=256)]
for bits in (4, 2):
    result = diagnose_layers(model, tokenizer, prompts, bits=bits, answer_tokens=3, group_size=32)
    print(f"--- int{bits}")
    print(result)"""),
        ("md", "Specs can set every layer's width and grouping: a dict with a default, keys and values apart, a residual window."),
        ("code", """specs = {
    "int4": "int4",
    "layer 0 at 8 bits": {0: 8, "default": 4},
    "keys 8 / values 4": {"default": {"key": 8, "value": 4}},
    "kivi4 (channel keys)": "kivi4",
}
ids = prompts[0]
for name, spec in specs.items():
    cache = MixedPrecisionCache(model, spec, group_size=32)
    model(ids, **cache_kwargs(model, cache))
    fp = cache.memory_footprint()
    print(f"{name:<22} {fp.total:>9,} bytes  {fp.bandwidth:6.1%} bandwidth")"""),
        ("md", "Bytes against accuracy, as a plot:"),
        ("code", EVAL_HELPER),
        ("code", """import matplotlib.pyplot as plt
from transformers import DynamicCache

points = {}
for preset in ["full", "int8", "int4", "mixed_l0", "int3", "int2"]:
    factory = (lambda c: DynamicCache(config=model.config)) if preset == "full" else (lambda c, p=preset: MixedPrecisionCache(model, p))
    em, kv, bw = evaluate(factory, tokens=512, count=32)
    points[preset] = (bw, em)
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, (bw, em) in points.items():
    ax.scatter(bw * 100, em)
    ax.annotate(name, (bw * 100, em), fontsize=8, xytext=(3, 3), textcoords="offset points")
ax.set_xlabel("% bandwidth"); ax.set_ylabel("exact match"); ax.set_title("quantization presets, 512-token prompts")
ax.grid(alpha=0.3)
plt.show()"""),
        ("code", """# checks: the test suite runs this notebook, and these bounds must hold
em = {name: e for name, (_, e) in points.items()}
assert abs(em["int8"] - em["full"]) <= 1 / 32 and em["int2"] <= em["full"] - 0.2
assert [name for name, _ in sorted(points.items(), key=lambda kv: kv[1][0])] == ["int2", "int3", "int4", "int8", "mixed_l0", "full"]
assert result.recommended_spec is not None
print({name: f"{e:.1%}" for name, e in em.items()}, "- checks passed")"""),
    ],
    "03_question_aware_compression.ipynb": [
        ("md", """# Question-aware compression: keep the tokens the question needs

`CompressedCache` keeps only the prompt tokens a selector scores highest. Q2C scores each context token by the
attention the question pays to it; SnapKV by the attention of the last prompt tokens; H2O by the attention every
prompt token pays; random is the floor. Evicted tokens are freed, kept ones keep their positions."""),
        ("code", SETUP),
        ("code", EVAL_HELPER),
        ("code", """from kvcache_plugins import CompressedCache

rows = []
for selector in ["q2c", "snapkv", "h2o", "random"]:
    for retention in (0.25, 0.5, 0.75):
        em, kv, bw = evaluate(lambda chunk, s=selector, r=retention: CompressedCache(
            model, selector=s, retention=r, question_len=[e.question_len for e in chunk]), count=32)
        rows.append((selector, retention, em, bw))
print(f"{'selector':<9}{'kept':>6}{'exact match':>13}{'bandwidth':>11}")
for s, r, em, bw in rows:
    print(f"{s:<9}{r:>6.0%}{em:>13.1%}{bw:>11.1%}")"""),
        ("code", """import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(5, 3.5))
for selector in ["q2c", "snapkv", "h2o", "random"]:
    pts = [(r, em) for s, r, em, bw in rows if s == selector]
    ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=selector)
ax.set_xlabel("% of the context kept"); ax.set_ylabel("exact match"); ax.legend(); ax.grid(alpha=0.3)
ax.set_title("selection on 512-token retrieval prompts")
plt.show()"""),
        ("md", "Which positions Q2C kept for one prompt at 10%, and whether the fact the question asks about is among them (the first answer token comes from the prefill either way)."),
        ("code", """example = make_dataset(seed=11, count=1, num_tokens=256)[0]
ids = tokenizer(example.prompt, return_tensors="pt", add_special_tokens=False).input_ids
cache = CompressedCache(model, selector="q2c", retention=0.1, question_len=example.question_len)
model(ids, **cache_kwargs(model, cache))
kept = cache.kept_positions()[0, 0].tolist()
words = example.prompt.split()
answer_key = words[-1]  # the prompt ends with the question: "Q : K17"
fact_start = words.index(answer_key)
print("question:", " ".join(words[-3:]), "| answer fact at", fact_start, ":", " ".join(words[fact_start:fact_start + 3]))
print("kept positions:", kept)
print("answer fact kept:", all(p in kept for p in range(fact_start, fact_start + 3)))"""),
        ("md", "Selection and quantization combine: keep half the context and store it at int8."),
        ("code", """em, kv, bw = evaluate(lambda chunk: CompressedCache(model, selector="q2c", retention=0.5,
                     question_len=[e.question_len for e in chunk], quant="int8"), count=32)
print(f"q2c 50% + int8: exact match {em:.1%} at {bw:.1%} bandwidth")"""),
        ("md", """## Selection during the prefill: `@construction`

Above, each selector ran after a full prefill: the first answer token was already computed with attention over the
whole prompt, so single-hop answers (one value) survive any selection and only the second hop of multi-hop answers
tests the cache. A spec ending in `@construction` applies the selection during the prefill too: the model scores
its own prompt first, then prefills it with the unselected context hidden from every later token. Now single-hop
answers show which selector kept the fact."""),
        ("code", """from kvcache_plugins.specs import make_cache as cache_from_spec


def from_spec(spec):
    \"\"\"A cache factory for evaluate(): builds the spec's cache for each batch of examples.\"\"\"
    def factory(chunk):
        ids = tokenizer([e.prompt for e in chunk], return_tensors="pt", add_special_tokens=False).input_ids
        return cache_from_spec(spec, model, question_len=[e.question_len for e in chunk], tokenizer=tokenizer,
                               input_ids=ids, attention_mask=torch.ones_like(ids))
    return factory


from kvcache_plugins.bench.stats import wilson_interval

print("single-hop 512-token prompts, one selection for all layers; [95% interval] over 32 prompts")
print(f"{'selector':<9}{'kept':>6}{'post hoc':>10}{'construction':>14}{'95% interval':>16}")
post, built = {}, {}
for selector in ["q2c", "snapkv", "random"]:
    for retention in (0.25, 0.5):
        spec = f"{selector}:{retention}:global"
        post[selector, retention], _, _ = evaluate(from_spec(spec), count=32, multi_hop_share=0.0)
        built[selector, retention], _, _ = evaluate(from_spec(spec + "@construction"), count=32, multi_hop_share=0.0)
        low, high = wilson_interval(round(built[selector, retention] * 32), 32)
        print(f"{selector:<9}{retention:>6.0%}{post[selector, retention]:>10.1%}{built[selector, retention]:>14.1%}"
              f"{f'[{low:.0%}, {high:.0%}]':>16}")"""),
        ("md", """SnapKV beats random during construction by more than the 95% intervals: the question is a key
(`Q : K17`), so Q2C's top 25% is mostly keys of other facts, kept without their values, and each orphan key is a
distractor, while SnapKV's 5-wide pooling keeps whole facts (key, value, separator) together. Q2C's lead over random
is inside the intervals of 32 prompts here; `tests/test_reference_model.py` measures it on more prompts."""),
        ("code", """# checks: the test suite runs this notebook, and these bounds must hold
em = {(s, r): e for s, r, e, _ in rows}
assert all(abs(b - r) < 0.03 for s, r, e, b in rows)   # bandwidth = share kept (+ the uncompressed question)
assert em["q2c", 0.75] > em["q2c", 0.25]
assert min(post.values()) >= 0.9                        # post hoc: the first answer token comes from the full prefill
for r in (0.25, 0.5):                                   # intervals apart: SnapKV above random during construction
    assert wilson_interval(round(built["snapkv", r] * 32), 32)[0] > wilson_interval(round(built["random", r] * 32), 32)[1]
    assert built["q2c", r] >= built["random", r]
print("checks passed")"""),
    ],
    "04_scout_transfer.ipynb": [
        ("md", """# Scout models: a small model reads, a large model keeps

A small scout model runs the prompt and picks the positions; it sends them (a few hundred bytes, never tensors) to
the large model, which computes its own keys and values and keeps only those positions. Here the scout is the
embedded 2-layer model and the large model the 4-layer reference model; both share one tokenizer."""),
        ("code", SETUP),
        ("code", """from kvcache_plugins import Scout, ScoutMaskedCache, Selection, selection_overlap
from kvcache_plugins.reference import load_scout_model
from kvcache_plugins.scout import kv_cache_bytes

scout_model, _ = load_scout_model()
examples = make_dataset(seed=21, count=32, num_tokens=512)
rows = {"own": 0, "scout": 0}
overlaps, wire = [], []
for e in examples:
    ids = tokenizer(e.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    own = Scout(model, tokenizer, "q2c", 0.5).select(ids, question_len=e.question_len)
    sent = Scout(scout_model, tokenizer, "q2c", 0.5).select(ids, question_len=e.question_len).to_bytes()
    received = Selection.from_bytes(sent)
    overlaps.append(selection_overlap(received, own))
    wire.append(len(sent))
    for name, sel in (("own", own), ("scout", received)):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, ScoutMaskedCache(sel, model, tokenizer=tokenizer)),
                             max_new_tokens=4, do_sample=False)
        rows[name] += exact_match(tokenizer.decode(out[0, ids.shape[1]:]), e)
print(f"exact match with its own Q2C selection: {rows['own'] / len(examples):.1%}")
print(f"exact match with the scout's selection: {rows['scout'] / len(examples):.1%}")
print(f"positions in common: {sum(overlaps) / len(overlaps):.1%}")
print(f"bytes on the wire: {sum(wire) / len(wire):.0f} per prompt, vs {kv_cache_bytes(model.config, 512):,} bytes of 16-bit KV cache")"""),
        ("md", "The three ways to apply a selection: drop after a full prefill, hide during prefill, or run only the kept tokens."),
        ("code", """e = examples[0]
ids = tokenizer(e.prompt, return_tensors="pt", add_special_tokens=False).input_ids
selection = Scout(scout_model, tokenizer, "q2c", 0.5).select(ids, question_len=e.question_len)
answers = {}
for mode in ("post_hoc", "construction", "sparse_prefill"):
    cache = ScoutMaskedCache(selection, model, tokenizer=tokenizer, mode="post_hoc" if mode == "sparse_prefill" else mode)
    if mode == "sparse_prefill":
        cache.sparse_prefill(model, ids)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache), max_new_tokens=4, do_sample=False)
    answers[mode] = tokenizer.decode(out[0, ids.shape[1]:])
    print(f"{mode:>15}: {answers[mode]}   (expected {e.answer})")"""),
        ("code", """# checks: the test suite runs this notebook, and these bounds must hold
assert rows["own"] / len(examples) >= 0.9 and rows["scout"] >= rows["own"] - 0.1 * len(examples)
assert 0.3 < sum(overlaps) / len(overlaps) < 0.9     # the scout's choice differs, the answers do not
assert max(wire) < 1_000                              # a few hundred bytes on the wire, never tensors
assert all(exact_match(a, e) for a in answers.values())
print("checks passed")"""),
    ],
    "05_evaluate_with_lm_eval.ipynb": [
        ("md", """# Evaluating with lm-eval

`pip install "kvcache-plugins[eval]"` makes `lm_eval --model hf --model_args pretrained=...,cache=<spec>` work.
From Python, `kvcache_plugins.eval.lm_eval_model.install()` does the same for `lm_eval.simple_evaluate`. The
`kv_retrieval` task in `eval_tasks/` is the embedded model's task, so this runs offline; the other tasks
(`kv_squad_v2`, `kv_triviaqa`, `kv_hotpotqa`, `kv_mmlu`, `kv_niah`) read their hub datasets."""),
        ("code", """import os, logging, warnings
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", message="IProgress not found")
from pathlib import Path
import lm_eval
import transformers
transformers.utils.logging.disable_progress_bar()
logging.getLogger("lm_eval").setLevel(logging.ERROR)
from kvcache_plugins.eval.lm_eval_model import install
from kvcache_plugins.reference import reference_model_path, reference_tokenizer_path

os.environ["HF_DATASETS_OFFLINE"] = "1"
install()
tasks_dir = next(p for p in [Path.cwd() / "eval_tasks", Path.cwd().parent / "eval_tasks"] if p.is_dir())
model_path, tokenizer_path = reference_model_path(), reference_tokenizer_path()
# the task manager carries the task metadata: 24 held-out prompts of 512 tokens
task_manager = lm_eval.tasks.TaskManager(include_path=str(tasks_dir), metadata={"retrieval_count": 24})"""),
        ("code", """import contextlib, io

results = {}
for spec in ["full", "int4", "q2c:0.25", "random:0.25"]:
    with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's request loop draws progress bars whatever TQDM_DISABLE says
        out = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_path},tokenizer={tokenizer_path},dtype=float32,cache={spec}", tasks=["kv_retrieval"],
            task_manager=task_manager, device="cpu", batch_size=8,
        )
    results[spec] = out["results"]["kv_retrieval"]
print(f"{'cache':<12}{'exact':>8}{'single-hop':>12}{'multi-hop':>11}")
for spec, r in results.items():
    print(f"{spec:<12}{r['exact,none']:>8.1%}{r['exact_single_hop,none']:>12.1%}{r['exact_multi_hop,none']:>11.1%}")"""),
        ("code", """# checks: the test suite runs this notebook, and these bounds must hold
exact = {spec: r["exact,none"] for spec, r in results.items()}
assert exact["full"] >= 0.9 and exact["int4"] >= exact["full"] - 0.15
for spec in ("q2c:0.25", "random:0.25"):  # post hoc: single-hop answers come from the full prefill; the second hop does not
    assert results[spec]["exact_single_hop,none"] >= 0.9
    assert results[spec]["exact_multi_hop,none"] <= results["full"]["exact_multi_hop,none"] - 0.3
print("checks passed")"""),
        ("md", """On the command line (same result):

```bash
M=$(python -c "from kvcache_plugins.reference import reference_model_path as p; print(p())")
lm_eval --model hf --model_args pretrained=$M,tokenizer=$M/tokenizer,cache=q2c:0.25 \\
    --tasks kv_retrieval --include_path eval_tasks --device cpu
```"""),
    ],
}


def build(execute: bool, timeout: int = 600, only: list[str] | None = None) -> list[Path]:
    unknown = sorted(set(only or []) - set(NOTEBOOKS))
    if unknown:
        raise SystemExit(f"unknown notebook(s) {unknown}; choose from {sorted(NOTEBOOKS)}")
    paths = []
    for name, cells in NOTEBOOKS.items():
        if only and name not in only:
            continue
        nb = new_notebook(
            cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        )
        if execute:
            from nbclient import NotebookClient

            NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
        path = HERE / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--execute", action="store_true")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="rebuild only these notebooks (file names)")
    args = parser.parse_args()
    for path in build(args.execute, only=args.only):
        print("wrote", path)


if __name__ == "__main__":
    main()
