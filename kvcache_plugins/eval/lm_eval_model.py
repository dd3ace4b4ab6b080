"""lm-eval's ``hf`` model with ``cache=<spec>``: every generation and every log-likelihood through our caches.

What changes when a model is created with ``cache=<spec>`` (``--model_args pretrained=...,cache=q2c:0.5``):

* the spec is parsed first, so a bad spec fails before the model loads (names the valid forms);
* ``generation_config.cache_implementation`` is cleared (transformers refuses a cache object next to it);
* every ``generate`` call gets a fresh cache built from the spec for that batch (left padding included);
* log-likelihood requests go through the cache too: the context is prefilled into a fresh cache (compressed as
  the spec says), the cache is repeated for every continuation of that context, and the continuations are scored
  against it. With ``cache=full`` this equals stock ``hf`` to float rounding;
* requests are processed task by task, so each task's ``metadata: question_marker`` is known: the last occurrence of
  the marker in a prompt starts its question span. A question-aware spec on a task without a marker is an error;
* with ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N -m lm_eval ...`` on CPU, the ranks
  split the requests (stock lm-eval only shards across GPUs and would evaluate everything N times).

Without ``cache=`` nothing changes. Three ways in (see the README): the startup hook that patches lm-eval's own
``HFLM`` inside the ``lm_eval`` program, the ``kvcache-eval`` command (lm-eval's CLI), and the ``hf-kvcache``
model (``KVCacheHFLM``) for lm-eval versions that load ``lm_eval.models`` entry points.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from typing import Any

import torch

from .._compat import NEW_NAME, OLD_NAME, cache_kwargs
from ..specs import CacheSpec, make_cache, parse_spec

logger = logging.getLogger(__name__)
PATCHED = "_kvcache_plugins_patched"


def question_len_from_ids(tokenizer: Any, ids: list[int], marker: str) -> int | None:
    """Tokens from the last occurrence of ``marker`` to the end of ``ids`` (``None`` if it does not occur).

    The shortest suffix whose decoded text contains the marker: a binary search over suffix lengths, valid for any
    tokenizer because containment only grows with the suffix.
    """
    if not ids or marker not in tokenizer.decode(ids):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if marker in tokenizer.decode(ids[-mid:]):
            hi = mid
        else:
            lo = mid + 1
    return lo


# ------------------------------------------------------------------------------------------------ cache factory


def _task_marker(lm: Any) -> str | None:
    meta = getattr(lm, "_kv_task_meta", None) or {}
    marker = meta.get("question_marker")
    return str(marker) if marker else None


def _cache_for(lm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """A fresh cache of the model's spec for one batch of prompts ``[B, n]`` (left-padded)."""
    spec: CacheSpec = lm._kv_spec
    if spec.kind in ("full", "quant", "lowrank") and not spec.transmits:
        return make_cache(spec, lm.model)
    marker = _task_marker(lm)
    question_len = None
    if marker is not None:
        rows = []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            rows.append(question_len_from_ids(lm.tokenizer, ids.tolist(), marker) or 0)
        question_len = rows
    if spec.needs_question and question_len is None:
        raise ValueError(
            f"cache {spec.text!r} needs the question span, but task {getattr(lm, '_kv_task', '?')!r} declares no "
            "question marker: add `metadata: {question_marker: ...}` to the task YAML, or use a question-agnostic "
            "spec (snapkv, h2o, knorm, streaming, random) or a quantization preset"
        )
    return make_cache(
        spec, lm.model, question_len=question_len, tokenizer=lm.tokenizer, input_ids=input_ids,
        attention_mask=attention_mask,
    )


# ------------------------------------------------------------------------------------------- method wrappers


