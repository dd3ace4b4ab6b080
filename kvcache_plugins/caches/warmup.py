"""Compile a cache's fused decode kernels before the first ``generate``.

The fused decode path compiles its kernels (attention from the packed codes, quantize-and-append) on first use: a
few seconds per kernel with inductor's on-disk cache warm, tens of seconds cold on a small CPU. Without a warm-up
that cost lands inside the user's first ``generate``, as a stall after the prompt. :func:`warm_up` pays it up
front, by running the model for a short random prompt and a few decode steps on a fresh copy of the cache: the
very kernels (layouts, scaling, soft-cap, dtype, device, batch 1 or larger) that later steps use, since compiled
kernels are shared by the whole process. Shapes are dynamic, so any prompt length reuses them; what warm-up did not
meet (a batch size on the other side of 1, multi-token steps of assisted generation) compiles on first use.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch

from .. import compiler
from ..attention import paths
from .._checks import check_int
from .._compat import cache_kwargs
from .._model import text_config

logger = logging.getLogger(__name__)

#: decode steps a warm-up runs (the first steps meet the variants a generation meets: one query, full-precision
#: tail of one token or several)
WARMUP_STEPS = 4


def require_unused(cache: Any) -> None:
    """``ValueError`` unless ``cache`` holds nothing yet (a warm-up copies the cache it warms up)."""
    if cache.get_seq_length() != 0:
        raise ValueError("warm_up needs an unused cache (get_seq_length() == 0): warm up before the first generate")


def warm_up(cache: Any, model: Any, batch_size: int = 1, prompt_tokens: int = 160) -> float:
    """Compile the fused decode kernels ``cache`` will run with ``model``; returns the seconds it took.

    Runs ``model`` on ``batch_size`` rows of ``prompt_tokens`` random tokens and :data:`WARMUP_STEPS` greedy decode
    steps with a deep copy of ``cache`` (which must be unused: the copy would otherwise duplicate its content), once
    under ``torch.no_grad()`` as ``generate`` does and once under ``torch.inference_mode()``. ``cache`` itself is left
    untouched but for ``cache.decode_path``: the path the twin's decode steps chose
    (:mod:`kvcache_plugins.attention.paths` times the candidates once). Returns ``0.0`` without running anything when
    the cache does not decode fused or no fused path runs here (no C++ kernel, compiling off or broken).
    """
    check_int("batch_size", batch_size, 1)
    check_int("prompt_tokens", prompt_tokens, 1)
    require_unused(cache)
    device = next(model.parameters()).device
    if not getattr(cache, "fused", False) or not (paths.forced() or paths.available(device)):
        return 0.0
    vocab = int(text_config(model).vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=gen).to(device)
    t0 = time.perf_counter()
    # no_grad (generate) and inference_mode (servers, benchmarks) hand the kernels different tensors (inference
    # tensors lack autograd's dispatch keys), which the compiler treats apart: warm up both
    for mode in (torch.no_grad, torch.inference_mode):
        twin = copy.deepcopy(cache)
        kwargs = cache_kwargs(model, twin)
        mask = torch.ones_like(ids)
        with mode():
            out = model(ids, attention_mask=mask, use_cache=True, **kwargs)
            for _ in range(WARMUP_STEPS):
                token = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(token, attention_mask=mask, use_cache=True, **kwargs)
    cache.decode_path = getattr(twin, "decode_path", None)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if compiler.compiler_broken():
        logger.warning("kvcache_plugins: warm-up found no working compiler: %s", compiler.compiler_broken())
    else:
        logger.info("kvcache_plugins: fused decode kernels warmed up in %.1f s", seconds)
    return seconds
