"""Low-rank keys before or after RoPE: which factors better, measured on the embedded model.

``python -m kvcache_plugins.bench.lowrank_rope [--tokens 512 2048] [--limit 16]``

For each prompt of the embedded retrieval task the model prefills all but the last prompt token into a
``DynamicCache``. Its post-RoPE keys ``K`` (what a cache receives) are then replaced, layer by layer, by

* **post-RoPE**: the best rank-``r`` approximation of ``K`` per head (what :class:`~kvcache_plugins.LowRankCache`
  stores), or
* **pre-RoPE**: ``R_p (best rank-r approximation of R_p^-1 K)``: the rotation undone per position, factored, and
  re-applied (what pre-RoPE methods such as Palu and xKV store; the rotation is re-applied at read time).

Values stay exact, so only the key factoring differs. Reported per rank: the relative Frobenius error of the keys
``||K - K_r|| / ||K||`` (a rotation is orthogonal, so the pre-RoPE error is the same measured before or after it)
and exact match of greedy answers generated from the modified cache (the last prompt token and every answer token
attend to it), next to the uncompressed cache's exact match.
"""

from __future__ import annotations

import argparse

import torch
from transformers import DynamicCache


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _low_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(x.float(), full_matrices=False)
    return ((U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :]).to(x.dtype)


def measure(tokens: list[int], ranks: list[int], limit: int, seed: int = 20261123) -> list[dict]:
    from .._compat import cache_kwargs
    from ..reference import load_reference_model
    from .measure import greedy
    from .tasks import RetrievalTask

    model, tokenizer = load_reference_model(dtype=torch.float32, device="cpu")
    task = RetrievalTask()
    rows = []
    for n in tokens:
        stats = {(v, r): [0.0, 0.0, 0.0] for v in ("post", "pre") for r in ranks}  # err^2, norm^2, correct
        full_correct, count = 0.0, 0
        for ids, mask, _, examples in task.batches(tokenizer, n, limit, 8, seed, "cpu"):
            if not bool(mask.all()):
                raise RuntimeError("expected unpadded prompts of one length")
            prefix = ids[:, :-1]
            base = DynamicCache(config=model.config)
            with torch.inference_mode():
                model(prefix, **cache_kwargs(model, base))
                positions = torch.arange(prefix.shape[1]).unsqueeze(0).expand(prefix.shape[0], -1)
                cos, sin = model.model.rotary_emb(base.layers[0].keys, positions)  # [B, T, D]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            layers = [(layer.keys, layer.values) for layer in base.layers]

            def answers(keys_of) -> list[float]:
                cache = DynamicCache(config=model.config)
                for i, (k, v) in enumerate(layers):
                    cache.update(keys_of(k), v.clone(), i)
                out = greedy(model, ids, mask, cache, task.max_new_tokens, tokenizer.pad_token_id)
                texts = tokenizer.batch_decode(out[:, ids.shape[1] :])
                return [task.score(t, e) for t, e in zip(texts, examples)]

            full_correct += sum(answers(lambda k: k.clone()))
            count += len(examples)
            for r in ranks:
                post = lambda k, r=r: _low_rank(k, r)  # noqa: E731
                pre = lambda k, r=r: _rotate(_low_rank(_rotate(k, cos, -sin), r), cos, sin)  # noqa: E731
                for name, fn in (("post", post), ("pre", pre)):
                    s = stats[(name, r)]
                    for k, _ in layers:
                        s[0] += float((fn(k) - k).pow(2).sum())
                        s[1] += float(k.pow(2).sum())
                    s[2] += sum(answers(fn))
        for r in ranks:
            post, pre = stats[("post", r)], stats[("pre", r)]
            rows.append({
                "tokens": n, "rank": r, "prompts": count, "full_em": full_correct / count,
                "post_error": (post[0] / post[1]) ** 0.5, "pre_error": (pre[0] / pre[1]) ** 0.5,
                "post_em": post[2] / count, "pre_em": pre[2] / count,
            })
    return rows


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers applies it: ``x cos + rotate_half(x) sin`` (``-sin`` undoes it)."""
    return x * cos + _rotate_half(x) * sin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvcache_plugins.bench.lowrank_rope", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 12, 16, 24, 32])
    parser.add_argument("--limit", type=int, default=16, help="prompts per length")
    args = parser.parse_args(argv)
    rows = measure(args.tokens, args.ranks, args.limit)
    print(f"{'tokens':>6}{'rank':>6}{'key err post':>14}{'key err pre':>13}{'EM post':>9}{'EM pre':>8}{'EM full':>9}")
    for r in rows:
        print(f"{r['tokens']:>6}{r['rank']:>6}{r['post_error']:>14.4f}{r['pre_error']:>13.4f}{r['post_em']:>9.3f}"
              f"{r['pre_em']:>8.3f}{r['full_em']:>9.3f}")
    print(f"({rows[0]['prompts']} prompts per length; keys factored per layer and KV head, values exact)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
