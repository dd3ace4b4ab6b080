"""The compression cube: selection x quantization x low rank, on one accuracy-vs-bandwidth table and plot.

``python -m kvcache_plugins.bench.cube`` (or ``kvcache-bench --cube``) runs every combination of

* selection: none or ``q2c:0.5`` (positions),
* quantization: none, ``int8`` or ``int4`` (bits per element; with low rank the factors are quantized),
* low rank: none or ``svd:<r>`` for r in 4, 8, 16 and head_dim (elements per position; keys factored before RoPE),

on the embedded model's retrieval prompts (512 and 2048 tokens by default), and prints each cell's exact match
with a 95% Wilson interval, its % bandwidth (bytes held / the full cache in the model dtype), and, per bandwidth
budget, which cell scores best: the question "which axis wins where" answered on one table. ``cube.json`` and
``cube.png`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..specs import parse_spec
from .measure import Row, environment, run_cache
from .plot import save_figure
from .stats import wilson_interval

BUDGETS = (0.10, 0.20, 0.35, 0.55, 1.0)


def cube_specs(ranks: tuple[int, ...] = (4, 8, 16, 32), selection: str = "q2c:0.5") -> list[str]:
    """Every (selection, quantization, rank) cell as a spec string, ``full`` first."""
    out = []
    for sel in ("", selection):
        for rank in (None, *ranks):
            for quant in ("", "int8", "int4"):
                parts = [p for p in (sel, f"svd:{rank}" if rank else "", quant) if p]
                out.append("+".join(parts) if parts else "full")
    return out


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` observed over ``n`` trials (:func:`.stats.wilson_interval`)."""
    return wilson_interval(round(p * n), n, z) if n else (float("nan"), float("nan"))


def axes(spec: str) -> tuple[str, str, str]:
    s = parse_spec(spec)
    rank = "-" if s.lowrank is None else str(s.lowrank[0])
    return (s.selector and f"{s.selector}:{s.retention:g}") or "-", rank, s.preset or "-"


def print_cube(rows: list[Row], out=None) -> None:
    out = out or sys.stdout
    for tokens in dict.fromkeys(r.tokens for r in rows):
        pts = sorted((r for r in rows if r.tokens == tokens), key=lambda r: r.bandwidth)
        print(f"\n{tokens} tokens ({pts[0].prompts} prompts per cell), sorted by bandwidth", file=out)
        print(f"{'cache':<24}{'select':>9}{'rank':>6}{'quant':>7}{'% bw':>8}{'EM':>7}{'95% interval':>16}", file=out)
        for r in pts:
            sel, rank, quant = axes(r.cache)
            lo, hi = wilson(r.score, r.prompts)
            print(f"{r.cache:<24}{sel:>9}{rank:>6}{quant:>7}{r.bandwidth:>8.1%}{r.score:>7.3f}   [{lo:.3f}, {hi:.3f}]",
                  file=out)
        print("best cell within a bandwidth budget:", file=out)
        for budget in BUDGETS:
            within = [r for r in pts if r.bandwidth <= budget]
            if within:
                best = max(within, key=lambda r: (r.score, -r.bandwidth))
                print(f"  <= {budget:>4.0%}: {best.cache:<24} EM {best.score:.3f} at {best.bandwidth:.1%}", file=out)


def plot_cube(rows: list[Row], path: Path) -> bool:
    """Write the cube's picture (one panel per length) to ``path``; False if matplotlib is missing."""
    return save_figure(lambda: cube_figure(rows), path)


def cube_figure(rows: list[Row]):
    """The matplotlib figure of the cube: % bandwidth vs exact match, colour the rank, marker the quantization."""
    import matplotlib.pyplot as plt

    lengths = list(dict.fromkeys(r.tokens for r in rows))
    fig, axs = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.8), squeeze=False)
    colors = {"-": "black", "4": "tab:red", "8": "tab:orange", "16": "tab:green", "32": "tab:blue"}
    markers = {"-": "o", "int8": "s", "int4": "^"}
    for ax, tokens in zip(axs[0], lengths):
        for r in (r for r in rows if r.tokens == tokens):
            sel, rank, quant = axes(r.cache)
            lo, hi = wilson(r.score, r.prompts)
            err = [[max(0.0, r.score - lo)], [max(0.0, hi - r.score)]]
            ax.errorbar(r.bandwidth * 100, r.score, yerr=err, fmt=markers.get(quant, "o"),
                        color=colors.get(rank, "gray"), mfc="none" if sel != "-" else None, ms=6, capsize=2, lw=0.8)
        for rank, c in colors.items():
            ax.plot([], [], "o", color=c, label=f"rank {rank}" if rank != "-" else "no low rank")
        for quant, m in markers.items():
            ax.plot([], [], m, color="gray", label=quant if quant != "-" else "16-bit")
        ax.plot([], [], "o", mfc="none", color="gray", label="q2c:0.5 (hollow)")
        ax.set_xscale("log")
        ax.set_xlabel("% bandwidth (log)")
        ax.set_ylabel("exact match (95% Wilson interval)")
        ax.set_title(f"compression cube, {tokens} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    from .tasks import RetrievalTask

    parser = argparse.ArgumentParser(prog="python -m kvcache_plugins.bench.cube", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--limit", type=int, default=None, help="prompts per length (default: 48 at 512, 24 above)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--replot", action="store_true", help="print and plot the cube.json already in --out")
    args = parser.parse_args(argv)
    if args.replot:
        rows = [Row(**r) for r in json.loads((args.out / "cube.json").read_text())["rows"]]
        print_cube(rows)
        plot_cube(rows, args.out / "cube.png")
        return 0

    specs = [parse_spec(s) for s in cube_specs(tuple(args.ranks))]
    task = RetrievalTask()
    model, tokenizer = task.load_model("embedded", torch.float32, "cpu")
    rows, started = [], time.time()
    for tokens in args.tokens:
        limit = args.limit or (48 if tokens <= 512 else 24)
        batches = task.batches(tokenizer, tokens, limit, args.batch_size, args.seed, "cpu")
        for spec in specs:
            rows.append(run_cache(model, tokenizer, task, spec, tokens, batches, task.max_new_tokens))
            print(f"  {tokens} tokens {spec.text}: EM {rows[-1].score:.3f}", file=sys.stderr)
    print_cube(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(model, "cpu", model.dtype, started)
    (args.out / "cube.json").write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2))
    wrote = plot_cube(rows, args.out / "cube.png")
    print(f"\nwrote {args.out / 'cube.json'}" + (f" and {args.out / 'cube.png'}" if wrote else ""))
    print(f"{len(rows)} cells in {env['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
