"""The measuring code the benchmark commands share: result rows, greedy generation timed from inside ``generate()``,
bytes held, peak memory (CUDA allocator or resident set, here or in a fresh process) and the tiny benchmark model.
Data flows one way: the commands import this module; it imports only the package, never a command."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

from .. import __version__
from .._compat import cache_kwargs
from ..attention import paths
from ..layers.accounting import tensor_bytes
from ..specs import CacheSpec, make_cache
from .plot import series_name
from .stats import score_interval


@dataclass
class Row:
    cache: str
    tokens: int
    task: str
    score: float = 0.0
    score_ci95: list[float] = field(default_factory=list)  # [low, high], 95%: Wilson (exact match) or bootstrap
    score_ci95_by_kind: dict[str, list[float]] = field(default_factory=dict)  # kind -> [low, high]
    series: str = ""  # the plot's line: the spec without its retention (see bench.plot.series_name)
    retention: float | None = None
    pct_of_full: float | None = None
    kv_bytes: float = 0.0
    bandwidth: float = 0.0
    prefill_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    prompts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Clock(transformers.LogitsProcessor):
    """Timestamps each generation step (after each forward pass)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def environment(model: Any, device: str, dtype: torch.dtype, started: float | None = None) -> dict[str, Any]:
    """Versions, machine and model of a run; ``seconds`` since ``started`` (a ``time.time()``) when given."""
    env = {
        "kvcache_plugins": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": str(dtype),
        "threads": torch.get_num_threads(),
        "machine": paths.machine(device),
        "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "attn_implementation": model.config._attn_implementation,
    }
    if started is not None:
        env["seconds"] = round(time.time() - started, 1)
    return env


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, cache, max_new_tokens: int, pad_token_id: int | None = None,
           **kwargs: Any) -> torch.Tensor:
    """``model.generate`` without sampling, reading and writing ``cache`` (``None``: the model's default cache);
    ``ids``, ``mask``: ``[B, T]``; returns ``[B, T + new]``."""
    if pad_token_id is not None:
        kwargs["pad_token_id"] = pad_token_id
    caching = {} if cache is None else cache_kwargs(model, cache)
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, **caching, max_new_tokens=max_new_tokens, do_sample=False,
                              **kwargs)


def decode_timing(model, tokenizer, cache, out: torch.Tensor, mask: torch.Tensor, steps: int) -> float:
    """Tokens/s of ``steps`` one-token decode steps continuing a finished generation (``out``: prompt + answers,
    ``cache`` holding all but the last token): batch size over the median step time, robust to a loaded machine."""
    clock = Clock()
    mask = torch.cat([mask, mask.new_ones(out.shape[0], out.shape[1] - mask.shape[1])], dim=1)
    greedy(model, out, mask, cache, steps, tokenizer.pad_token_id, min_new_tokens=steps,
           logits_processor=transformers.LogitsProcessorList([clock]))
    step_times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return out.shape[0] / statistics.median(step_times) if step_times else float("nan")


def run_cache(
    model, tokenizer, task, spec: CacheSpec, tokens: int, batches: list, max_new_tokens: int, decode_steps: int = 16
) -> Row:
    """Score ``spec`` on ``batches`` (greedy, ``max_new_tokens``), count its bytes and time its prefill; then time
    ``decode_steps`` decode steps on the first batch's cache (skipped when ``decode_steps`` < 2)."""
    row = Row(spec.text, tokens, task.name, series=series_name(spec), retention=spec.retention)
    scores, prefill, kv, ref = [], [], 0.0, 0.0
    per_kind: dict[str, list[float]] = {}
    prompt_tokens = 0
    for i, batch in enumerate(batches):
        ids, mask, question_len, examples = batch
        prompt_tokens += int(mask.sum())
        clock = Clock()
        t0 = time.perf_counter()  # @construction specs score or store the prompt inside make_cache: part of the prefill
        cache = make_cache(spec, model, question_len=question_len, tokenizer=tokenizer, input_ids=ids,
                           attention_mask=mask)
        out = greedy(model, ids, mask, cache, max_new_tokens, tokenizer.pad_token_id,
                     logits_processor=transformers.LogitsProcessorList([clock]))
        prefill.append((clock.stamps[0] - t0) * 1e3 / ids.shape[0])
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :])
        for text, ex in zip(texts, examples):
            value = task.score(text, ex)
            scores.append(value)
            kind = task.kind(ex)
            if kind:
                per_kind.setdefault(kind, []).append(value)
        fp = cache.memory_footprint() if hasattr(cache, "memory_footprint") else None
        if fp is not None:
            kv += fp.total
            # the footprint's reference counts 16-bit K/V; the bandwidth column compares with the model dtype
            ref += fp.reference * model.dtype.itemsize / 2
        else:  # a plain DynamicCache ("full"): keys and values in the model dtype
            held = held_bytes(cache)
            kv += held
            ref += held
        if i == 0 and decode_steps >= 2:  # after the bytes are counted: the timing pass grows the cache
            row.decode_tokens_per_s = decode_timing(model, tokenizer, cache, out, mask, decode_steps)
    n = len(scores)
    row.extra = {f"score_{k}": sum(v) / len(v) for k, v in per_kind.items()}
    row.extra["mean_prompt_tokens"] = prompt_tokens / max(1, n)
    if getattr(cache, "decode_path", None) is not None:
        row.extra["decode_path"] = str(cache.decode_path)
    row.score_ci95_by_kind = {k: list(score_interval(v)) for k, v in per_kind.items()}
    row.prompts = n
    row.score = sum(scores) / n
    row.score_ci95 = list(score_interval(scores))
    row.kv_bytes = kv / n
    row.bandwidth = kv / ref if ref else float("nan")
    row.prefill_ms = statistics.median(prefill)
    if decode_steps < 2:
        row.decode_tokens_per_s = float("nan")
    return row


