"""The eval_tasks QA tasks for ``kvcache-bench --task ...`` (same prompts and scoring as the lm-eval YAMLs)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..specs import CacheSpec
from . import qa, tasks


@dataclass
class QATask:
    """A QA task as the benchmark runs it: prompts, question spans, greedy answers scored by SQuAD-style F1."""

    name: str
    source: str  # squad_v2 | triviaqa | hotpotqa (the rows' dataset)
    prompt: Callable[[dict], str]
    golds: Callable[[dict], list[str]]
    data: str | None = None
    niah: bool = False
    max_new_tokens: int = 32

    def load_model(self, name: str, dtype: Any, device: str) -> tuple[Any, Any]:
        if name == "embedded":
            raise ValueError(
                f"the embedded reference model reads only its own task (kv_retrieval); pass --model <hub id or path> "
                f"to run {self.name}"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .._compat import no_hub_kernels

        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", **no_hub_kernels())
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        return model, tokenizer

    def lengths(self, requested: list[int]) -> list[int]:
        return list(requested) if self.niah else [0]  # 0: the documents' own lengths

    def unsupported(self, spec: CacheSpec) -> str | None:
        if spec.kind == "scout" and spec.scout == "embedded":
            return "the embedded scout reads only the kv_retrieval vocabulary"
        return None

    def _docs(self, tokenizer: Any, tokens: int, limit: int, seed: int) -> list[dict]:
        rows = list(tasks.load_rows(self.source, "validation", data_files=self.data)["validation"])
        if self.niah:
            return qa.niah_documents(rows, tokenizer, [tokens], per_length=limit, seed=seed)
        return [{**row, "prompt": self.prompt(row)} for row in rows[:limit]]

    def batches(self, tokenizer, tokens: int, limit: int, batch_size: int, seed: int, device: str) -> list:
        docs = self._docs(tokenizer, tokens, limit, seed)
        out = []
        for start in range(0, len(docs), batch_size):
            chunk = docs[start : start + batch_size]
            prompts = [d["prompt"] for d in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True)
            question_len = [qa.question_token_count(tokenizer, p) for p in prompts]
            out.append((enc.input_ids.to(device), enc.attention_mask.to(device), question_len, chunk))
        return out

    def score(self, text: str, doc: dict) -> float:
        return qa.f1_score(qa.clean_prediction(text), self.golds(doc))

    def kind(self, doc: dict) -> str | None:
        if self.source == "squad_v2" and not self.niah:
            return "has_answer" if self.golds(doc) else "no_answer"
        return None


QA_TASKS = {
    "kv_squad_v2": dict(source="squad_v2", prompt=qa.squad_prompt, golds=qa.squad_golds),
    "kv_triviaqa": dict(source="triviaqa", prompt=qa.triviaqa_prompt, golds=qa.triviaqa_golds),
    "kv_hotpotqa": dict(source="hotpotqa", prompt=qa.hotpot_prompt, golds=qa.hotpot_golds),
    "kv_niah": dict(source="squad_v2", prompt=qa.squad_prompt, golds=qa.squad_golds, niah=True),
}


def get_qa_task(name: str, data: str | None = None) -> QATask:
    if name not in QA_TASKS:
        raise ValueError(f"unknown benchmark task {name!r}; choose kv_retrieval or one of {sorted(QA_TASKS)}")
    return QATask(name=name, data=data, **QA_TASKS[name])

