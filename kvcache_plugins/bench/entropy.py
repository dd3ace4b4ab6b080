"""What a general-purpose lossless coder saves on ``to_bytes()`` of compressed caches (CacheGen's last stage).

``python -m kvcache_plugins.bench.entropy [--tokens 2048] [--prompts 4]``

Fills caches of several specs with the embedded model's retrieval prompts and compresses each ``to_bytes()`` with
zstd (the ``zstandard`` package, if installed; levels 3 and 19), and with the standard library's zlib (level 9)
and lzma (preset 6) for reference. Prints the bytes saved in % of the serialized size per spec and coder.
"""

from __future__ import annotations

import argparse
import lzma
import zlib

import torch

DEFAULT_SPECS = (
    "int8", "int4", "int2", "mixed_l0", "kivi4", "q2c:0.5+int4", "q2c:0.5+int8", "svd:8+int8", "svd:16+int4",
    "svd:16", "q2c:0.5",
)


def coders() -> dict[str, callable]:
    out = {"zlib-9": lambda b: zlib.compress(b, 9), "lzma-6": lambda b: lzma.compress(b, preset=6)}
    try:
        import zstandard
    except ImportError:
        return out
    z3, z19 = zstandard.ZstdCompressor(level=3), zstandard.ZstdCompressor(level=19)
    return {"zstd-3": z3.compress, "zstd-19": z19.compress, **out}


def measure(specs: list[str], tokens: int, prompts: int, seed: int = 20261123) -> list[dict]:
    from .._compat import cache_kwargs
    from ..specs import make_cache
    from .tasks import RetrievalTask

    task = RetrievalTask()
    model, tokenizer = task.load_model("embedded", torch.float32, "cpu")
    ids, mask, question_len, _ = task.batches(tokenizer, tokens, prompts, prompts, seed, "cpu")[0]
    fns = coders()
    rows = []
    for spec in specs:
        cache = make_cache(
            spec, model, question_len=question_len, tokenizer=tokenizer, input_ids=ids, attention_mask=mask
        )
        with torch.inference_mode():
            model(ids, attention_mask=mask, **cache_kwargs(model, cache))
        data = cache.to_bytes()
        row = {"spec": spec, "bytes": len(data), "accounted": cache.memory_footprint().total}
        for name, fn in fns.items():
            row[name] = 1 - len(fn(data)) / len(data)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcache_plugins.bench.entropy", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--caches", nargs="+", default=list(DEFAULT_SPECS))
    args = parser.parse_args(argv)
    rows = measure(args.caches, args.tokens, args.prompts)
    names = [k for k in rows[0] if k not in ("spec", "bytes", "accounted")]
    print(f"{'cache':<16}{'to_bytes()':>12}" + "".join(f"{n:>10}" for n in names) + "   (bytes saved)")
    for r in rows:
        print(f"{r['spec']:<16}{r['bytes']:>12,}" + "".join(f"{r[n]:>10.1%}" for n in names))
    print(f"({args.prompts} prompts of {args.tokens} tokens, embedded model, fp32)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
