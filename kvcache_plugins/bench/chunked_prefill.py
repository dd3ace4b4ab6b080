"""Peak memory of a long prefill: chunked compressed prefill vs a plain DynamicCache prefill.

Run: ``python -m kvcache_plugins.bench.chunked_prefill`` (options: ``--tokens 16384 --chunk 1024 --retention 0.25``).

The tiny Qwen2 of the other benchmarks (4 layers, hidden 256, 4 heads, 2 KV heads, head_dim 64, fp32) reads a random
prompt whose last 32 tokens are the question and generates 4 tokens. Each configuration runs in a fresh process that
builds the model, warms up on a short prompt, resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``) and reports the peak RSS rise during ``generate`` (everything: cache, activations,
scores), the cache's own peak during the prefill (from its byte accounting) and its bytes at the end:

* ``full``: ``DynamicCache``, one prefill forward (what a user does today);
* ``full chunked``: ``DynamicCache`` with ``prefill_chunk_size`` (chunking alone bounds activations, not the cache);
* ``snapkv``: ``CompressedCache(selector="snapkv")`` in one forward (peak: compressed layers plus one full layer);
* ``snapkv chunked``: the same with ``prefill_chunk_size``: peak about the budget plus one chunk per layer;
* ``q2c finch``: ``cache.prefill(model, ids, chunk_size=...)`` (the question scores every chunk), then ``generate``.

The table gives each figure and its ratio to ``full``. Linux only (``/proc``).

**Allocator.** glibc raises its mmap threshold each time a large block is freed, so later medium-sized blocks (a
chunk's masks and states, a few MB each) come from the heap, and a fragmented heap is not given back: the RSS
high-water mark then counts memory that is free. By default every row runs with the threshold pinned
(``MALLOC_MMAP_THRESHOLD_=65536``), so RSS follows the memory in use, the same way for every row;
``--allocator-default`` measures glibc's default behaviour instead (chunked rows look worse there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import DynamicCache

from ..caches.compressed import CompressedCache
from .measure import PeakMemory, greedy, in_fresh_process, memory_supported, prefill_bytes, tiny_qwen2

QUESTION = 32
CONFIGS = ("full", "full chunked", "snapkv", "snapkv chunked", "q2c finch")


def run_one(name: str, tokens: int, chunk: int, retention: float, new_tokens: int = 4) -> dict:
    """Run configuration ``name`` in this process; return its RSS rise, cache bytes and time."""
    model = tiny_qwen2()
    g = torch.Generator().manual_seed(tokens)
    prompt = torch.randint(3, model.config.vocab_size, (1, tokens), generator=g)

    def go(ids: torch.Tensor, chunk_size: int) -> object:
        if name.startswith("full"):
            cache = DynamicCache(config=model.config)
        else:
            selector = "q2c" if name.startswith("q2c") else "snapkv"
            cache = CompressedCache(model, selector=selector, retention=retention, question_len=QUESTION)
        chunked = chunk_size if name.endswith("chunked") else None
        if name.endswith("finch"):
            with torch.inference_mode():
                cache.prefill(model, ids, chunk_size=chunk_size)
        greedy(model, ids, torch.ones_like(ids), cache, new_tokens, prefill_chunk_size=chunked)
        return cache

    go(prompt[:, : 4 * QUESTION], QUESTION)  # warm-up: one-off allocations and lazy imports
    with PeakMemory() as rss:
        t0 = time.perf_counter()
        cache = go(prompt, chunk)
        seconds = time.perf_counter() - t0
    peak, final = prefill_bytes(cache)
    return {"rss_rise": rss.rise, "cache_peak": peak, "cache_final": final, "seconds": seconds}


PINNED = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure(
    tokens: int, chunk: int, retention: float, configs: tuple[str, ...] = CONFIGS, pin_allocator: bool = True
) -> dict[str, dict]:
    """Each configuration in a fresh process (see the module docstring)."""
    env = dict(os.environ)
    if pin_allocator:
        env.update(PINNED)
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = {}
    for name in configs:
        code = (
            "import json\n"
            "from kvcache_plugins.bench.chunked_prefill import run_one\n"
            f"print(json.dumps(run_one({name!r}, {tokens}, {chunk}, {retention})))\n"
        )
        out[name] = json.loads(in_fresh_process(code, name, env))
    return out


def report(
    results: dict[str, dict], tokens: int, chunk: int, retention: float, pin_allocator: bool = True, out=None
) -> None:
    out = out or sys.stdout
    base = results.get("full")
    allocator = "glibc mmap threshold pinned at 64 KiB" if pin_allocator else "glibc default allocator"
    print(
        f"peak memory of generate() on a {tokens}-token prompt (tiny Qwen2 4 x 256, fp32), retention {retention}, "
        f"chunks of {chunk}; fresh process per row, {allocator}",
        file=out,
    )
    header = f"{'cache':<16}{'RSS rise':>11}{'x full':>8}{'cache peak':>12}{'x full':>8}{'cache end':>11}{'s':>7}"
    print(header, file=out)
    for name, r in results.items():
        rx = f"{r['rss_rise'] / base['rss_rise']:.3f}" if base else "-"
        cx = f"{r['cache_peak'] / base['cache_peak']:.3f}" if base else "-"
        print(
            f"{name:<16}{r['rss_rise'] / 2**20:>9.1f}MB{rx:>8}{r['cache_peak'] / 2**20:>10.1f}MB{cx:>8}"
            f"{r['cache_final'] / 2**20:>9.1f}MB{r['seconds']:>7.1f}",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--retention", type=float, default=0.25)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, metavar="CONFIG")
    parser.add_argument("--allocator-default", action="store_true", help="do not pin glibc's mmap threshold")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    if not memory_supported():
        print("peak-memory measurement needs Linux /proc (clear_refs)", file=sys.stderr)
        return 1
    pin = not args.allocator_default
    results = measure(args.tokens, args.chunk, args.retention, tuple(args.configs), pin)
    report(results, args.tokens, args.chunk, args.retention, pin)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"tokens": args.tokens, "chunk": args.chunk, "retention": args.retention, "pinned_allocator": pin,
                 "rows": results},
                f,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
