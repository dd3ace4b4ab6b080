"""Decode speed and memory of MixedPrecisionCache vs DynamicCache vs transformers' QuantizedCache.

Run: ``python -m kvcache_plugins.bench.quant_decode`` (options: ``--lengths 2048 8192 32768 --batches 1 4
--steps 64 --rounds 3 --h2o``; the default measures 2k and 8k tokens at batch 1 and 4).

A tiny random Qwen2 (4 layers, hidden 256, 4 heads, 2 KV heads, head_dim 64) prefills a prompt and then
decodes greedily one token per forward. The prompt is prefilled once per (batch, length) with a DynamicCache and its
per-layer keys and values are handed to each fresh cache through ``cache.update``, which is what the model's
prefill forward does to a cache (32k-token prompts would otherwise cost minutes per row); caches that select during
prefill (the ``--h2o`` rows) run their own prefill (a row's ``prefill_ms`` is that prefill, or the hand-over).
Every cache is measured in the same process, interleaved round
by round (the order rotates each round), so machine noise hits all of them alike; the table reports the median
decode time per token over all steps and rounds (``tok/s`` counts every row of the batch), the bytes each cache
holds at the end, and ratios. Absolute times on a shared machine are noise; the ratios are the result.

``Mixed int4`` decodes through the fused kernels (attention straight from the packed codes,
:mod:`kvcache_plugins.attention.fused`, and the compiled quantize-and-append); ``Mixed int4 ref`` is the same cache
with ``fused=False`` (dequantize the past, then sdpa). Fused rows are warmed up before anything is timed
(``cache.warmup``; ``warm-up s`` is what it took, compiling included the first time a kernel is met in the process,
and the timed choice of the decode path, :mod:`kvcache_plugins.attention.paths`, printed under the table with the
machine: CPU capability, the C++ kernel's build, threads; ``KVCACHE_PLUGINS_CPU_ISA=avx2`` measures the AVX2 build
on a wider machine, ``ATEN_CPU_CAPABILITY=avx2`` does the same for torch's own kernels);
``first s`` is the first decode step of the first round, which after the warm-up compiles nothing. ``--h2o`` adds
``CompressedCache`` rows (snapkv keeps half the prompt, int4, ``decode_policy="h2o"`` evicts by accumulated
attention), fused vs reference path: the fused path takes the attention probabilities from the kernel. ``same
tokens`` compares greedy tokens with DynamicCache (the h2o rows with each other). ``decode peak`` is the memory that
decoding needed beyond what was held when it started: the peak of ``torch.cuda.max_memory_allocated`` on CUDA, the
rise of the process' peak resident set (``VmHWM``, reset before decoding) on CPU. A cache that rebuilds a
full-precision copy of its history each step shows that copy there.

For our caches the bytes are also compared with the closed form: quantized tokens cost ``b + 2*m/g`` bits per
element (``m`` = bits of the stored scale and zero), full-precision tokens (residual, sinks, 16-bit layers) cost
the model dtype.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .. import _model, compiler
from ..attention import paths
from .._compat import cache_kwargs
from ..caches.compressed import CompressedCache
from ..layers.mixed import MixedPrecisionLayer
from ..caches.mixed_precision import MixedPrecisionCache
from ..quant.groupwise import default_meta_dtype
from ..quant.packing import packed_last_dim
from ..quant.spec import LayerQuantSpec
from .measure import PeakMemory, held_bytes, tiny_qwen2


def closed_form_layer_bytes(
    spec: LayerQuantSpec | None, batch: int, heads: int, tokens: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one layer must hold for ``tokens`` tokens under ``spec`` (``None`` = model precision)."""
    full_elem = torch.empty((), dtype=dtype).element_size()
    meta_bytes = torch.empty((), dtype=default_meta_dtype(dtype)).element_size()
    total = 0
    for t in (spec.key, spec.value) if spec is not None else (None, None):
        if t is None or not t.quantized:
            total += batch * heads * tokens * head_dim * full_elem
            continue
        quantizable = max(0, tokens - spec.sink_tokens - spec.residual_length)
        if t.axis == "channel":
            quantizable -= quantizable % t.group_size
        groups = quantizable * head_dim // t.group_size
        total += batch * heads * (quantizable * packed_last_dim(head_dim, t.bits) + 2 * groups * meta_bytes)
        total += batch * heads * (tokens - quantizable) * head_dim * full_elem
    return total


@dataclass
class Row:
    name: str
    make: Callable[[], object]
    step_ms: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    first_step_s: float | None = None
    warmup_s: float | None = None
    #: fed the shared prefill through ``cache.update`` (False: runs the model's prefill, e.g. selecting caches)
    replay: bool = True
    #: the row whose greedy tokens this one must reproduce
    compare_to: str = "DynamicCache"
    decode_peak: int = 0
    nbytes: int = 0
    closed_form: int | None = None
    tokens_match: bool | None = None
    #: the decode path the cache took and why (``cache.decode_path``)
    decode_path: str | None = None


