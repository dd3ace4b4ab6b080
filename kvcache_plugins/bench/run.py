"""``kvcache-bench``: accuracy kept vs KV bytes spent, for a grid of caches, in one table.

Default (no arguments): the embedded reference model on held-out key-value retrieval prompts of 512 and 2048 tokens,
half single-hop and half multi-hop (see :class:`~kvcache_plugins.bench.tasks.RetrievalTask`), offline, in about two
minutes on two CPU cores. With ``--model`` and ``--task`` it runs a real model on a real task (``eval_tasks`` names
such as ``kv_squad_v2``, with ``--data`` for local files).

Per cache it reports: score (exact match, or the task's metric), % of the full cache's score, KV bytes per prompt
(everything the cache holds after generation), % bandwidth (those bytes over what a full cache holds for the same
tokens in the model dtype, so ``full`` is 100% and int8 is about 28% on an fp32 model, 53% on a bf16 one), prefill
ms per prompt and decode tokens/s (from ``generate()`` itself: a logits processor timestamps every step). It writes
``results.json`` (rows and environment) and ``pareto.png`` (score vs bandwidth) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from .. import __version__
from .._compat import cache_kwargs
from ..specs import CacheSpec, make_cache, parse_spec

DEFAULT_CACHES = (
    "full", "int8", "int4", "int2", "mixed_l0",
    "q2c:0.25", "q2c:0.5", "q2c:0.75", "snapkv:0.25", "snapkv:0.5", "snapkv:0.75",
    "h2o:0.25", "h2o:0.5", "h2o:0.75", "random:0.25", "random:0.5", "random:0.75",
    "q2c:0.5+mixed_l0", "scout=embedded:q2c:0.5",
    "q2c:0.25:global@construction", "snapkv:0.25:global@construction", "random:0.25:global@construction",
    "scout=embedded:q2c:0.5@construction",
)


@dataclass
class Row:
    cache: str
    tokens: int
    task: str
    score: float = 0.0
    pct_of_full: float | None = None
    kv_bytes: float = 0.0
    bandwidth: float = 0.0
    prefill_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    prompts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _Clock(transformers.LogitsProcessor):
    """Timestamps each generation step (after each forward pass)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def environment(model: Any, device: str, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "kvcache_plugins": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "attn_implementation": model.config._attn_implementation,
    }


def run_cache(model, tokenizer, task, spec: CacheSpec, tokens: int, batches: list, max_new_tokens: int) -> Row:
    row = Row(spec.text, tokens, task.name)
    scores, prefill, decode_time, decode_tokens, kv, ref = [], [], 0.0, 0, 0.0, 0.0
    prompt_tokens = 0
    for batch in batches:
        ids, mask, question_len, examples = batch
        prompt_tokens += int(mask.sum())
        cache = make_cache(spec, model, question_len=question_len, tokenizer=tokenizer, input_ids=ids, attention_mask=mask)
        clock = _Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=max_new_tokens, do_sample=False,
                logits_processor=transformers.LogitsProcessorList([clock]), pad_token_id=tokenizer.pad_token_id,
            )
        prefill.append((clock.stamps[0] - t0) * 1e3 / ids.shape[0])
        if len(clock.stamps) > 1:
            decode_time += clock.stamps[-1] - clock.stamps[0]
            decode_tokens += (len(clock.stamps) - 1) * ids.shape[0]
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :])
        for text, ex in zip(texts, examples):
            value = task.score(text, ex)
            scores.append(value)
            kind = task.kind(ex)
            if kind:
                row.extra.setdefault(kind, []).append(value)
        fp = cache.memory_footprint() if hasattr(cache, "memory_footprint") else None
        if fp is not None:
            kv += fp.total
            # the footprint's reference counts 16-bit K/V; the bandwidth column compares with the model dtype
            ref += fp.reference * model.dtype.itemsize / 2
        else:  # a plain DynamicCache ("full"): keys and values in the model dtype
            held = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers if l.keys is not None)
            kv += held
            ref += held
    n = len(scores)
    row.extra = {f"score_{k}": sum(v) / len(v) for k, v in row.extra.items()}
    row.extra["mean_prompt_tokens"] = prompt_tokens / max(1, sum(len(b[3]) for b in batches))
    row.prompts = n
    row.score = sum(scores) / n
    row.kv_bytes = kv / n
    row.bandwidth = kv / ref if ref else float("nan")
    row.prefill_ms = statistics.median(prefill)
    row.decode_tokens_per_s = decode_tokens / decode_time if decode_time else float("nan")
    return row


