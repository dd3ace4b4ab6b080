"""``kvcache-bench``: accuracy kept vs KV bytes spent, for a grid of caches, in one table.

Default (no arguments): the embedded reference model on held-out key-value retrieval prompts of 512 and 2048 tokens,
half single-hop and half multi-hop (see :class:`~kvcache_plugins.bench.tasks.RetrievalTask`), offline, in about two
minutes on two CPU cores. With ``--model`` and ``--task`` it runs a real model on a real task (``eval_tasks`` names
such as ``kv_squad_v2``, with ``--data`` for local files).

A spec's protocol decides what a cache can change. Without ``@construction`` the prompt's forward pass attends to
the prompt as computed and the cache compresses what it stores, so only decoding (the second hop of a multi-hop
answer) reads the compression; ``<selection>@construction`` hides the unselected context during the prefill and
``<preset>@construction`` (transmission) stores the context quantized before the question is read, so the first
answer token reads the compressed context too.

Per cache it reports: score (exact match, or the task's metric) with its 95% interval (Wilson for exact match,
bootstrap over prompts for graded metrics; see :mod:`~kvcache_plugins.bench.stats`), the same per answer kind, % of
the full cache's score, KV bytes per prompt (everything the cache holds after generation), % bandwidth (those bytes
over what a full cache holds for the same tokens in the model dtype, so ``full`` is 100% and int8 is about 28% on an
fp32 model, 53% on a bf16 one), prefill ms per prompt (the batch's time to its first answer token over its prompts,
selection included) and decode tokens/s (a timing pass after scoring: the first batch continues for
``--decode-steps`` one-token steps; batch size over the median step time). Times come from ``generate()`` itself: a
logits processor timestamps every step. It writes ``results.json`` (rows and environment) and ``pareto.png`` (score
vs bandwidth, one line per method across its retentions, with error bars) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..specs import CacheSpec, parse_spec
from .measure import Row, compare_with_full, environment, run_cache
from .plot import plot
from .stats import format_interval

# The default grid, one spec per row and length. To add a row, add its spec: everything else a row carries (its plot
# series and marker, its retention, whether it selects during the prefill) is derived from the parsed spec.
DEFAULT_CACHES = (
    "full", "int8", "int4", "int2", "mixed_l0",
    "int8@construction", "int4@construction", "int2@construction", "mixed_l0@construction",
    "q2c:0.25", "q2c:0.5", "q2c:0.75", "snapkv:0.25", "snapkv:0.5", "snapkv:0.75",
    "h2o:0.25", "h2o:0.5", "h2o:0.75", "random:0.25", "random:0.5", "random:0.75",
    "q2c:0.5+mixed_l0", "scout=embedded:q2c:0.5",
    "q2c:0.25:global@construction", "snapkv:0.25:global@construction", "random:0.25:global@construction",
    "scout=embedded:q2c:0.5@construction",
)
#: issue 16: the kvpress-breadth scorers and the budget allocators, at the budget of the snapkv/q2c rows above
DEFAULT_CACHES += (
    "tova:0.25", "keydiff:0.25", "lagkv:0.25", "expected_attention:0.25",
    "snapkv:0.25:adakv", "snapkv:0.25:pyramid", "q2c:0.25:adakv", "q2c:0.25:pyramid",
)


def print_table(rows: list[Row], out=None, decode_steps: int | None = None) -> None:
    """One table per task; a column per answer kind (e.g. single_hop, multi_hop) when the task reports kinds.

    Scores read ``0.750 ±0.09``: the score and half the width of its 95% interval."""
    out = out or sys.stdout
    width = max([len("cache")] + [len(r.cache) for r in rows]) + 2
    score_width = len("0.000 ±0.00") + 2
    decode = f"decode tok/s ({decode_steps} steps)" if decode_steps else "decode tok/s"
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        kinds = list(dict.fromkeys(k for r in task_rows for k in r.score_ci95_by_kind))
        kind_width = max([score_width] + [len(k) + 2 for k in kinds])
        header = (f"{'cache':<{width}}{'tokens':>7}{'score ±95%':>{score_width}}"
                  + "".join(f"{k:>{kind_width}}" for k in kinds)
                  + f"{'% full':>8}{'KV bytes':>12}{'% bw':>8}{'prefill ms/prompt':>19}{decode:>{len(decode) + 2}}")
        print(f"\ntask: {task}", file=out)
        print(header, file=out)
        print("-" * len(header), file=out)
        for r in task_rows:
            pct = f"{r.pct_of_full:.1%}" if r.pct_of_full is not None else "-"
            tokens = r.tokens or round(r.extra.get("mean_prompt_tokens", 0))
            per_kind = "".join(
                f"{format_interval(r.extra[f'score_{k}'], r.score_ci95_by_kind[k]):>{kind_width}}"
                if k in r.score_ci95_by_kind else f"{'-':>{kind_width}}" for k in kinds
            )
            print(f"{r.cache:<{width}}{tokens:>7}{format_interval(r.score, r.score_ci95):>{score_width}}{per_kind}"
                  f"{pct:>8}{r.kv_bytes:>12,.0f}{r.bandwidth:>8.1%}{r.prefill_ms:>19.2f}"
                  f"{r.decode_tokens_per_s:>{len(decode) + 2}.1f}", file=out)
    print("\nscore ±95%: half the width of the 95% interval over prompts (Wilson for exact match); the bounds are "
          "score_ci95 in results.json", file=out)


def default_limit(tokens: int) -> int:
    """Prompts per length in the default run (``--limit`` overrides): as many as keep it about two minutes on two
    CPU cores, fewer at long lengths, where each prompt's prefill costs more."""
    return 40 if tokens <= 512 else 20


