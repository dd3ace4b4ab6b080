"""Prefill cost of question-aware selection: CompressedCache (q2c / snapkv / h2o) vs a plain DynamicCache prefill.

Run: ``python -m kvcache_plugins.bench.selection_prefill`` (options: ``--lengths 1024 4096 --rounds 5``).

The tiny Qwen2 of the foundation benchmark (4 layers, hidden 256, 4 heads, 2 KV heads) prefills a random prompt
whose last 32 tokens are the question, keeping 50% of the context. Two measurements:

* **time**: every cache prefills the same prompt, interleaved round by round; the table gives the median prefill
  time and its ratio to the plain prefill (the overhead of observing queries, scoring, selecting and gathering).
* **memory**: each configuration runs once in a fresh subprocess that reports its peak resident set size
  (``ru_maxrss``); the difference to the plain prefill at the same length is the selection's extra working
  memory. H2O scores every prompt query in chunks, so its extra memory should grow linearly with the prompt (x2 per
  doubling), not quadratically (x4). The cache's own peak (compressed layers plus the one full layer awaiting
  selection) comes from its byte accounting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from .._compat import cache_kwargs
from ..caches.compressed import CompressedCache
from .measure import in_fresh_process, memory_supported, prefill_bytes, tiny_qwen2

QUESTION = 32
SELECTORS = ("q2c", "snapkv", "h2o")


def _make(model, name: str):
    if name == "plain":
        return DynamicCache(config=model.config)
    return CompressedCache(model, selector=name, retention=0.5, question_len=QUESTION)


def _prefill(model, prompt: torch.Tensor, name: str) -> tuple[float, int, int]:
    """Prefill ``prompt`` into a fresh cache; return (ms, peak cache bytes during prefill, cache bytes after)."""
    cache = _make(model, name)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(prompt, **cache_kwargs(model, cache), use_cache=True)
        elapsed = time.perf_counter() - t0
    return elapsed * 1e3, *prefill_bytes(cache)


def _progress(message: str) -> None:
    """A line on stderr: the defaults run for minutes on a loaded machine."""
    print(f"[selection_prefill] {message}", file=sys.stderr, flush=True)


def time_prefill(lengths: list[int], rounds: int) -> dict[int, dict[str, dict]]:
    model = tiny_qwen2()
    results: dict[int, dict[str, dict]] = {}
    names = ("plain", *SELECTORS)
    for n in lengths:
        _progress(f"timing the prefill of {n} tokens: {rounds} rounds of {', '.join(names)}")
        prompt = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        times: dict[str, list[float]] = {name: [] for name in names}
        sizes: dict[str, tuple[int, int]] = {}
        for name in names:  # warm-up: first calls pay one-off setup costs
            _prefill(model, prompt, name)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                ms, peak, final = _prefill(model, prompt, name)
                times[name].append(ms)
                sizes[name] = (peak, final)
        results[n] = {
            name: {"ms": statistics.median(times[name]), "cache_peak_bytes": sizes[name][0], "cache_bytes": sizes[name][1]}
            for name in names
        }
    return results


def _rss_rise(setup: str, work: str, what: str) -> int:
    """Peak RSS growth (bytes) of the statement ``work`` in a fresh process, after ``setup`` (the model, the inputs):
    the kernel's resident-set high-water mark is reset in between, so the figure covers ``work`` alone."""
    code = f"from kvcache_plugins.bench.measure import PeakMemory\n{setup}\nwith PeakMemory() as peak:\n    {work}\n"
    return int(in_fresh_process(code + "print(peak.rise)\n", what))


def _measure_rss(n: int, name: str) -> int:
    """Peak RSS growth (bytes) while prefilling ``n`` tokens with ``name``, in a fresh process."""
    setup = ("from kvcache_plugins.bench.selection_prefill import _prefill, tiny_qwen2\n"
             f"m = tiny_qwen2(); p = torch.randint(0, m.config.vocab_size, (1, {n}))")
    return _rss_rise(setup, f"_prefill(m, p, {name!r})", f"{name} prefill of {n} tokens")


