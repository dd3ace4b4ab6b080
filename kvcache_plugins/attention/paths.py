"""Which decode path a quantized cache takes: the fastest one that runs on the machine at hand.

The candidates for a decode step of a quantized layer:

* ``cpp``: the hand-written CPU kernel (:mod:`kvcache_plugins.attention.cpu_kernel`), CPU only;
* ``compiled``: the fused math compiled by ``torch.compile`` (:mod:`kvcache_plugins.attention.fused`);
* ``reference``: dequantize the past, then the model's attention (sdpa).

:func:`decide` times every candidate that runs here once per step signature (layouts, heads, head_dim, dtype,
device) on synthetic data of :data:`TIMING_TOKENS` tokens, keeps the fastest and says why, e.g. ``cpp: 0.21 ms vs
reference 0.35 ms per layer-step at 2048 tokens``. The decision is remembered for the process, so a cache's
``warmup()`` (or its first decode step) pays the timing and later caches of the same shapes reuse it.
``KVCACHE_PLUGINS_DECODE_PATH`` forces a path (``cpp``; ``compiled``: the compiled math, run eagerly where
``KVCACHE_PLUGINS_COMPILE=0``; ``eager``: always eagerly, for tests; ``reference``); ``auto`` (default) times them.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from .. import compiler

logger = logging.getLogger(__name__)

PATHS = ("cpp", "compiled", "eager", "reference")
#: past tokens of the synthetic step the candidates are timed on
TIMING_TOKENS = 2048
#: timed calls per candidate (after one untimed call); the fastest counts (robust to preemption on a shared machine)
TIMING_CALLS = 5


@dataclass(frozen=True)
class DecodePath:
    """The decode path a cache takes and why (``str()`` gives ``"name: reason"``)."""

    name: str
    reason: str
    #: milliseconds per layer-step of every timed candidate
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def forced() -> str | None:
    """The path ``KVCACHE_PLUGINS_DECODE_PATH`` forces (``None`` for ``auto``); ``ValueError`` for anything else."""
    name = os.environ.get("KVCACHE_PLUGINS_DECODE_PATH", "auto").strip().lower() or "auto"
    if name == "auto":
        return None
    if name not in PATHS:
        raise ValueError(f"KVCACHE_PLUGINS_DECODE_PATH={name!r}: choose 'auto' or one of {PATHS}")
    return name


def available(device: torch.device) -> list[str]:
    """Fused candidates that can run on ``device`` here (the reference path always can)."""
    out = []
    if device.type == "cpu":
        from . import cpu_kernel

        if cpu_kernel.load() is not None:
            out.append("cpp")
    if compiler.COMPILE and not compiler.compiler_broken():
        out.append("compiled")
    return out


_decided: dict[tuple, DecodePath] = {}


def signature(step, query: torch.Tensor, softcap: float | None, weights: bool) -> tuple:
    """What the speed of a step depends on: both layouts, heads, query heads, head_dim, queries, dtypes, device."""
    k, v = step.key_body, step.value_body
    return (
        (k.bits, k.group_size, k.axis), (v.bits, v.group_size, v.axis), k.codes.shape[1], query.shape[1],
        query.shape[-1], query.shape[2], query.dtype, k.scale.dtype, query.device.type, softcap is not None, weights,
    )


def decide(step, query: torch.Tensor, scaling: float, softcap: float | None, weights: bool) -> DecodePath:
    """The path for steps like ``step`` (a :class:`~kvcache_plugins.attention.fused.FusedStep`) with ``query``
    ``[B, Hq, n, D]``: forced, remembered, or timed now (see the module docstring)."""
    name = forced()
    if name is not None:
        return DecodePath(name, "forced by KVCACHE_PLUGINS_DECODE_PATH")
    key = signature(step, query, softcap, weights)
    if key not in _decided:
        _decided[key] = _time_candidates(step, query, scaling, softcap, weights)
        logger.info("kvcache_plugins: decode path %s", _decided[key])
    return _decided[key]


def _synthetic(step, query: torch.Tensor, tokens: int):
    """A step of ``tokens`` past tokens with ``step``'s layouts and shapes, batch 1, random content."""
    from ..quant.groupwise import quantize
    from ..quant.growable import GrowableQuantized
    from .fused import FusedStep, Layout, chunk_tokens

    gen = torch.Generator().manual_seed(0)
    k, v = step.key_body, step.value_body
    H, D, dev = k.codes.shape[1], k.head_dim, query.device
    chunk = max(chunk_tokens(Layout(t.bits, t.group_size, t.axis, D)) for t in (k, v))
    bodies = []
    for t in (k, v):
        x = torch.randn(1, H, tokens, D, generator=gen).to(dev, query.dtype)
        grown = GrowableQuantized(quantize(x, t.bits, t.group_size, t.axis, t.scale.dtype))
        grown.reserve(tokens, chunk)
        bodies.append(grown.buffers())
    n = query.shape[2]
    new = tuple(torch.randn(1, H, n, D, generator=gen).to(dev, query.dtype) for _ in range(2))
    q = torch.randn(1, query.shape[1], n, D, generator=gen).to(dev, query.dtype)
    return FusedStep(bodies[0], bodies[1], tokens, None, None, new), q


