"""The embedded reference task: find one fact among many (and, multi-hop, follow two facts).

A prompt is a list of key-value facts followed by a question about one of them::

    <s> K17 V402 ; K5 K133 ; K133 V9 ; ... K88 V51 ; Q : K17          answer: V402 </s>
    <s> ... K5 K133 ; ... K133 V9 ; ...                  Q2 : K5           answer: K133 V9 </s>

* single-hop (``Q``): the answer is the value of the asked key;
* multi-hop (``Q2``): the asked key points to another key, whose value is the answer; the model first names the
  intermediate key, then its value (two facts are needed).

Keys are unique as fact keys within a prompt, so exactly one fact (two for multi-hop) answers the question and every
other fact is a distractor: a cache that evicts the answering fact cannot answer. The question span is the last three
tokens (``Q : K17``); the answer continues right after the asked key, as it does after that key in its fact.
Everything is drawn from a seeded ``random.Random`` so held-out sets are reproducible.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

NUM_KEYS = 768
NUM_VALUES = 256
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PUNCT = [":", ";", "Q", "Q2"]
QUESTION_TOKENS = 3  # "Q : K17"
FACT_TOKENS = 3  # "K17 V402 ;"


def vocabulary() -> list[str]:
    """Every token of the task, in id order (the tokenizer's vocabulary)."""
    return SPECIAL + PUNCT + [f"K{i}" for i in range(NUM_KEYS)] + [f"V{i}" for i in range(NUM_VALUES)]


@dataclass
class Example:
    """One prompt: ``prompt`` text (ends with the question), ``answer`` text (ends with ``</s>``), metadata."""

    prompt: str
    answer: str
    hops: int
    num_tokens: int  # prompt tokens, <s> included
    fact_index: int  # position (in facts) of the answering fact; -1 unknown
    facts: list[tuple[str, str]] = field(default_factory=list)  # (key, value or linked key), in prompt order

    @property
    def question_len(self) -> int:
        return QUESTION_TOKENS

    @property
    def document(self) -> str:
        """The prompt without its question: ``<s>`` and the facts, which any question about them can follow."""
        return f"<s> {' '.join(f'{k} {v} ;' for k, v in self.facts)}"

    def ask(self, key: str) -> tuple[str, str]:
        """Question and answer text about the fact of ``key`` in this prompt's document: single-hop
        (``"Q : K17"``, ``"V402 </s>"``), or multi-hop when the key links to another key (``"Q2 : K5"``,
        ``"K133 V9 </s>"``)."""
        table = dict(self.facts)
        if key not in table:
            raise ValueError(f"{key!r} is not a fact key of this document")
        value = table[key]
        if value in table:  # a link: the answer names the linked key, then its value
            return question(key, 2), f"{value} {table[value]} </s>"
        return question(key, 1), f"{value} </s>"

    @property
    def answer_value(self) -> str:
        """The final value the question asks for (the last answer word before ``</s>``)."""
        return self.answer.split()[-2]


def max_facts(num_tokens: int) -> int:
    """Facts that fit a prompt of ``num_tokens`` tokens (``<s>`` and the question included)."""
    return max(2, (num_tokens - 1 - QUESTION_TOKENS) // FACT_TOKENS)


def question(key: str, hops: int = 1) -> str:
    """The question text asking for ``key``'s value (``"Q : K17"``) or, two hops, its linked key's (``"Q2 : K5"``)."""
    return f"{'Q2' if hops == 2 else 'Q'} : {key}"


def make_example(rng: random.Random, num_tokens: int, hops: int = 1) -> Example:
    """A prompt of exactly ``1 + 3 * facts + 3`` tokens, as close to ``num_tokens`` as the fact size allows."""
    if hops not in (1, 2):
        raise ValueError(f"hops must be 1 or 2, got {hops}")
    n = max_facts(num_tokens)
    if n > NUM_KEYS:
        raise ValueError(f"{num_tokens} tokens need {n} distinct keys; the task has {NUM_KEYS}")
    keys = rng.sample(range(NUM_KEYS), n)
    facts = [(f"K{k}", f"V{rng.randrange(NUM_VALUES)}") for k in keys]
    if hops == 2:
        # the asked key points to another key (a link), whose own fact holds the value; n // 8 more links among
        # the distractors, so link facts are not a giveaway. Sources and targets are disjoint and every target
        # holds a value, so every chain has exactly two hops and a source key never appears as a value.
        order = rng.sample(range(n), n)
        links = 1 + n // 8
        sources, targets = order[:links], order[n - links :]
        for a, b in zip(sources, targets):
            facts[a] = (facts[a][0], facts[b][0])
        link, target = sources[0], targets[0]
        asked = link
        answer = f"{facts[link][1]} {facts[target][1]} </s>"
    else:
        asked = rng.randrange(n)
        answer = f"{facts[asked][1]} </s>"
    body = " ".join(f"{k} {v} ;" for k, v in facts)
    prompt = f"<s> {body} {question(facts[asked][0], hops)}"
    return Example(prompt, answer, hops, 1 + FACT_TOKENS * n + QUESTION_TOKENS, asked, facts)


def make_dataset(seed: int, count: int, num_tokens: int, multi_hop_share: float = 0.0) -> list[Example]:
    """``count`` examples of ``num_tokens`` tokens from ``random.Random(seed)``; a share of them multi-hop."""
    rng = random.Random(seed)
    return [make_example(rng, num_tokens, 2 if rng.random() < multi_hop_share else 1) for _ in range(count)]


def exact_match(prediction: str, example: Example) -> bool:
    """The generated text, up to and including ``</s>``, equals the answer."""
    words = prediction.split()
    if "</s>" in words:
        words = words[: words.index("</s>") + 1]
    return " ".join(words) == example.answer
