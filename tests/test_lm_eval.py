"""lm-eval integration, through the real ``lm_eval`` CLI in subprocesses, offline, on a tiny model and fixtures."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, SUBPROCESS_TIMEOUT_S, make_text_model

ROOT = Path(__file__).resolve().parents[1]
EVAL_TASKS = str(ROOT / "eval_tasks")
BIN = Path(sys.executable).parent
ALL_TASKS = "kv_squad_v2,kv_triviaqa,kv_hotpotqa,kv_niah,kv_mmlu,kv_mmlu_generative"

pytestmark = pytest.mark.skipif(shutil.which("lm_eval", path=str(BIN)) is None, reason="needs the eval extra (lm-eval)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_text_model(str(tmp_path_factory.mktemp("textmodel")))


def _env(**extra: str) -> dict[str, str]:
    # the integration's switches are the tests' to set; KVCACHE_PLUGINS_COMPILE (conftest: 0) stays, so the
    # subprocesses run the fused kernels' reference math instead of compiling them cold
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_PLUGINS") or k == "KVCACHE_PLUGINS_COMPILE"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def run_lm_eval(model_dir, out, *, tasks=ALL_TASKS, model_args="", program="lm_eval", model="hf", extra=(),
                env=None, launcher=(), check=True):
    args = [
        *launcher, *([str(BIN / program)] if not launcher else ["-m", program]), "--model", model,
        "--model_args", f"pretrained={model_dir},dtype=float32{model_args}", "--tasks", tasks,
        "--include_path", EVAL_TASKS, "--device", "cpu", "--output_path", str(out), "--log_samples",
        "--metadata", f"data_dir={FIXTURES}", "niah_lengths=[256,512]", "niah_per_length=2", *extra,
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env or _env(), cwd=str(out.parent), timeout=SUBPROCESS_TIMEOUT_S)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def results(out: Path) -> dict:
    files = sorted(glob.glob(str(out / "*" / "results_*.json")))
    assert files, f"no results under {out}"
    return json.loads(Path(files[-1]).read_text())


def samples(out: Path) -> dict:
    found = {}
    for file in glob.glob(str(out / "*" / "samples_*.jsonl")):
        for line in Path(file).read_text().splitlines():
            s = json.loads(line)
            task = Path(file).name[len("samples_") :].rsplit("_", 1)[0]
            found[(task, s["doc_id"])] = s["resps"]
    return found


EXPECTED_METRICS = {
    "kv_squad_v2": {"exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"},
    "kv_triviaqa": {"exact", "f1"},
    "kv_hotpotqa": {"exact", "f1"},
    "kv_niah": {"exact", "f1", "f1_256", "f1_512"},
    "kv_mmlu": {"acc"},
    "kv_mmlu_generative": {"acc"},
}


@pytest.mark.parametrize("cache", ["full", "int4", "mixed_l0", "q2c:0.5"])
def test_every_task_runs_with_each_cache(model_dir, tmp_path, cache):
    out = tmp_path / "out"
    run_lm_eval(model_dir, out, model_args=f",cache={cache}", extra=["--limit", "3", "--batch_size", "2"])
    res = results(out)
    model_args = res["config"]["model_args"]  # a dict or the command-line string, by lm-eval version
    if isinstance(model_args, dict):
        assert model_args["cache"] == cache
    else:
        assert f"cache={cache}" in model_args.split(","), model_args
    for task, metrics in EXPECTED_METRICS.items():
        table = res["groups"].get(task) if task in res.get("groups", {}) else res["results"][task]
        keys = {k.split(",")[0] for k in table if "," in k and "stderr" not in k}
        assert metrics <= keys, (task, keys)
        for metric in metrics:
            value = table[f"{metric},none"]
            assert value != value or 0.0 <= value <= 1.0  # nan for per-length metrics of lengths not run
    assert res["results"]["kv_niah"]["f1_1024,none"] != res["results"]["kv_niah"]["f1_1024,none"]  # not run: nan
    subjects = [t for t in res["results"] if t.startswith("kv_mmlu_") and not t.startswith("kv_mmlu_generative")]
    assert len(subjects) == 57


def test_full_cache_equals_stock_hf(model_dir, tmp_path):
    tasks = "kv_squad_v2,kv_mmlu_abstract_algebra,kv_mmlu_anatomy,kv_mmlu_astronomy,kv_hotpotqa"
    stock, ours = tmp_path / "stock", tmp_path / "ours"
    run_lm_eval(model_dir, stock, tasks=tasks, env=_env(KVCACHE_PLUGINS_LM_EVAL="0"), extra=["--batch_size", "4"])
    run_lm_eval(model_dir, ours, tasks=tasks, model_args=",cache=full", extra=["--batch_size", "4"])
    a, b = samples(stock), samples(ours)
    assert a.keys() == b.keys() and len(a) >= 10
    for key in a:
        for x, y in zip(a[key], b[key]):
            x, y = x[0], y[0]
            if isinstance(x, list):  # loglikelihood: (logprob, is_greedy)
                assert abs(float(x[0]) - float(y[0])) < 1e-4 and x[1] == y[1], (key, x, y)
            else:
                assert x == y, (key, x, y)


def test_selection_changes_loglikelihoods(model_dir, tmp_path):
    """Multiple-choice scores really go through the cache: keeping 25% of the context moves the log-probs."""
    tasks = "kv_mmlu_abstract_algebra,kv_mmlu_anatomy"
    full, small = tmp_path / "full", tmp_path / "small"
    run_lm_eval(model_dir, full, tasks=tasks, model_args=",cache=full")
    run_lm_eval(model_dir, small, tasks=tasks, model_args=",cache=q2c:0.25")
    a, b = samples(full), samples(small)
    diffs = [abs(float(x[0][0]) - float(y[0][0])) for k in a for x, y in zip(a[k], b[k])]
    assert max(diffs) > 1e-3


@pytest.mark.slow
def test_transmission_spec_runs_through_the_cli(model_dir, tmp_path):
    """``<preset>@construction`` through lm-eval: generation and log-likelihoods with the context stored before the
    question (its effect on log-likelihoods: tests/test_transmission.py)."""
    out = tmp_path / "out"
    run_lm_eval(model_dir, out, tasks="kv_squad_v2,kv_mmlu_abstract_algebra", model_args=",cache=int2@construction",
                extra=["--limit", "2"])
    res = results(out)["results"]
    assert {"exact,none", "f1,none"} <= set(res["kv_squad_v2"]) and "acc,none" in res["kv_mmlu_abstract_algebra"]


def test_kvcache_eval_command_and_model_name(model_dir, tmp_path):
    out = tmp_path / "out"
    # the hook is off here: kvcache-eval installs the integration itself and knows the hf-kvcache model name
    run_lm_eval(model_dir, out, tasks="kv_squad_v2", model_args=",cache=int8", program="kvcache-eval",
                model="hf-kvcache", env=_env(KVCACHE_PLUGINS_LM_EVAL="0"), extra=["--limit", "2"])
    assert {"exact,none", "f1,none"} <= set(results(out)["results"]["kv_squad_v2"])


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "hf-kvcache"]
    cls = ep.load()
    from lm_eval.models.huggingface import HFLM

    assert issubclass(cls, HFLM) and cls.__name__ == "KVCacheHFLM"


def test_bad_spec_fails_before_the_model_loads(tmp_path):
    proc = run_lm_eval("/nonexistent/model", tmp_path / "out", tasks="kv_squad_v2", model_args=",cache=int5",
                       check=False)
    assert proc.returncode != 0
    assert "invalid cache spec 'int5'" in proc.stderr and "Valid forms:" in proc.stderr
    assert "nonexistent" not in proc.stderr.split("invalid cache spec")[0].split("Traceback")[-1]


def test_question_aware_cache_needs_a_marker(model_dir, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    text = (ROOT / "eval_tasks" / "kv_squad_v2" / "kv_squad_v2.yaml").read_text()
    text = text.replace("task: kv_squad_v2", "task: no_marker").replace('  question_marker: "Question:"\n', "")
    (tasks / "no_marker.yaml").write_text(text)
    out = tmp_path / "out"
    args = [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32,cache=q2c:0.5",
            "--tasks", "no_marker", "--include_path", str(tasks), "--device", "cpu", "--limit", "2",
            "--metadata", f"data_dir={FIXTURES}", "--output_path", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode != 0 and "declares no question marker" in proc.stderr
    args[4] = args[4].replace("q2c:0.5", "snapkv:0.5")  # question-agnostic specs need no marker
    proc = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cache_implementation_in_generation_config_is_cleared(model_dir, tmp_path):
    static = tmp_path / "static_model"
    shutil.copytree(model_dir, static)
    config = json.loads((static / "generation_config.json").read_text())
    config["cache_implementation"] = "static"
    (static / "generation_config.json").write_text(json.dumps(config))
    # transformers refuses cache_implementation together with past_key_values: the run only succeeds if the model
    # class cleared it, and then it must generate exactly what the plain model does
    run_lm_eval(str(static), tmp_path / "static", tasks="kv_squad_v2", model_args=",cache=int4", extra=["--limit", "2"])
    run_lm_eval(model_dir, tmp_path / "plain", tasks="kv_squad_v2", model_args=",cache=int4", extra=["--limit", "2"])
    got = samples(tmp_path / "static")
    assert len(got) == 2 and got == samples(tmp_path / "plain")


def test_data_parallel_equals_single_process(model_dir, tmp_path):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    run_lm_eval(model_dir, single, tasks="kv_squad_v2", model_args=",cache=q2c:0.5")
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = run_lm_eval(model_dir, parallel, tasks="kv_squad_v2", model_args=",cache=q2c:0.5", launcher=launcher,
                       env=_env(ACCELERATE_USE_CPU="true"))
    log = proc.stdout + proc.stderr
    assert "on rank 0" in log and "on rank 1" in log  # the ranks really split the documents
    assert samples(single) == samples(parallel)
    r1 = {k: v for k, v in results(single)["results"]["kv_squad_v2"].items() if "stderr" not in k}
    r2 = {k: v for k, v in results(parallel)["results"]["kv_squad_v2"].items() if "stderr" not in k}
    assert r1 == r2


def test_startup_hook_only_acts_in_lm_eval():
    code = (
        "import sys\n"
        "print(any(type(f).__name__ == '_Finder' for f in sys.meta_path), 'torch' in sys.modules, 'lm_eval' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env()).stdout.split()
    assert out == ["False", "False", "False"]
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=_env(KVCACHE_PLUGINS_LM_EVAL="force")).stdout.split()
    assert forced[0] == "True" and forced[1:] == ["False", "False"]


@pytest.mark.parametrize(
    "argv, module",
    [
        (["python", "-m", "lm_eval", "run"], "lm_eval"),
        (["python", "-um", "lm_eval"], "lm_eval"),
        (["python", "-X", "importtime", "-m", "lm_eval.__main__"], "lm_eval.__main__"),
        (["python", "-Wignore", "-mlm_eval"], "lm_eval"),
        (["python", "-c", "import lm_eval"], ""),
        (["python", "script.py", "-m", "lm_eval"], ""),
    ],
)
def test_hook_recognizes_python_dash_m(argv, module):
    import kvcache_plugins_lmeval_hook as hook

    assert hook._runs_module(argv) == module


def test_question_len_from_ids(tiny_tokenizer):
    from kvcache_plugins.eval.lm_eval_model import question_len_from_ids

    ids = tiny_tokenizer("w1 w2 w3 w9 w4 w9 w5 w6", add_special_tokens=False).input_ids
    assert question_len_from_ids(tiny_tokenizer, ids, "w9") == 3  # the last occurrence starts the span
    assert question_len_from_ids(tiny_tokenizer, ids, "w77") is None