def _wrap_init(original):
    @functools.wraps(original)
    def __init__(self, *args, cache: str | None = None, **kwargs):
        spec = parse_spec(str(cache)) if cache is not None else None  # before anything loads
        original(self, *args, **kwargs)
        self._kv_spec = spec
        self._kv_task_meta = {}
        self._kv_all_meta = {}
        if spec is None:
            return
        if getattr(self, "backend", "causal") != "causal":
            raise ValueError("cache=<spec> works with causal language models only (not seq2seq)")
        gen_config = getattr(self.model, "generation_config", None)
        if gen_config is not None and getattr(gen_config, "cache_implementation", None) is not None:
            logger.info("cache=%s: clearing generation_config.cache_implementation=%r", spec.text,
                        gen_config.cache_implementation)
            gen_config.cache_implementation = None
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    return __init__


def _wrap_model_generate(original):
    @functools.wraps(original)
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if getattr(self, "_kv_spec", None) is None:
            return original(self, context, max_length, stop, **generation_kwargs)
        generation_kwargs.pop("cache_implementation", None)
        given = sorted({OLD_NAME, NEW_NAME} & set(generation_kwargs))
        if given:
            raise ValueError(
                f"cache=<spec> supplies the cache of every generate call itself; remove {', '.join(given)} from the "
                f"generation kwargs (neither {OLD_NAME!r} nor {NEW_NAME!r} may be given)"
            )
        cache = _cache_for(self, context, generation_kwargs.get("attention_mask"))
        return original(self, context, max_length, stop, **cache_kwargs(self.model, cache), **generation_kwargs)

    return _model_generate


def _wrap_per_task(original):
    """Run a request-type method task by task, so the cache factory knows the current task's metadata."""

    @functools.wraps(original)
    def method(self, requests, *args, **kwargs):
        if getattr(self, "_kv_spec", None) is None or not requests:
            return original(self, requests, *args, **kwargs)
        groups: OrderedDict[str, list[int]] = OrderedDict()
        for i, req in enumerate(requests):
            groups.setdefault(getattr(req, "task_name", None) or "", []).append(i)
        results: list[Any] = [None] * len(requests)
        for task, indices in groups.items():
            self._kv_task = task
            self._kv_task_meta = self._kv_all_meta.get(task, {}) or {}
            out = original(self, [requests[i] for i in indices], *args, **kwargs)
            for i, r in zip(indices, out):
                results[i] = r
        return results

    return method