def print_table(rows: list[Row], out=None) -> None:
    """One table per task; a column per answer kind (e.g. single_hop, multi_hop) when the task reports kinds."""
    out = out or sys.stdout
    width = max([len("cache")] + [len(r.cache) for r in rows]) + 2
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        kinds = list(dict.fromkeys(k for r in task_rows for k in r.extra if k.startswith("score_")))
        names = [k.removeprefix("score_") for k in kinds]
        kind_width = max([8] + [len(n) + 2 for n in names])
        header = (f"{'cache':<{width}}{'tokens':>7}{'score':>8}" + "".join(f"{n:>{kind_width}}" for n in names)
                  + f"{'% full':>8}{'KV bytes':>12}{'% bw':>8}{'prefill ms':>12}{'decode tok/s':>14}")
        print(f"\ntask: {task}", file=out)
        print(header, file=out)
        print("-" * len(header), file=out)
        for r in task_rows:
            pct = f"{r.pct_of_full:.1%}" if r.pct_of_full is not None else "-"
            tokens = r.tokens or round(r.extra.get("mean_prompt_tokens", 0))
            per_kind = "".join(
                f"{r.extra[k]:>{kind_width}.3f}" if k in r.extra else f"{'-':>{kind_width}}" for k in kinds
            )
            print(f"{r.cache:<{width}}{tokens:>7}{r.score:>8.3f}{per_kind}{pct:>8}{r.kv_bytes:>12,.0f}"
                  f"{r.bandwidth:>8.1%}{r.prefill_ms:>12.2f}{r.decode_tokens_per_s:>14.1f}", file=out)


def plot(rows: list[Row], path: Path) -> bool:
    """Score vs bandwidth per task and length, with the Pareto frontier; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r.task, r.tokens) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (task, tokens) in zip(axes[0], groups):
        pts = [r for r in rows if (r.task, r.tokens) == (task, tokens)]
        # triangles: selection applied during the prefill (@construction), which also moves the first answer token
        during_prefill = {r.cache for r in pts if r.cache.endswith("@construction")}
        for r in pts:
            ax.scatter(r.bandwidth * 100, r.score, s=30, marker="^" if r.cache in during_prefill else "o")
            ax.annotate(r.cache, (r.bandwidth * 100, r.score), fontsize=7, xytext=(3, 3), textcoords="offset points")
        frontier, best = [], -1.0
        for r in sorted(pts, key=lambda r: r.bandwidth):
            if r.score > best:
                frontier.append(r)
                best = r.score
        ax.plot([r.bandwidth * 100 for r in frontier], [r.score for r in frontier], "k--", lw=1, label="Pareto frontier")
        if during_prefill:
            ax.scatter([], [], marker="^", c="gray", s=30, label="@construction (selected during the prefill)")
        ax.set_xlabel("% bandwidth (bytes held / full cache in the model dtype)")
        ax.set_ylabel("score")
        ax.set_title(f"{task}, {tokens} tokens")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    from .tasks import get_task

    parser = argparse.ArgumentParser(prog="kvcache-bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded", help="'embedded' (default), a hub id or a local path")
    parser.add_argument("--task", default="kv_retrieval",
                        help="kv_retrieval (default: single- and multi-hop key-value retrieval), or an eval_tasks "
                             "name: kv_squad_v2, kv_triviaqa, kv_hotpotqa, kv_niah")
    parser.add_argument("--data", help="local data file for an eval_tasks task (instead of the hub dataset)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="prompt lengths (retrieval, niah)")
    parser.add_argument("--limit", type=int, default=None, help="prompts per length (default: 48 at 512, 24 above)")
    parser.add_argument("--caches", nargs="+", default=list(DEFAULT_CACHES), help="cache specs (see make_cache)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    specs = [parse_spec(c) for c in args.caches]  # bad specs fail before any model loads
    task = get_task(args.task, data=args.data)
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
    model, tokenizer = task.load_model(args.model, dtype, args.device)
    usable = []
    for s in specs:
        reason = task.unsupported(s)
        if reason:
            print(f"skipping {s.text}: {reason}", file=sys.stderr)
        else:
            usable.append(s)
    specs = usable
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress is a nicety; the bench extra installs tqdm
        tqdm = None
    work = [(t, s) for t in task.lengths(args.tokens) for s in specs]
    bar = tqdm(total=len(work), desc="kvcache-bench", disable=args.no_progress, file=sys.stderr) if tqdm else None
    rows: list[Row] = []
    started = time.time()
    for tokens in task.lengths(args.tokens):
        limit = args.limit or (48 if tokens <= 512 else 24)
        batches = task.batches(tokenizer, tokens, limit, args.batch_size, args.seed, args.device)
        max_new = args.max_new_tokens or task.max_new_tokens
        for spec in specs:
            row = run_cache(model, tokenizer, task, spec, tokens, batches, max_new)
            rows.append(row)
            if bar:
                bar.update(1)
                bar.set_postfix_str(f"{tokens} tokens {spec.text}")
    if bar:
        bar.close()
    for r in rows:
        full = next((f for f in rows if f.cache == "full" and f.tokens == r.tokens and f.task == r.task), None)
        if full and full.score:
            r.pct_of_full = r.score / full.score
    print_table(rows)
    env = environment(model, args.device, model.dtype)
    env["seconds"] = round(time.time() - started, 1)
    results = {"environment": env, "task": task.name, "rows": [asdict(r) for r in rows]}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    png = args.out / "pareto.png"
    wrote_png = plot(rows, png)
    print(f"\nwrote {args.out / 'results.json'}" + (f" and {png}" if wrote_png else " (install matplotlib for the plot)"))
    print(f"{len(rows)} rows in {env['seconds']} s on {env['device']} ({env['threads']} threads), {env['dtype']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
