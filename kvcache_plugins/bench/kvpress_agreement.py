"""Agreement with NVIDIA's kvpress: which positions each method keeps, ours vs theirs, on one saved model and prompt.

kvpress pins ``transformers<5.3`` while this package runs on 5.4-5.24, so the two never share an environment.
This script writes a small kvpress-side program next to the inputs (the embedded reference model's path and one
retrieval prompt of ``--tokens`` tokens), runs it with the interpreter of an environment where kvpress is installed
(``--kvpress-python``), reads back the positions every press kept (per layer and KV head) and computes ours with the
aligned settings here. kvpress is never imported by the package and no test needs it::

    python -m venv /work/venvs/kvpress && /work/venvs/kvpress/bin/pip install torch==2.13.0 kvpress
    python -m kvcache_plugins.bench.kvpress_agreement --kvpress-python /work/venvs/kvpress/bin/python

Without ``--kvpress-python`` it only writes the inputs and the kvpress-side program and prints how to run it; then
``--kvpress-positions <file>`` compares a result produced elsewhere.

Overlap of one method = mean over layers (and KV heads) of ``|ours & theirs| / |theirs|``; for adakv, per layer,
over all (head, position) pairs. Aligned settings: no question span; the same budget
``n_kept = int(n * (1 - compression))``, given to us as ``max_tokens``; kvpress' defaults (window 64, kernel 5,
4 sinks, lag 128, floor 0.2) and ours set to match; TOVA keeps the last token in both (kvpress scores it highest,
here it is the question span); PyramidKV with ``beta=4`` so that kvpress does not fall back to uniform budgets
(it does when the smallest layer budget would be under its window).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

#: method -> (kvpress press expression, attention implementation there, our CompressedCache options)
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "snapkv": ("SnapKVPress(compression_ratio=CR, window_size=64, kernel_size=5)", "sdpa",
               dict(selector="snapkv", window=64, kernel=5, granularity="head")),
    "tova": ("TOVAPress(compression_ratio=CR)", "sdpa", dict(selector="tova", granularity="layer", question_len=1)),
    "keydiff": ("KeyDiffPress(compression_ratio=CR)", "sdpa", dict(selector="keydiff", granularity="head")),
    "lagkv": ("LagKVPress(compression_ratio=CR, n_sink=4, lag_size=128)", "sdpa",
              dict(selector="lagkv", lag=128, sink_tokens=4, granularity="head")),
    "expected_attention": ("ExpectedAttentionPress(compression_ratio=CR, n_sink=4)", "sdpa",
                           dict(selector="expected_attention", window=4096, sink_tokens=4, granularity="head")),
    "h2o": ("ObservedAttentionPress(compression_ratio=CR)", "eager", dict(selector="h2o", granularity="head")),
    "knorm": ("KnormPress(compression_ratio=CR)", "sdpa", dict(selector="knorm", granularity="head")),
    "streaming": ("StreamingLLMPress(compression_ratio=CR, n_sink=4)", "sdpa",
                  dict(selector="streaming", sink_tokens=4, granularity="layer")),
    "snapkv+pyramid": ("PyramidKVPress(compression_ratio=CR, window_size=64, kernel_size=5, beta=4)", "sdpa",
                       dict(selector="snapkv", window=64, kernel=5, granularity="head", budget="pyramid:4")),
    "snapkv+adakv": ("AdaKVPress(SnapKVPress(compression_ratio=CR, window_size=64, kernel_size=5), alpha_safeguard=0.2)",
                     "sdpa", dict(selector="snapkv", window=64, kernel=5, granularity="head", budget="adakv")),
}

KVPRESS_SIDE = '''
"""Run by kvcache_plugins.bench.kvpress_agreement in an environment with kvpress: kept positions per press."""
import json
import sys
from importlib.metadata import version

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, DynamicCache
from kvpress import *  # noqa: F401,F403  (the press expressions below name kvpress classes)

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
inputs = json.load(open(sys.argv[1]))
ids = torch.tensor([inputs["ids"]])
result = {"kvpress_version": version("kvpress"), "transformers": transformers.__version__, "methods": {}}
# this environment has no kvcache_plugins, so its _compat.no_hub_kernels() is restated: from 5.25 on from_pretrained
# kernelizes from the Hub by default (and raises without `kernels`); the saved model loads on torch's kernels here
no_hub_kernels = {"use_kernels": False} if Version(transformers.__version__).release >= (5, 25) else {}
for name, (expression, attn) in inputs["methods"].items():
    model = AutoModelForCausalLM.from_pretrained(
        inputs["model"], attn_implementation=attn, dtype=torch.float32, **no_hub_kernels
    ).eval()
    press = eval(expression.replace("CR", repr(inputs["compression"])))
    kept = {}
    original = press.compress

    def compress(module, hidden_states, keys, values, attentions, kwargs, _original=original):
        out_k, out_v = _original(module, hidden_states, keys, values, attentions, kwargs)
        masked = getattr(module, "masked_key_indices", None)
        if masked is not None:  # AdaKV masks instead of evicting: kept = not masked
            keep = torch.ones(keys.shape[:3], dtype=torch.bool)
            keep[masked[0], masked[1], masked[2]] = False
            module.masked_key_indices = None
        else:  # find each kept key among the prompt's keys (gathered copies match exactly)
            keep = (out_k[0].unsqueeze(2) == keys[0].unsqueeze(1)).all(-1).any(1).unsqueeze(0)
        kept[module.layer_idx] = [row.nonzero().flatten().tolist() for row in keep[0]]
        return out_k, out_v

    press.compress = compress
    with torch.no_grad(), press(model):
        model(ids, past_key_values=DynamicCache())
    result["methods"][name] = {str(k): v for k, v in sorted(kept.items())}
json.dump(result, open(sys.argv[2], "w"))
'''


def prompt_ids(tokens: int, seed: int) -> list[int]:
    """One single-hop retrieval prompt of about ``tokens`` tokens for the embedded reference model."""
    from ..reference import load_reference_model
    from ..tasks.kv_retrieval import make_example

    _, tokenizer = load_reference_model()
    example = make_example(random.Random(seed), tokens)
    return tokenizer(example.prompt, add_special_tokens=False).input_ids


def export(out: Path, tokens: int, compression: float, seed: int) -> Path:
    """Write ``inputs.json`` and ``kvpress_side.py`` to ``out``; returns the inputs' path."""
    from ..reference import reference_model_path

    out.mkdir(parents=True, exist_ok=True)
    inputs = {
        "model": str(reference_model_path()), "ids": prompt_ids(tokens, seed), "compression": compression,
        "methods": {name: [expr, attn] for name, (expr, attn, _) in METHODS.items()},
    }
    (out / "inputs.json").write_text(json.dumps(inputs))
    (out / "kvpress_side.py").write_text(textwrap.dedent(KVPRESS_SIDE))
    return out / "inputs.json"


