"""``kvcache-bench --long``: retrieval prompts longer than the embedded model was trained on, read in chunks.

Each prompt is a list of key-value facts (keys may repeat among the distractors; the asked key occurs exactly once)
and a single-hop question, as in :mod:`kvcache_plugins.tasks.kv_retrieval`, at lengths (default 4096 and 8192
tokens) past the embedded model's training length (2048), 8192 also past its ``max_position_embeddings`` (4096): the
full cache's score there is reported as the baseline, whatever it is (kept keys keep their positions, so chunked
compression does not bring a prompt back into the trained range). One prompt per batch (Finch needs one question
length per batch).

Rows: ``full`` (a plain ``DynamicCache``, one prefill forward) and compressing caches prefilled in chunks of
``--prefill-chunk`` tokens: ``generate(prefill_chunk_size=...)`` for the query-free and window selectors and
``cache.prefill(..., chunk_size=...)`` (Finch) for q2c. The extra column is the peak KV memory during the prefill
(the caches' byte accounting; for ``full``, the whole prompt's keys and values) and its ratio to ``full``'s; the
RSS of a whole process is measured by ``python -m kvcache_plugins.bench.chunked_prefill``.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from ..caches.compressed import CompressedCache
from ..scout import kv_cache_bytes
from ..tasks.kv_retrieval import FACT_TOKENS, NUM_KEYS, NUM_VALUES, QUESTION_TOKENS, Example, exact_match, max_facts
from .measure import Row, compare_with_full, greedy, held_bytes

TASK = "kv_retrieval_long"
LONG_CACHES = ("full", "snapkv:0.25", "knorm:0.25", "random:0.25", "q2c:0.25")


def long_example(rng: random.Random, num_tokens: int) -> Example:
    """A single-hop prompt of ``1 + 3 * facts + 3`` tokens; only the asked key is unique among its facts."""
    n = max_facts(num_tokens)
    asked = rng.randrange(NUM_KEYS)
    others = [k for k in range(NUM_KEYS) if k != asked]
    keys = [rng.choice(others) for _ in range(n)]
    at = rng.randrange(n)
    keys[at] = asked
    facts = [(f"K{k}", f"V{rng.randrange(NUM_VALUES)}") for k in keys]
    body = " ".join(f"{k} {v} ;" for k, v in facts)
    return Example(f"<s> {body} Q : K{asked}", f"{facts[at][1]} </s>", 1, 1 + FACT_TOKENS * n + QUESTION_TOKENS, at)


def run_long(model, tokenizer, lengths: list[int], limit: int, chunk: int, seed: int, device: str,
             caches: tuple[str, ...] = LONG_CACHES, max_new_tokens: int = 4) -> list[Row]:
    """Rows of the long-prompt set; see the module docstring."""
    rows = []
    full_bytes = lambda n: kv_cache_bytes(model.config, n, model.dtype.itemsize)  # a full cache of n tokens
    for tokens in lengths:
        examples = [long_example(random.Random(seed + tokens + i), tokens) for i in range(limit)]
        for name in caches:
            row = Row(name if name == "full" else f"{name} chunked", tokens, TASK)
            scores, prefill, peaks, held = [], [], [], []
            for ex in examples:
                ids = tokenizer(ex.prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
                mask = torch.ones_like(ids)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    if name == "full":
                        cache, chunked = DynamicCache(config=model.config), None
                    else:
                        selector, retention = name.split(":")
                        cache = CompressedCache(
                            model, selector=selector, retention=float(retention), question_len=ex.question_len
                        )
                        chunked = chunk
                        if selector == "q2c":  # Finch: the question scores every chunk
                            cache.prefill(model, ids, mask, chunk_size=chunk)
                            chunked = None
                    out = greedy(model, ids, mask, cache, max_new_tokens, tokenizer.pad_token_id,
                                 prefill_chunk_size=chunked)
                prefill.append(time.perf_counter() - t0)
                scores.append(float(exact_match(tokenizer.decode(out[0, ids.shape[1] :]), ex)))
                full = not isinstance(cache, CompressedCache)  # a full cache's peak: the prompt's keys and values
                peaks.append(full_bytes(ids.shape[1]) if full else cache.peak_prefill_bytes)
                held.append(held_bytes(cache))
            row.prompts = len(scores)
            row.score = sum(scores) / len(scores)
            row.kv_bytes = sum(held) / len(held)
            row.bandwidth = row.kv_bytes / full_bytes(tokens + max_new_tokens - 1)
            row.prefill_ms = statistics.median(prefill) * 1e3  # the whole generate call: prefill dominates
            row.decode_tokens_per_s = float("nan")
            row.extra = {"peak_prefill_kv_bytes": max(peaks), "prefill_chunk": None if name == "full" else chunk}
            rows.append(row)
    for r, full in compare_with_full(rows):
        r.extra["peak_prefill_x_full"] = r.extra["peak_prefill_kv_bytes"] / full.extra["peak_prefill_kv_bytes"]
    return rows


def print_long_table(rows: list[Row], out=None) -> None:
    out = out or sys.stdout
    print(f"\ntask: {TASK} (one prompt per forward; chunked rows prefill in chunks)", file=out)
    header = (f"{'cache':<22}{'tokens':>7}{'score':>8}{'% full':>8}{'KV bytes':>12}{'peak prefill KV':>17}"
              f"{'x full':>8}{'generate ms':>13}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        pct = f"{r.pct_of_full:.1%}" if r.pct_of_full is not None else "-"
        ratio = r.extra.get("peak_prefill_x_full")
        print(f"{r.cache:<22}{r.tokens:>7}{r.score:>8.3f}{pct:>8}{r.kv_bytes:>12,.0f}"
              f"{r.extra['peak_prefill_kv_bytes']:>17,}{'-' if ratio is None else f'{ratio:.3f}':>8}"
              f"{r.prefill_ms:>13.0f}", file=out)
