"""Question answering pieces shared by the lm-eval tasks in ``eval_tasks/`` and by ``kvcache-bench``.

Prompts put the context first and the question last, after a marker (``Question:``), so a question-aware cache
can tell them apart: the last occurrence of the marker starts the question span.

Scoring follows the official SQuAD v2 evaluation: answers are normalized (lower case, punctuation and the articles
a/an/the removed, whitespace collapsed); EM is 1 when the normalized prediction equals a normalized gold answer,
F1 is the token-overlap F1 with the best gold answer. An unanswerable question (no gold answers) scores 1 only for
an empty prediction; the prompts ask the model to write "unanswerable", which is read as empty.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

QUESTION_MARKER = "Question:"
UNANSWERABLE = "unanswerable"

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def clean_prediction(text: str) -> str:
    """The model's answer: the first line, without a trailing period; 'unanswerable' means no answer."""
    text = text.strip().split("\n")[0].strip()
    if normalize_answer(text) == UNANSWERABLE:
        return ""
    return text


def exact_match_score(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer (empty golds: unanswerable)."""
    if not golds:
        return float(normalize_answer(prediction) == "")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """Max over gold answers of token-level F1 = 2PR/(P+R) on normalized tokens (empty golds: unanswerable)."""
    if not golds:
        return float(normalize_answer(prediction) == "")
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        gold_tokens = normalize_answer(gold).split()
        if not pred_tokens or not gold_tokens:
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        common = Counter(pred_tokens) & Counter(gold_tokens)
        overlap = sum(common.values())
        if overlap == 0:
            continue
        precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def question_span_chars(prompt: str, marker: str = QUESTION_MARKER) -> int:
    """Characters from the last occurrence of ``marker`` to the end of ``prompt`` (the question span)."""
    at = prompt.rfind(marker)
    if at < 0:
        raise ValueError(f"the prompt has no question marker {marker!r}; question-aware caches need one")
    return len(prompt) - at


def question_token_count(tokenizer: Any, prompt: str, marker: str = QUESTION_MARKER) -> int:
    """Tokens of the question span: tokens of the whole prompt minus tokens of the text before the marker."""
    at = prompt.rfind(marker)
    if at < 0:
        raise ValueError(f"the prompt has no question marker {marker!r}; question-aware caches need one")
    full = tokenizer(prompt, add_special_tokens=True).input_ids
    head = tokenizer(prompt[:at], add_special_tokens=True).input_ids
    return max(1, len(full) - len(head))


# ---------------------------------------------------------------------------------------------------- prompts

QA_INSTRUCTION = (
    "Answer the question using the context. Give a short answer copied from the context"
    ", or write \"unanswerable\" if the context does not contain it."
)


def qa_prompt(context: str, question: str, instruction: str = QA_INSTRUCTION) -> str:
    return f"{instruction}\n\nContext: {context}\n\n{QUESTION_MARKER} {question}\nAnswer:"


def squad_prompt(doc: dict[str, Any]) -> str:
    return qa_prompt(doc["context"], doc["question"])


def squad_golds(doc: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(a for a in doc["answers"]["text"] if a))


def triviaqa_context(doc: dict[str, Any], max_chars: int = 6000) -> str:
    """Evidence for a TriviaQA rc question: its Wikipedia pages, then web search results, cut at ``max_chars``."""
    parts: list[str] = []
    pages = doc.get("entity_pages") or {}
    parts += [c for c in pages.get("wiki_context", []) if c]
    results = doc.get("search_results") or {}
    parts += [c for c in results.get("search_context", []) if c]
    return "\n\n".join(parts)[:max_chars]


def triviaqa_prompt(doc: dict[str, Any]) -> str:
    return qa_prompt(triviaqa_context(doc), doc["question"], "Answer the question using the context. Give a short answer.")


def triviaqa_golds(doc: dict[str, Any]) -> list[str]:
    answer = doc["answer"]
    return list(dict.fromkeys([answer["value"], *answer.get("aliases", [])]))


def hotpot_context(doc: dict[str, Any]) -> str:
    """The distractor setting: every paragraph as 'Title: sentences', concatenated."""
    ctx = doc["context"]
    return "\n\n".join(f"{title}: {''.join(sents)}" for title, sents in zip(ctx["title"], ctx["sentences"]))


def hotpot_prompt(doc: dict[str, Any]) -> str:
    return qa_prompt(hotpot_context(doc), doc["question"], "Answer the question using the context. Give a short answer.")


def hotpot_golds(doc: dict[str, Any]) -> list[str]:
    return [doc["answer"]]


MMLU_LETTERS = ("A", "B", "C", "D")


def mmlu_prompt(doc: dict[str, Any]) -> str:
    subject = doc.get("subject", "").replace("_", " ")
    choices = "\n".join(f"{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, doc["choices"]))
    head = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    return f"{head}{QUESTION_MARKER} {doc['question'].strip()}\n{choices}\nAnswer:"


def mmlu_letter(prediction: str) -> str:
    """The first answer letter A-D in a generated answer ('' if none)."""
    match = re.search(r"\b([ABCD])\b", prediction.strip().upper())
    return match.group(1) if match else ""


# ----------------------------------------------------------------------------------------- needle in a haystack


def niah_documents(
    docs: Iterable[dict[str, Any]],
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    per_length: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Needle-in-a-haystack prompts from SQuAD-style docs.

    For each answerable doc (the needle), other docs' paragraphs fill a haystack; the needle's paragraph is placed
    at ``depth`` (fraction of the haystack before it) and distractors are added until the prompt has as many tokens
    as the target length allows (the prompt never exceeds it; the filler is cut at a paragraph then token boundary).
    Every returned doc has ``context``, ``question``, ``answers``, ``target_tokens``, ``depth`` and ``prompt``.
    """
    import random

    pool = [d for d in docs if d["answers"]["text"]]
    if len(pool) < 2:
        raise ValueError("needle-in-a-haystack needs at least two answerable documents")
    rng = random.Random(seed)
    out = []
    paragraphs = list(dict.fromkeys(d["context"] for d in pool))
    for length in lengths:
        needles = pool if per_length is None else pool[:per_length]
        for i, needle in enumerate(needles):
            depth = depths[i % len(depths)]
            others = [p for p in paragraphs if p != needle["context"]]
            rng.shuffle(others)
            base = qa_prompt("{HAYSTACK}", needle["question"])
            budget = length - len(tokenizer(base.replace("{HAYSTACK}", needle["context"])).input_ids)
            filler: list[str] = []
            used = 0
            for p in others * (1 + length // 200):
                n = len(tokenizer(p, add_special_tokens=False).input_ids) + 1
                if used + n > budget:
                    break
                filler.append(p)
                used += n
            cut = round(depth * len(filler))
            haystack = "\n\n".join(filler[:cut] + [needle["context"]] + filler[cut:])
            prompt = base.replace("{HAYSTACK}", haystack)
            while len(tokenizer(prompt).input_ids) > length and filler:
                filler.pop()
                cut = min(cut, len(filler))
                haystack = "\n\n".join(filler[:cut] + [needle["context"]] + filler[cut:])
                prompt = base.replace("{HAYSTACK}", haystack)
            out.append({**needle, "context": haystack, "target_tokens": length, "depth": depth, "prompt": prompt})
    return out
