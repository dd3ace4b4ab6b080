"""Where the lm-eval tasks read their data: a single local file, a mapping of split to file, or lm-eval's usual
``include`` + ``dataset_kwargs: {data_files: {validation: path}}`` YAML, all offline on the fixture files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURES

from kvcache_plugins.eval import tasks

ROOT = Path(__file__).resolve().parents[1]
HOTPOT = str(Path(FIXTURES) / "hotpotqa_distractor.jsonl")
MMLU = str(Path(FIXTURES) / "mmlu.jsonl")


def _lines(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_a_single_path_and_a_split_mapping_load_the_same_rows():
    expected = _lines(HOTPOT)
    single = tasks.load_hotpotqa(data_files=HOTPOT)
    mapped = tasks.load_hotpotqa(data_files={"validation": HOTPOT})
    listed = tasks.load_hotpotqa(data_files={"validation": [HOTPOT, HOTPOT]})
    assert list(single) == list(mapped) == ["validation"]
    assert single["validation"].to_list() == mapped["validation"].to_list() == expected
    assert listed["validation"].num_rows == 2 * len(expected)


def test_a_mapping_keeps_every_split_it_names(tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("\n".join(json.dumps(r) for r in _lines(HOTPOT)[:2]))
    data = tasks.load_hotpotqa(data_files={"validation": HOTPOT, "train": str(few)})
    assert data["train"].num_rows == 2 and data["validation"].num_rows == len(_lines(HOTPOT))


def test_mmlu_subjects_read_a_mapping_too():
    subject = _lines(MMLU)[0]["subject"]
    rows = tasks.mmlu_subject_rows(subject, data_files={"test": MMLU})["test"].to_list()
    assert rows and all(r["subject"] == subject for r in rows)
    assert rows == tasks.mmlu_subject_rows(subject, data_files=MMLU)["test"].to_list()


def test_bad_data_files_name_what_is_allowed():
    with pytest.raises(ValueError, match=r"maps the splits \['train'\].*reads the split 'validation'"):
        tasks.load_hotpotqa(data_files={"train": HOTPOT})
    with pytest.raises(TypeError, match="a path, a list of paths or a mapping"):
        tasks.load_hotpotqa(data_files=3)
    with pytest.raises(TypeError, match="a path, a list of paths or a mapping"):
        tasks.load_hotpotqa(data_files={"validation": 3})


def test_lm_eval_include_with_dataset_kwargs_data_files(tmp_path):
    """lm-eval's usual way to point a task at local files, on our task: it used to fail with FileNotFoundError."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    (tmp_path / "local_hotpot.yaml").write_text(
        f"include: {ROOT / 'eval_tasks' / 'kv_hotpotqa' / 'kv_hotpotqa.yaml'}\n"
        "task: local_hotpot\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {HOTPOT}\n"
    )
    manager = TaskManager(include_path=[str(ROOT / "eval_tasks"), str(tmp_path)], include_defaults=False)
    task = manager.load(["local_hotpot"])["tasks"]["local_hotpot"]
    docs = list(task.test_docs())
    assert [d["question"] for d in docs] == [r["question"] for r in _lines(HOTPOT)]