def _spec(text: str) -> CacheSpec:
    """argparse type for ``--caches``: a bad spec is a usage error (exit code 2) naming the valid forms."""
    try:
        return parse_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcache-bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded", help="'embedded' (default), a hub id or a local path")
    parser.add_argument("--task", default="kv_retrieval",
                        help="kv_retrieval (default: single- and multi-hop key-value retrieval), or an eval_tasks "
                             "name: kv_squad_v2, kv_triviaqa, kv_hotpotqa, kv_niah")
    parser.add_argument("--data", help="local data file for an eval_tasks task (instead of the hub dataset)")
    parser.add_argument("--tokens", type=_positive, nargs="+", default=[512, 2048],
                        help="prompt lengths (kv_retrieval, kv_niah; default: 512 2048)")
    parser.add_argument("--limit", type=_positive, default=None,
                        help=f"prompts per length (default: {default_limit(512)} at 512 tokens, {default_limit(2048)} "
                             "above); more prompts narrow the 95%% intervals (about 1/sqrt(prompts))")
    parser.add_argument("--caches", type=_spec, nargs="+", default=None, metavar="SPEC",
                        help="cache specs, e.g. full int8 q2c:0.5 snapkv:0.25+int8 'q2c:0.25:global@construction' "
                             "(see kvcache_plugins.specs; default: the grid in DEFAULT_CACHES)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                        help="model dtype (default: float32; 'auto': the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=_positive, default=8, help="prompts per generate() call (default: 8)")
    parser.add_argument("--max-new-tokens", type=_positive, default=None,
                        help="answer tokens to generate (default: the task's, 4 for kv_retrieval)")
    parser.add_argument("--decode-steps", type=int, default=16,
                        help="one-token decode steps timed per cache on its first batch after scoring (default: 16; "
                             "0 skips the decode timing)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"),
                        help="folder for results.json and pareto.png (default: bench_out)")
    parser.add_argument("--seed", type=int, default=20261123, help="seed of the generated prompts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--long", type=_positive, nargs="*", default=None, metavar="TOKENS",
                        help="also run the long-prompt rows (default 4096 and 8192 tokens, kv_retrieval only): chunked "
                             "compressed prefill and its peak prefill KV memory; several minutes")
    parser.add_argument("--prefill-chunk", type=_positive, default=1024, help="chunk size of the --long rows")
    parser.add_argument("--long-limit", type=_positive, default=8, help="prompts per length of the --long rows")
    parser.add_argument("--cube", action="store_true",
                        help="the compression cube instead: selection x quantization x low rank on the embedded model, "
                             "with intervals (python -m kvcache_plugins.bench.cube; uses --tokens, --limit, --out)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .tasks import get_task

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cube:
        from .cube import main as cube_main

        extra = ["--limit", str(args.limit)] if args.limit else []
        return cube_main(["--tokens", *map(str, args.tokens), "--out", str(args.out), *extra])
    if args.long is not None and args.task != "kv_retrieval":
        parser.error("--long runs the kv_retrieval long-prompt rows; it does not apply to --task " + args.task)
    specs = args.caches or [parse_spec(c) for c in DEFAULT_CACHES]  # bad specs fail before any model loads
    try:
        task = get_task(args.task, data=args.data)
        dtype = getattr(torch, args.dtype) if args.dtype != "auto" else "auto"
        model, tokenizer = task.load_model(args.model, dtype, args.device)
    except ValueError as e:  # a task or model that does not fit the other arguments
        parser.error(str(e))
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
        limit = args.limit or default_limit(tokens)
        batches = task.batches(tokenizer, tokens, limit, args.batch_size, args.seed, args.device)
        max_new = args.max_new_tokens or task.max_new_tokens
        for spec in specs:
            row = run_cache(model, tokenizer, task, spec, tokens, batches, max_new, args.decode_steps)
            rows.append(row)
            if bar:
                bar.update(1)
                bar.set_postfix_str(f"{tokens} tokens {spec.text}")
    if bar:
        bar.close()
    compare_with_full(rows)
    print_table(rows, decode_steps=args.decode_steps if args.decode_steps >= 2 else None)
    if args.long is not None:
        from .long_context import print_long_table, run_long

        long_rows = run_long(
            model, tokenizer, args.long or [4096, 8192], args.long_limit, args.prefill_chunk, args.seed, args.device
        )
        print_long_table(long_rows)
        rows += long_rows
    env = environment(model, args.device, model.dtype, started)
    env["batch_size"] = args.batch_size
    env["decode_steps"] = args.decode_steps
    results = {"environment": env, "task": task.name, "rows": [asdict(r) for r in rows]}
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    png = args.out / "pareto.png"
    wrote_png = plot(rows, png)
    print(f"\nwrote {args.out / 'results.json'}" + (f" and {png}" if wrote_png else " (install matplotlib for the plot)"))
    print(f"{len(rows)} rows in {env['seconds']} s on {env['device']} ({env['threads']} threads), {env['dtype']}")
    print(f"machine: {env['machine']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