def _measure_scorer_rss(n: int, name: str) -> int:
    """Peak RSS growth (bytes) of one layer's scoring alone (``selector.score`` on stored queries and keys)."""
    setup = ("from kvcache_plugins.selection import PromptLayout, ScoreContext, make_selector\n"
             f"n = {n}; z = torch.zeros(1, dtype=torch.long)\n"
             "q, k = torch.randn(1, 4, n, 64), torch.randn(1, 2, n, 64)\n"
             f"ctx = ScoreContext(0, k, q, 0.125, None, PromptLayout(n, z, torch.tensor([{QUESTION}]), z))\n"
             f"sel = make_selector({name!r})")
    return _rss_rise(setup, "sel.score(ctx)", f"{name} scoring of {n} tokens")


def memory_growth(lengths: list[int]) -> dict[int, dict[str, int]]:
    """Per length: peak RSS growth of each prefill, and of each selector's scoring alone (``<name>:score``)."""
    out: dict[int, dict[str, int]] = {}
    for n in lengths:
        _progress(f"peak memory at {n} tokens: {2 * len(SELECTORS) + 1} fresh processes")
        row = {name: _measure_rss(n, name) for name in ("plain", *SELECTORS)}
        row.update({f"{name}:score": _measure_scorer_rss(n, name) for name in SELECTORS})
        out[n] = row
    return out


def report(times: dict, rss: dict | None, out=None) -> None:
    out = out or sys.stdout
    print("prefill with selection vs plain prefill (tiny Qwen2, 50% retention, 32-token question)", file=out)
    print(f"{'tokens':>7} {'cache':<8}{'prefill ms':>12}{'x plain':>9}{'cache peak':>13}{'cache final':>13}", file=out)
    for n, row in times.items():
        base = row["plain"]["ms"]
        for name, r in row.items():
            print(
                f"{n:>7} {name:<8}{r['ms']:>12.1f}{r['ms'] / base:>9.3f}{r['cache_peak_bytes']:>13,}"
                f"{r['cache_bytes']:>13,}",
                file=out,
            )
    if rss:
        print("\npeak RSS growth during prefill, fresh process per run, and the extra over the plain prefill", file=out)
        print(f"{'tokens':>7}{'plain':>10}" + "".join(f"{s:>12}" for s in SELECTORS), file=out)
        for n, row in rss.items():
            print(f"{n:>7}{row['plain'] / 2**20:>8.1f}MB" + "".join(f"{(row[s] - row['plain']) / 2**20:>+10.1f}MB" for s in SELECTORS), file=out)
        print("\nworking memory of one layer's scoring alone (4 query heads; naive n x n fp32 scores for scale)", file=out)
        print(f"{'tokens':>7}" + "".join(f"{s:>12}" for s in SELECTORS) + f"{'naive n x n':>14}", file=out)
        for n, row in rss.items():
            naive = 4 * n * n * 4
            print(f"{n:>7}" + "".join(f"{row[s + ':score'] / 2**20:>10.1f}MB" for s in SELECTORS)
                  + f"{naive / 2**20:>12.1f}MB", file=out)
        ns = sorted(rss)
        for a, b in zip(ns, ns[1:]):
            ratio = rss[b]["h2o:score"] / max(1, rss[a]["h2o:score"])
            print(f"h2o scoring memory {a} -> {b} tokens: x{ratio:.2f} (linear: x{b / a:.0f}, quadratic: "
                  f"x{(b / a) ** 2:.0f})", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096],
                        help="prompt lengths of the timing table (default: 1024 4096)")
    parser.add_argument("--memory-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192],
                        help="prompt lengths of the peak-memory table, a fresh process each (none: skip it)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds; medians reported (default: 5)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    times = time_prefill(args.lengths, args.rounds)
    rss = None
    if args.memory_lengths:
        if memory_supported():
            rss = memory_growth(args.memory_lengths)
        else:
            print("peak-memory measurement needs Linux /proc (clear_refs); skipped", file=sys.stderr)
    report(times, rss)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"time": times, "rss": rss}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