@dataclass
class Prefilled:
    """The prompt's keys and values per layer and its last logits, from one DynamicCache prefill."""

    states: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    seconds: float


def prefill_once(model, prompt: torch.Tensor) -> Prefilled:
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, **cache_kwargs(model, cache))
        seconds = time.perf_counter() - t0
    states = [(layer.keys, layer.values) for layer in cache.layers]
    return Prefilled(states, out.logits[:, -1:].clone(), seconds)


def _run_once(
    model, prompt: torch.Tensor, row: Row, steps: int, prefilled: Prefilled | None = None
) -> list[list[int]]:
    cache = row.make()
    kwargs = cache_kwargs(model, cache)
    peak = PeakMemory(prompt.device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        if prefilled is None:
            logits = model(prompt, use_cache=True, **kwargs).logits[:, -1:]
        else:
            # what the model's prefill forward does to a cache: one update per layer with the prompt's states
            for i, (k, v) in enumerate(prefilled.states):
                cache.update(k.clone(), v.clone(), i)
            logits = prefilled.logits
        row.prefill_ms.append((time.perf_counter() - t0) * 1e3)
        token = logits.argmax(-1)
        generated = [token]
        del logits
        for i in range(steps - 1):
            if i == 1:
                peak.start()
            t0 = time.perf_counter()
            out = model(token, use_cache=True, **kwargs)
            token = out.logits[:, -1:].argmax(-1)
            if prompt.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if i == 0:  # the first step may compile kernels: reported apart, never in the medians
                if row.first_step_s is None:
                    row.first_step_s = elapsed
            else:
                row.step_ms.append(elapsed * 1e3)
            generated.append(token)
        row.decode_peak = max(row.decode_peak, peak.stop())
    row.nbytes = held_bytes(cache)
    if getattr(cache, "decode_path", None) is not None:
        row.decode_path = str(cache.decode_path)
    if isinstance(cache, MixedPrecisionCache):
        cfg = model.config
        tokens = cache.get_seq_length()
        row.closed_form = sum(
            closed_form_layer_bytes(
                layer.spec if isinstance(layer, MixedPrecisionLayer) else None,
                prompt.shape[0], cfg.num_key_value_heads, tokens, _model.head_dim(cfg), model.dtype,
            )
            for layer in cache.layers
        )
    return torch.cat(generated, dim=1).tolist()


def quanto_available() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def run(
    lengths: list[int],
    steps: int,
    rounds: int,
    dtype: torch.dtype,
    out=None,
    batches: list[int] | tuple[int, ...] = (1, 4),
    device: str = "cpu",
    h2o: bool = False,
) -> list[dict]:
    out = out or sys.stdout
    if steps < 3:
        raise ValueError(f"steps must be at least 3 (the first decode step is reported apart), got {steps}")
    model = tiny_qwen2(dtype).to(device)
    rows_out: list[dict] = []
    for batch in batches:
        for length in lengths:
            rows_out += _run_config(model, batch, length, steps, rounds, dtype, out, h2o)
    return rows_out


def _h2o_cache(model, length: int, fused: bool) -> CompressedCache:
    """SnapKV keeps half the prompt, then decoding evicts by accumulated attention (h2o) to stay within it."""
    return CompressedCache(
        model, selector="snapkv", retention=0.5, question_len=32, quant="int4", max_tokens=length // 2,
        decode_policy="h2o", evict_every=16, fused=fused,
    )


def _run_config(
    model, batch: int, length: int, steps: int, rounds: int, dtype: torch.dtype, out, h2o: bool = False
) -> list[dict]:
    cfg = model.config
    device = model.device
    gen = torch.Generator().manual_seed(length)
    prompt = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen).to(device)
    rows = [
        Row("DynamicCache", lambda: DynamicCache(config=cfg)),
        Row("Mixed int4", lambda: MixedPrecisionCache(model, "int4")),
        Row("Mixed int4 ref", lambda: MixedPrecisionCache(model, "int4", fused=False)),
        Row("Mixed mixed_l0", lambda: MixedPrecisionCache(model, "mixed_l0")),
        Row("Mixed int8", lambda: MixedPrecisionCache(model, "int8")),
    ]
    if quanto_available():
        from transformers import QuantizedCache

        rows.append(Row("QuantizedCache quanto int4", lambda: QuantizedCache("quanto", cfg, nbits=4)))
    else:
        print("optimum-quanto is not installed: QuantizedCache row skipped (pip install optimum-quanto)", file=out)
    if h2o:
        ref = "Compressed h2o int4 ref"
        rows.append(Row("Compressed h2o int4", lambda: _h2o_cache(model, length, True), replay=False, compare_to=ref))
        rows.append(Row(ref, lambda: _h2o_cache(model, length, False), replay=False,
                        compare_to="Compressed h2o int4"))
    prefilled = prefill_once(model, prompt)
    for row in rows:  # compile the fused kernels before timing anything (the cost is reported)
        cache = row.make()
        if hasattr(cache, "warmup"):
            row.warmup_s = cache.warmup(model, batch)
    last: dict[str, list] = {}
    for r in range(rounds):
        order = rows[r % len(rows) :] + rows[: r % len(rows)]
        for row in order:
            last[row.name] = _run_once(model, prompt, row, steps, prefilled if row.replay else None)
    for row in rows:
        row.tokens_match = last[row.name] == last[row.compare_to]
    base = {row.name: statistics.median(row.step_ms) for row in rows}
    dyn_ms, dyn_bytes = base["DynamicCache"], rows[0].nbytes
    quanto_ms = base.get("QuantizedCache quanto int4")
    kernels = "compiled" if compiler.COMPILE else "eager (KVCACHE_PLUGINS_COMPILE=0)"
    print(
        f"\nbatch {batch}, prompt {length} tokens, {steps} greedy decode steps ({steps - 2} timed per round), "
        f"{rounds} interleaved rounds, {dtype}, {device}, {torch.get_num_threads()} threads, fused kernels {kernels}",
        file=out,
    )
    print(f"machine: {paths.machine(device)}", file=out)
    print(
        f"prompt prefilled once with DynamicCache in {prefilled.seconds:.1f} s and handed to each cache through "
        "cache.update (what the model's prefill does); selecting caches (h2o rows) run their own prefill",
        file=out,
    )
    header = (
        f"{'cache':<28}{'bytes held':>13}{'vs closed':>10}{'vs Dyn':>8}{'decode peak':>13}{'ms/token':>10}"
        f"{'tok/s':>8}{'x Dyn':>7}{'x Quanto':>9}{'warm-up s':>10}{'first s':>9}{'same tokens':>12}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    rows_out = []
    for row in rows:
        ms = base[row.name]
        closed = f"{row.nbytes / row.closed_form - 1:+.2%}" if row.closed_form else "-"
        vs_q = f"{ms / quanto_ms:.2f}" if quanto_ms else "-"
        warm = "-" if row.warmup_s is None else f"{row.warmup_s:.2f}"
        print(
            f"{row.name:<28}{row.nbytes:>13,}{closed:>10}{row.nbytes / dyn_bytes:>8.3f}{row.decode_peak:>13,}"
            f"{ms:>10.3f}{1e3 * batch / ms:>8.0f}{ms / dyn_ms:>7.2f}{vs_q:>9}{warm:>10}{row.first_step_s:>9.2f}"
            f"{str(row.tokens_match):>12}",
            file=out,
        )
        rows_out.append(
            {
                "batch": batch,
                "prompt_tokens": length,
                "cache": row.name,
                "bytes": row.nbytes,
                "closed_form_bytes": row.closed_form,
                "decode_peak_bytes": row.decode_peak,
                "decode_ms_per_token": ms,
                "decode_tokens_per_s": 1e3 * batch / ms,
                "ratio_vs_dynamic": ms / dyn_ms,
                "ratio_vs_quanto": (ms / quanto_ms) if quanto_ms else None,
                "bytes_vs_dynamic": row.nbytes / dyn_bytes,
                "prefill_ms": statistics.median(row.prefill_ms),
                "first_step_s": row.first_step_s,
                "warmup_s": row.warmup_s,
                "same_tokens": row.tokens_match,
                "same_tokens_as": row.compare_to,
                "decode_path": row.decode_path,
                "machine": paths.machine(device),
            }
        )
    for row in rows:
        if row.decode_path:
            print(f"decode path of {row.name}: {row.decode_path}", file=out)
    if "Compressed h2o int4" in base:
        print(
            f"h2o decode from the packed codes (kernel probabilities) vs the reference path: "
            f"{base['Compressed h2o int4'] / base['Compressed h2o int4 ref']:.2f}x per token",
            file=out,
        )
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192],
                        help="prompt lengths (default: 2048 8192; e.g. 32768 too)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes (default: 1 4)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per cache (default: 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default: 3)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="model dtype (default: float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--h2o", action="store_true",
                        help="also CompressedCache rows (snapkv 50%%, int4, decode_policy='h2o'), fused vs reference")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.lengths, args.steps, args.rounds, getattr(torch, args.dtype), batches=args.batches, device=args.device,
        h2o=args.h2o)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