def _wrap_loglikelihood_tokens(original):
    @functools.wraps(original)
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if getattr(self, "_kv_spec", None) is None:
            return original(self, requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        return _cached_loglikelihood(self, requests)

    return _loglikelihood_tokens


@torch.no_grad()
def _cached_loglikelihood(lm, requests) -> list[tuple[float, bool]]:
    """Prefill each distinct context into a fresh cache once, then score its continuations against it.

    ``requests``: ``[((context, continuation), context_enc, continuation_enc), ...]``; returns
    ``[(sum of continuation log-probs, whether greedy decoding reproduces it), ...]`` in request order.
    """
    model, device = lm.model, lm.device
    by_context: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()
    for i, (_, ctx, _) in enumerate(requests):
        by_context.setdefault(tuple(ctx), []).append(i)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for ctx, indices in by_context.items():
        conts = [list(requests[i][2]) for i in indices]
        longest = max(len(c) for c in conts)
        ctx_ids = list(ctx)[-max(1, lm.max_length - longest + 1) :]
        ids = torch.tensor([ctx_ids], dtype=torch.long, device=device)
        cache = _cache_for(lm, ids, torch.ones_like(ids))
        # a transmission (<preset>@construction) cache already holds the context before the question
        unread = ids[:, cache.get_seq_length() :]
        first = model(unread, **cache_kwargs(model, cache), use_cache=True).logits[:, -1:].float()  # predicts cont[0]
        if longest > 1:
            cache.batch_repeat_interleave(len(conts))
            batch = torch.zeros(len(conts), longest - 1, dtype=torch.long, device=device)
            for row, cont in enumerate(conts):  # right padding: causal attention keeps it away from real tokens
                batch[row, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
            rest = model(batch, **cache_kwargs(model, cache), use_cache=True).logits.float()
            logits = torch.cat([first.expand(len(conts), 1, -1), rest], dim=1)
        else:
            logits = first.expand(len(conts), 1, -1)
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, (i, cont) in enumerate(zip(indices, conts)):
            target = torch.tensor(cont, dtype=torch.long, device=device)
            lp = logprobs[row, : len(cont)].gather(-1, target.unsqueeze(-1)).squeeze(-1)
            greedy = bool((logprobs[row, : len(cont)].argmax(-1) == target).all())
            results[i] = (float(lp.sum()), greedy)
            if requests[i][0] is not None:
                lm.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
    return results  # type: ignore[return-value]


def _wrap_evaluate(original):
    @functools.wraps(original)
    def evaluate(lm, task_dict, *args, **kwargs):
        inner = getattr(lm, "lm", lm)  # CachingLM wraps the model
        if getattr(inner, "_kv_spec", None) is not None:
            inner._kv_all_meta = {name: dict(meta) for name, meta in _task_metadata(task_dict).items()}
        return original(lm, task_dict, *args, **kwargs)

    return evaluate


def _task_metadata(task_dict: Any) -> dict[str, dict]:
    """``{task name: TaskConfig.metadata}`` for every task in an ``evaluate`` task dict (flat or nested)."""
    out: dict[str, dict] = {}

    def visit(obj: Any, name: str | None = None) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                visit(value, key if isinstance(key, str) else getattr(key, "group_name", None))
            return
        config = getattr(obj, "config", None)
        if config is not None and hasattr(config, "metadata"):
            task_name = getattr(config, "task", None) or name
            out[task_name] = getattr(config, "metadata", None) or {}

    visit(task_dict.get("tasks", task_dict) if isinstance(task_dict, dict) else task_dict)
    return out


# ------------------------------------------------------------------------------------------------- patching


def patch_hflm(cls: type) -> type:
    """Give an ``HFLM`` class (lm-eval's own, or a subclass) the ``cache=`` behaviour; idempotent."""
    if any(PATCHED in vars(klass) for klass in cls.__mro__):
        return cls
    cls.__init__ = _wrap_init(cls.__init__)
    cls._model_generate = _wrap_model_generate(cls._model_generate)
    cls._loglikelihood_tokens = _wrap_loglikelihood_tokens(cls._loglikelihood_tokens)
    cls.generate_until = _wrap_per_task(cls.generate_until)
    cls.loglikelihood = _wrap_per_task(cls.loglikelihood)
    setattr(cls, PATCHED, True)
    return cls


def patch_evaluator(module: Any) -> None:
    """Wrap ``lm_eval.evaluator.evaluate`` so the model learns each task's metadata; idempotent."""
    if not getattr(module.evaluate, PATCHED, False):
        module.evaluate = _wrap_evaluate(module.evaluate)
        setattr(module.evaluate, PATCHED, True)


def install() -> None:
    """Patch lm-eval in this process: ``HFLM`` (``--model hf``) and the evaluator; register ``hf-kvcache``."""
    import lm_eval.evaluator
    import lm_eval.models  # registers the built-in models first (registering earlier would hide them)
    import lm_eval.models.huggingface as hf
    from lm_eval.api.registry import model_registry

    patch_hflm(hf.HFLM)
    patch_evaluator(lm_eval.evaluator)
    if "hf-kvcache" not in model_registry:
        model_registry.register("hf-kvcache", target="kvcache_plugins.eval.lm_eval_model:KVCacheHFLM")


def __getattr__(name: str):
    # KVCacheHFLM needs lm-eval; build it only when asked (the entry point asks for it by name)
    if name == "KVCacheHFLM":
        from lm_eval.models.huggingface import HFLM

        cls = type("KVCacheHFLM", (HFLM,), {"__doc__": "lm-eval's HFLM with cache=<spec> (see the module docstring)."})
        patch_hflm(cls)
        globals()["KVCacheHFLM"] = cls
        return cls
    raise AttributeError(name)