def compare_with_full(rows: list[Row]) -> list[tuple[Row, Row]]:
    """Set each row's ``pct_of_full`` (its score over the ``full`` row's of the same task and length; ``None`` when
    that scores 0) and return the (row, full row) pairs, for rows that have a ``full`` row."""
    pairs = []
    for r in rows:
        full = next((f for f in rows if f.cache == "full" and f.tokens == r.tokens and f.task == r.task), None)
        if full is not None:
            r.pct_of_full = r.score / full.score if full.score else None
            pairs.append((r, full))
    return pairs


def _flattened_bytes(obj: object) -> int:
    """Bytes of a tensor or tensor subclass (quanto's packed tensors), via the ``__tensor_flatten__`` protocol."""
    if hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(_flattened_bytes(getattr(obj, n)) for n in names)
    return tensor_bytes(obj) if isinstance(obj, torch.Tensor) else 0


def held_bytes(cache: object) -> int:
    """Bytes a cache holds: exact accounting for ours (``memory_footprint``), tensor storage for transformers' caches
    (``DynamicCache``: keys and values in the model dtype; ``QuantizedCache``: its packed and residual tensors)."""
    if hasattr(cache, "memory_footprint"):
        return cache.memory_footprint().total
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _flattened_bytes(getattr(layer, name, None))
    return total


def prefill_bytes(cache: object) -> tuple[int, int]:
    """(peak bytes while the prompt was prefilled, bytes held now): a selecting cache's ``peak_prefill_bytes`` (its
    accounting while the prompt awaited selection) or at least what it holds; other caches' peak is what they hold."""
    held = held_bytes(cache)
    return max(getattr(cache, "peak_prefill_bytes", 0), held), held


def proc_status(name: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...) in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{name} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current resident set


def memory_supported() -> bool:
    """Whether this system lets :class:`PeakMemory` measure the resident set (Linux ``/proc`` with ``clear_refs``)."""
    try:
        proc_status("VmHWM")
        _reset_peak_rss()
    except (OSError, RuntimeError):
        return False
    return True


class PeakMemory:
    """Memory a block of work needed beyond what was in use when it started, in bytes: on CUDA the peak of
    ``torch.cuda.max_memory_allocated`` over the allocation at the start, on CPU the rise of the process' peak
    resident set (``VmHWM``, reset at the start). ``start()`` / ``stop()``, or ``with PeakMemory() as p:`` then
    ``p.rise``. A cache that rebuilds a full-precision copy of its history shows that copy here."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.base = self.rise = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            _reset_peak_rss()
        except OSError:
            pass
        self.base = proc_status("VmRSS")

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            self.rise = torch.cuda.max_memory_allocated() - self.base
        else:
            self.rise = max(0, proc_status("VmHWM") - self.base)
        return self.rise

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def in_fresh_process(code: str, what: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh Python process, torch on one thread, and return the last line it printed; a failure
    raises ``RuntimeError`` naming ``what`` with the last line of its stderr."""
    res = subprocess.run([sys.executable, "-c", "import torch\ntorch.set_num_threads(1)\n" + code],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{what}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    return res.stdout.strip().splitlines()[-1]


def tiny_qwen2(
    dtype: torch.dtype = torch.float32, seed: int = 0, *, layers: int = 4, hidden: int = 256, heads: int = 4,
    vocab: int = 1024, max_positions: int = 32768,
) -> Qwen2ForCausalLM:
    """The benchmark model: Qwen2 with 4 layers, hidden 256, 4 heads, 2 KV heads (head_dim 64) by default, MLP
    width ``2 * hidden``, ``heads // 2`` KV heads; random weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
    )
    return Qwen2ForCausalLM(config).to(dtype).eval()