def our_positions(inputs: dict[str, Any]) -> dict[str, dict[str, list[list[int]]]]:
    """Per method and layer, the prompt positions each KV head keeps with our CompressedCache."""
    from .._compat import cache_kwargs
    from ..caches import CompressedCache
    from ..reference import load_reference_model
    from ..selection.budget import Pyramid

    model, _ = load_reference_model()
    ids = torch.tensor([inputs["ids"]])
    n = ids.shape[1]
    n_kept = max(1, int(n * (1 - inputs["compression"])))
    out = {}
    for name, (_, _, options) in METHODS.items():
        options = dict(options)
        if options.get("budget") == "pyramid:4":
            options["budget"] = Pyramid(beta=4)
        cache = CompressedCache(model, max_tokens=n_kept, **options)
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache))
        out[name] = {}
        for idx in cache.compressed_layers:
            kept = cache.kept_positions(idx)[0]  # [H_s, S]
            out[name][str(idx)] = [[int(p) for p in row.tolist() if p >= 0] for row in kept]
    return out


def overlap(ours: dict[str, list[list[int]]], theirs: dict[str, list[list[int]]]) -> tuple[float, float]:
    """(mean, min) over layers of the kept-position overlap (pairs (head, position) pooled per layer)."""
    per_layer = []
    for layer, their_heads in theirs.items():
        mine = ours[layer]
        mine = mine * len(their_heads) if len(mine) == 1 else mine  # one shared set: compare with every head
        a = {(h, p) for h, row in enumerate(mine) for p in row}
        b = {(h, p) for h, row in enumerate(their_heads) for p in row}
        per_layer.append(len(a & b) / max(1, len(b)))
    return sum(per_layer) / len(per_layer), min(per_layer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvcache_plugins.bench.kvpress_agreement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kvpress-python", help="python of an environment with kvpress installed")
    parser.add_argument("--kvpress-positions", help="a kvpress_positions.json produced elsewhere")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--compression", type=float, default=0.75, help="kvpress compression_ratio (0.75: keep 25%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="kvpress_agreement_out")
    args = parser.parse_args(argv)
    if not 0 < args.compression < 1:
        raise ValueError(f"--compression must be in (0, 1), got {args.compression}")
    out = Path(args.out)
    inputs_path = export(out, args.tokens, args.compression, args.seed)
    positions = Path(args.kvpress_positions) if args.kvpress_positions else out / "kvpress_positions.json"
    if args.kvpress_python:
        subprocess.run([args.kvpress_python, str(out / "kvpress_side.py"), str(inputs_path), str(positions)], check=True)
    elif not args.kvpress_positions:
        print(f"wrote {inputs_path}; in the kvpress environment run\n  python {out / 'kvpress_side.py'} {inputs_path} "
              f"{positions}\nthen rerun with --kvpress-positions {positions}")
        return 0
    theirs = json.loads(positions.read_text())
    inputs = json.loads(inputs_path.read_text())
    ours = our_positions(inputs)
    n = len(inputs["ids"])
    print(f"kvpress agreement: embedded reference model, {n}-token prompt, keep {int(n * (1 - args.compression))} "
          f"(kvpress {theirs.get('kvpress_version')} on transformers {theirs.get('transformers')})")
    print(f"{'method':<20} {'overlap':>8} {'min layer':>10}")
    report = {}
    for name in METHODS:
        mean, low = overlap(ours[name], theirs["methods"][name])
        report[name] = {"overlap": mean, "min_layer": low}
        print(f"{name:<20} {mean:8.3f} {low:10.3f}")
    (out / "agreement.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
