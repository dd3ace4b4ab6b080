"""Tasks the benchmark runs: the built-in key-value retrieval task, and the eval_tasks QA tasks."""

from __future__ import annotations

from typing import Any

import torch

from ..specs import CacheSpec


class RetrievalTask:
    """Held-out prompts of the embedded task, half single-hop and half multi-hop, scored by exact match.

    Both kinds because a cache can matter at two places. A selection applied after a full prefill (post hoc) cannot
    change the first answer token, which the prefill predicts with full attention over the uncompressed prompt: a
    single-hop answer (one value, then ``</s>``) survives it, while the second hop of a multi-hop answer is a lookup
    in the compressed cache during decoding. A selection applied during the prefill (``@construction``) decides what
    the first answer token sees, so single-hop answers show which selector found the fact. The table reports each
    kind's score as well as the mean.
    """

    name = "kv_retrieval"
    max_new_tokens = 4

    def load_model(self, name: str, dtype: Any, device: str) -> tuple[Any, Any]:
        if name == "embedded":
            from ..reference import load_reference_model

            return load_reference_model(dtype=dtype if dtype != "auto" else torch.float32, device=device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .._compat import no_hub_kernels

        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", **no_hub_kernels())
        model = model.to(device).eval()
        return model, AutoTokenizer.from_pretrained(name)

    def lengths(self, requested: list[int]) -> list[int]:
        return list(requested)

    def unsupported(self, spec: CacheSpec) -> str | None:
        if spec.kind == "scout" and spec.scout == "embedded":
            from ..reference import reference_available

            if not reference_available(scout=True):
                return "the embedded scout model is not installed"
        return None

    def batches(self, tokenizer, tokens: int, limit: int, batch_size: int, seed: int, device: str) -> list:
        from ..tasks.kv_retrieval import make_dataset

        single = make_dataset(seed + tokens, limit - limit // 2, tokens, multi_hop_share=0.0)
        multi = make_dataset(seed + tokens + 1, limit // 2, tokens, multi_hop_share=1.0)
        examples = [e for pair in zip(single, multi) for e in pair] + single[len(multi) :]
        out = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            enc = tokenizer([e.prompt for e in chunk], return_tensors="pt", add_special_tokens=False)
            ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
            out.append((ids, mask, [e.question_len for e in chunk], chunk))
        return out

    def score(self, text: str, example: Any) -> float:
        from ..tasks.kv_retrieval import exact_match

        return float(exact_match(text, example))

    def kind(self, example: Any) -> str | None:
        return "single_hop" if example.hops == 1 else "multi_hop"


def get_task(name: str, data: str | None = None):
    """The benchmark task called ``name``."""
    if name == "kv_retrieval":
        if data is not None:
            raise ValueError("kv_retrieval generates its prompts; --data is for eval_tasks tasks")
        return RetrievalTask()
    from ..eval.bench_tasks import get_qa_task

    return get_qa_task(name, data)
