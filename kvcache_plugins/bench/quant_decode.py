"""Decode speed and memory of MixedPrecisionCache vs DynamicCache vs transformers' QuantizedCache.

Run: ``python -m kvcache_plugins.bench.quant_decode`` (options: ``--lengths 2048 8192 --steps 64 --rounds 3``).

A tiny random Qwen2 (4 layers, hidden 256, 4 heads, 2 KV heads, head_dim 64) prefills a prompt and then
decodes greedily one token per forward. Every cache is measured in the same process, interleaved round by round
(the order rotates each round), so machine noise hits all of them alike; the table reports the median decode
time per token over all steps and rounds, the bytes each cache holds at the end, and ratios. Absolute times on a
shared machine are noise; the ratios are the result.

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
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from .._compat import cache_kwargs
from ..caches.accounting import tensor_bytes
from ..caches.layers import MixedPrecisionLayer
from ..caches.mixed_precision import MixedPrecisionCache
from ..quant.groupwise import default_meta_dtype
from ..quant.packing import packed_last_dim
from ..quant.spec import LayerQuantSpec


def tiny_qwen2(dtype: torch.dtype = torch.float32, seed: int = 0) -> Qwen2ForCausalLM:
    """The benchmark model: Qwen2 with 4 layers, hidden 256, 4 heads, 2 KV heads; random weights."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
    )
    return Qwen2ForCausalLM(config).to(dtype).eval()


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


def _flattened_bytes(obj: object) -> int:
    """Bytes of a tensor or tensor subclass (quanto's packed tensors), via the ``__tensor_flatten__`` protocol."""
    if hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(_flattened_bytes(getattr(obj, n)) for n in names)
    return tensor_bytes(obj) if isinstance(obj, torch.Tensor) else 0


def held_bytes(cache: object) -> int:
    """Bytes a cache holds: exact accounting for ours, tensor storage for transformers' caches."""
    if hasattr(cache, "memory_footprint"):
        return cache.memory_footprint().total
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _flattened_bytes(getattr(layer, name, None))
    return total


@dataclass
class Row:
    name: str
    make: Callable[[], object]
    step_ms: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    nbytes: int = 0
    closed_form: int | None = None
    tokens_match: bool | None = None


def _run_once(model, prompt: torch.Tensor, row: Row, steps: int) -> list[int]:
    cache = row.make()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(prompt, **cache_kwargs(model, cache), use_cache=True)
        row.prefill_ms.append((time.perf_counter() - t0) * 1e3)
        token = out.logits[:, -1:].argmax(-1)
        generated = [int(token)]
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            out = model(token, **cache_kwargs(model, cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            row.step_ms.append((time.perf_counter() - t0) * 1e3)
            generated.append(int(token))
    row.nbytes = held_bytes(cache)
    if isinstance(cache, MixedPrecisionCache):
        cfg = model.config
        hd = cfg.hidden_size // cfg.num_attention_heads
        tokens = cache.get_seq_length()
        row.closed_form = sum(
            closed_form_layer_bytes(
                layer.spec if isinstance(layer, MixedPrecisionLayer) else None,
                prompt.shape[0], cfg.num_key_value_heads, tokens, hd, model.dtype,
            )
            for layer in cache.layers
        )
    return generated


def quanto_available() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def run(lengths: list[int], steps: int, rounds: int, dtype: torch.dtype, out=None) -> list[dict]:
    out = out or sys.stdout
    model = tiny_qwen2(dtype)
    cfg = model.config
    rows_out: list[dict] = []
    for length in lengths:
        prompt = torch.randint(0, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        rows = [
            Row("DynamicCache", lambda: DynamicCache(config=cfg)),
            Row("Mixed int4", lambda: MixedPrecisionCache(model, "int4")),
            Row("Mixed mixed_l0", lambda: MixedPrecisionCache(model, "mixed_l0")),
            Row("Mixed int8", lambda: MixedPrecisionCache(model, "int8")),
        ]
        if quanto_available():
            from transformers import QuantizedCache

            rows.append(Row("QuantizedCache quanto int4", lambda: QuantizedCache("quanto", cfg, nbits=4)))
        else:
            print("optimum-quanto is not installed: QuantizedCache row skipped (pip install optimum-quanto)", file=out)
        reference_tokens = None
        for r in range(rounds):
            order = rows[r % len(rows) :] + rows[: r % len(rows)]
            for row in order:
                tokens = _run_once(model, prompt, row, steps)
                if row.name == "DynamicCache":
                    reference_tokens = tokens
                row._last_tokens = tokens  # type: ignore[attr-defined]
        for row in rows:
            row.tokens_match = row._last_tokens == reference_tokens  # type: ignore[attr-defined]
        base = {row.name: statistics.median(row.step_ms) for row in rows}
        dyn_ms, dyn_bytes = base["DynamicCache"], rows[0].nbytes
        quanto_ms = base.get("QuantizedCache quanto int4")
        print(
            f"\nprompt {length} tokens, {steps} greedy decode steps, {rounds} interleaved rounds, {dtype}, "
            f"{torch.get_num_threads()} threads",
            file=out,
        )
        header = (
            f"{'cache':<28}{'bytes held':>12}{'vs closed':>10}{'vs Dyn':>8}{'ms/token':>10}{'x Dyn':>8}"
            f"{'x Quanto':>10}{'same tokens':>12}"
        )
        print(header, file=out)
        print("-" * len(header), file=out)
        for row in rows:
            ms = base[row.name]
            closed = f"{row.nbytes / row.closed_form - 1:+.2%}" if row.closed_form else "-"
            vs_q = f"{ms / quanto_ms:.2f}" if quanto_ms else "-"
            print(
                f"{row.name:<28}{row.nbytes:>12,}{closed:>10}{row.nbytes / dyn_bytes:>8.3f}{ms:>10.3f}"
                f"{ms / dyn_ms:>8.2f}{vs_q:>10}{str(row.tokens_match):>12}",
                file=out,
            )
            rows_out.append(
                {
                    "prompt_tokens": length,
                    "cache": row.name,
                    "bytes": row.nbytes,
                    "closed_form_bytes": row.closed_form,
                    "decode_ms_per_token": ms,
                    "ratio_vs_dynamic": ms / dyn_ms,
                    "ratio_vs_quanto": (ms / quanto_ms) if quanto_ms else None,
                    "bytes_vs_dynamic": row.nbytes / dyn_bytes,
                    "prefill_ms": statistics.median(row.prefill_ms),
                }
            )
    return rows_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192],
                        help="prompt lengths (default: 2048 8192)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per cache (default: 64)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default: 3)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="model dtype (default: float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.lengths, args.steps, args.rounds, getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
