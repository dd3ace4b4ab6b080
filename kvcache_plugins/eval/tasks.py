"""Data loading and scoring behind the lm-eval tasks in ``eval_tasks/`` (their ``utils.py`` call these).

Every task loads its public hub dataset with ``datasets.load_dataset`` unless the run passes local files of the same
schema (JSON or JSONL): ``--metadata data_dir=/path/to/folder`` holding ``squad_v2.jsonl``, ``triviaqa_rc.jsonl``,
``hotpotqa_distractor.jsonl`` and ``mmlu.jsonl`` (one flag for a multi-task run), or ``--metadata
data_files=/path/to/file.jsonl`` for a single task. That is how the tests run offline. A task YAML can also point at
local files the usual lm-eval way: ``include`` the task and set ``dataset_kwargs: {data_files: {validation: path}}``
(a mapping of split name to path(s), as ``datasets.load_dataset("json", data_files=...)`` takes; ``dataset_path: json``
may stay, the task's loader reads the files).

Metrics per task (all means over documents):

* ``kv_squad_v2``: ``exact``, ``f1``, and the ``HasAns_*`` / ``NoAns_*`` splits (official SQuAD v2 normalization);
* ``kv_triviaqa``: ``exact``, ``f1``, max over the answer and its aliases;
* ``kv_hotpotqa``: ``exact``, ``f1`` on the answer;
* ``kv_mmlu`` (log-likelihood of the letters) and ``kv_mmlu_generative`` (generated letter): ``acc``, grouped over
  the 57 subjects weighted by size;
* ``kv_niah``: ``exact``/``f1`` overall and ``f1_<length>`` per haystack length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from . import qa

LOCAL_NAMES = {
    "squad_v2": "squad_v2.jsonl",
    "triviaqa": "triviaqa_rc.jsonl",
    "hotpotqa": "hotpotqa_distractor.jsonl",
    "mmlu": "mmlu.jsonl",
}
HUB = {
    "squad_v2": ("rajpurkar/squad_v2", None, "validation"),
    "triviaqa": ("mandarjoshi/trivia_qa", "rc", "validation"),
    "hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "validation"),
    "mmlu": ("cais/mmlu", "all", "test"),
}
NIAH_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)


#: what ``data_files`` may be: a path, a list of paths, or (lm-eval's ``dataset_kwargs: {data_files: {validation:
#: path}}`` convention, as for ``datasets.load_dataset("json", data_files=...)``) a mapping of split name to either
DataFiles = Union[str, os.PathLike, Sequence[str], Mapping[str, Union[str, os.PathLike, Sequence[str]]]]


def _read_local(path: str) -> list[dict[str, Any]]:
    text = Path(path).expanduser().read_text()
    if path.endswith(".json") and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _paths(value: Any) -> list[str]:
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    if isinstance(value, Sequence) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [str(v) for v in value]
    raise TypeError(
        f"data_files must be a path, a list of paths or a mapping of split name to path(s); got {value!r}"
    )


def _local_files(
    name: str, split_name: str, data_files: DataFiles | None, data_dir: str | None
) -> dict[str, list[str]] | None:
    """``{split: [paths]}`` of the local data a run asks for, or ``None`` (read the hub dataset)."""
    if data_files:
        if isinstance(data_files, Mapping):
            files = {str(split): _paths(paths) for split, paths in data_files.items()}
            if split_name not in files:
                raise ValueError(
                    f"data_files maps the splits {sorted(files)}, but this task reads the split {split_name!r}: "
                    f"give data_files={{{split_name}: <path>}} (or a single path)"
                )
            return files
        return {split_name: _paths(data_files)}
    if data_dir:
        return {split_name: [str(Path(str(data_dir)).expanduser() / LOCAL_NAMES[name])]}
    return None


def _rows_of(paths: list[str]) -> list[dict[str, Any]]:
    return [row for path in paths for row in _read_local(path)]


def load_rows(
    name: str, split_name: str = "validation", data_files: DataFiles | None = None, data_dir: str | None = None,
    **_: Any,
):
    """``datasets.DatasetDict({split_name: rows})`` of a hub dataset, or of local JSON/JSONL files: ``data_files``
    (a path, a list of paths, or a mapping of split name to path(s)) or the conventional file in ``data_dir``."""
    import datasets

    local = _local_files(name, split_name, data_files, data_dir)
    if local:
        return datasets.DatasetDict({split: datasets.Dataset.from_list(_rows_of(paths)) for split, paths in local.items()})
    path, config, split = HUB[name]
    ds = datasets.load_dataset(path, config, split=split)
    return datasets.DatasetDict({split_name: ds})


# -------------------------------------------------------------------------------------------------- QA scoring


def _qa_scores(prediction: str, golds: list[str]) -> dict[str, float]:
    pred = qa.clean_prediction(prediction)
    return {"exact": qa.exact_match_score(pred, golds), "f1": qa.f1_score(pred, golds)}


def load_squad_v2(**metadata: Any):
    return load_rows("squad_v2", "validation", **metadata)


def load_triviaqa(**metadata: Any):
    return load_rows("triviaqa", "validation", **metadata)


def load_hotpotqa(**metadata: Any):
    return load_rows("hotpotqa", "validation", **metadata)


def squad_target(doc: dict[str, Any]) -> str:
    golds = qa.squad_golds(doc)
    return golds[0] if golds else qa.UNANSWERABLE


def triviaqa_target(doc: dict[str, Any]) -> str:
    return doc["answer"]["value"]


def hotpot_target(doc: dict[str, Any]) -> str:
    return doc["answer"]


def squad_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    golds = qa.squad_golds(doc)
    scores = _qa_scores(results[0], golds)
    has = bool(golds)
    return {
        **scores,
        "HasAns_exact": (scores["exact"], has),
        "HasAns_f1": (scores["f1"], has),
        "NoAns_exact": (scores["exact"], not has),
        "NoAns_f1": (scores["f1"], not has),
    }


def mean_where(items: list[tuple[float, bool]]) -> float:
    """Mean of the values whose flag is set (the SQuAD v2 HasAns / NoAns splits, per-length NIAH scores)."""
    values = [v for v, keep in items if keep]
    return sum(values) / len(values) if values else float("nan")


def triviaqa_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return _qa_scores(results[0], qa.triviaqa_golds(doc))


def hotpot_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return _qa_scores(results[0], qa.hotpot_golds(doc))


# ----------------------------------------------------------------------------------------------------- MMLU


def mmlu_target(doc: dict[str, Any]) -> int:
    return int(doc["answer"])


def mmlu_letter_target(doc: dict[str, Any]) -> str:
    return qa.MMLU_LETTERS[int(doc["answer"])]


def mmlu_subject_rows(subject: str, data_files: DataFiles | None = None, data_dir: str | None = None, **_: Any):
    """One MMLU subject's test rows (hub config ``subject``, or the subject's rows of local files)."""
    import datasets

    local = _local_files("mmlu", "test", data_files, data_dir)
    if local:
        return datasets.DatasetDict({
            split: datasets.Dataset.from_list([r for r in _rows_of(paths) if r.get("subject") == subject])
            for split, paths in local.items()
        })
    return datasets.DatasetDict({"test": datasets.load_dataset("cais/mmlu", subject, split="test")})


def mmlu_generative_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"acc": float(qa.mmlu_letter(results[0]) == qa.MMLU_LETTERS[int(doc["answer"])])}


# ------------------------------------------------------------------------------------------ needle in haystack


def niah_rows(
    data_files: DataFiles | None = None,
    data_dir: str | None = None,
    niah_lengths: Any = (512, 1024, 2048, 4096),
    niah_per_length: int = 20,
    pretrained: str | None = None,
    tokenizer: str | None = None,
    **_: Any,
):
    """Needle-in-a-haystack prompts of exact token lengths, built from SQuAD v2 with the evaluated model's tokenizer
    (``tokenizer`` metadata, else the model's ``pretrained`` path or id)."""
    import datasets
    from transformers import AutoTokenizer

    name = tokenizer or pretrained
    if not name:
        raise ValueError("kv_niah builds prompts of exact token lengths: it needs the model's tokenizer (pretrained=...)")
    tok = AutoTokenizer.from_pretrained(name)
    lengths = json.loads(niah_lengths) if isinstance(niah_lengths, str) else list(niah_lengths)
    unknown = [n for n in lengths if n not in NIAH_LENGTHS]
    if unknown:
        raise ValueError(f"kv_niah reports per-length metrics for {NIAH_LENGTHS}; got {unknown}")
    source = load_rows("squad_v2", "validation", data_files, data_dir)["validation"]
    docs = qa.niah_documents(list(source), tok, lengths, per_length=int(niah_per_length))
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def niah_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    scores = _qa_scores(results[0], qa.squad_golds(doc))
    out: dict[str, Any] = dict(scores)
    for n in NIAH_LENGTHS:
        out[f"f1_{n}"] = (scores["f1"], doc["target_tokens"] == n)
    return out


# ------------------------------------------------------------------------------------- embedded retrieval task


def retrieval_rows(
    retrieval_tokens: Any = (512,), retrieval_count: int = 50, retrieval_multi_hop: float = 0.5,
    retrieval_seed: int = 4242, **_: Any,
):
    """Held-out prompts of the embedded key-value retrieval task (what the reference model was trained on)."""
    import datasets

    from ..tasks.kv_retrieval import make_dataset

    lengths = json.loads(retrieval_tokens) if isinstance(retrieval_tokens, str) else list(retrieval_tokens)
    rows = []
    for n in lengths:
        for ex in make_dataset(int(retrieval_seed) + n, int(retrieval_count), n, float(retrieval_multi_hop)):
            rows.append({"prompt": ex.prompt, "answer": ex.answer, "hops": ex.hops, "tokens": n})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def retrieval_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    words = results[0].split()
    expected = doc["answer"].replace("</s>", "").split()
    em = float(words[: len(expected)] == expected)
    return {"exact": em, "exact_single_hop": (em, doc["hops"] == 1), "exact_multi_hop": (em, doc["hops"] == 2)}