def _reference(step, q: torch.Tensor, scaling: float, softcap: float | None):
    """The reference path's work: dequantize the past, then sdpa (GQA by repeating KV heads, as transformers does)."""
    key, value = step.dense()
    R = q.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(R, 1), value.repeat_interleave(R, 1)
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, key, value, scale=scaling)
    s = torch.tanh(q @ key.transpose(-1, -2) * scaling / softcap) * softcap
    return torch.softmax(s.float(), -1).to(q.dtype) @ value


def _time(fn, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(TIMING_CALLS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def _time_candidates(step, query, scaling, softcap, weights) -> DecodePath:
    syn, q = _synthetic(step, query, TIMING_TOKENS)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        for name in available(query.device):
            if syn.attend(q, None, scaling, softcap, weights=weights, path=name) is None:
                continue  # the compiler failed just now (it warned)
            timings[name] = _time(lambda: syn.attend(q, None, scaling, softcap, weights=weights, path=name),
                                  query.device)
        timings["reference"] = _time(lambda: _reference(syn, q, scaling, softcap), query.device)
    best = min(timings, key=timings.get)
    others = ", ".join(f"{k} {v:.2f} ms" for k, v in timings.items() if k != best)
    reason = f"{timings[best]:.2f} ms" + (f" vs {others}" if others else "")
    return DecodePath(best, f"{reason} per layer-step at {TIMING_TOKENS} tokens", timings)


def route(cache, layer, step, query: torch.Tensor, scaling: float, softcap: float | None, weights: bool) -> str:
    """The path of one decode step of ``cache`` (a MixedPrecisionCache or CompressedCache): decided by
    :func:`decide`, recorded as ``cache.decode_path``. A layer whose steps are faster on the reference path is marked
    (``layer.reference_decode``): its later steps skip the fused capture and take the cache's reference path."""
    path = decide(step, query, scaling, softcap, weights)
    cache.decode_path = path
    if path.name == "reference":
        layer.reference_decode = True
    return path.name


def machine(device: torch.device | str = "cpu") -> str:
    """What decode speed depends on, for benchmark output: CPU capability (``AVX2``, ``AVX512``, ``DEFAULT`` on
    NEON machines, as torch reports it), the C++ kernel's build and the threads (or the CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    from . import cpu_kernel

    aten = os.environ.get("ATEN_CPU_CAPABILITY")
    return (
        f"CPU {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
        + (f" (ATEN_CPU_CAPABILITY={aten})" if aten else "")
        + f", C++ kernel build {cpu_kernel.requested_isa()}, {torch.get_num_threads()} threads"
    )
