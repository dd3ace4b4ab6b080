"""The package's own ``from_pretrained`` loads never depend on hub kernels.

transformers 5.25 made ``kernels`` a hard dependency and ``from_pretrained`` default to ``use_kernels=True``: with
``kernels`` absent every plain load raises, with it present a load kernelizes the model (on CUDA: code fetched from
the Hub). The package's loads (the embedded models, a scout or benchmark model named by path, the training script)
pass :func:`kvcache_plugins._compat.no_hub_kernels`. Each scenario runs in a fresh interpreter, offline:

* ``kernels`` absent (this project's environments: the registry serves no ``kernels`` 0.19);
* ``kernels`` importable: a stand-in distribution ``kernels`` 0.19.1 on ``PYTHONPATH`` (transformers' own
  availability check accepts it), whose class-definition decorators are no-ops and whose every other name raises
  ``hub kernels reached``, so any kernelization, now or at ``model.train()``, fails loudly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers
from conftest import make_text_model
from packaging.version import Version

from kvcache_plugins._compat import KERNELS_BY_DEFAULT_IN, no_hub_kernels
from kvcache_plugins.reference import REFERENCE_DIR, SCOUT_DIR, reference_available

INSTALLED = Version(Version(transformers.__version__).base_version)
KERNELIZES_BY_DEFAULT = INSTALLED >= KERNELS_BY_DEFAULT_IN

pytestmark = pytest.mark.skipif(not reference_available(scout=True), reason="embedded models not installed")

KERNELS_STAND_IN = '''
"""A stand-in for kernels 0.19.1: declarations are no-ops, anything that would kernelize raises."""


def _declaration(*args, **kwargs):
    return lambda obj: obj


use_kernel_forward_from_hub = use_kernelized_func = _declaration


class _Reached:
    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"hub kernels reached: kernels.{self.name}")

    def __getattr__(self, attr):
        raise RuntimeError(f"hub kernels reached: kernels.{self.name}.{attr}")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Reached(name)
'''

#: every load path of the package, then training mode and back (where 5.25 re-kernelizes a kernelized model)
LOADS = '''
import json, sys
import torch
import transformers
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from kvcache_plugins._compat import no_hub_kernels
from kvcache_plugins.bench.tasks import RetrievalTask
from kvcache_plugins.eval.bench_tasks import get_qa_task
from kvcache_plugins.reference import load_reference_model, load_scout_model
from kvcache_plugins.specs import load_scout
from kvcache_plugins.training.train_reference import model_config

paths = json.loads(sys.argv[1])
try:
    AutoModelForCausalLM.from_pretrained(paths["reference"])
    plain = "loaded"
except (ValueError, RuntimeError) as error:
    plain = str(error).splitlines()[0]
models = [
    load_reference_model()[0],
    load_scout_model()[0],
    load_scout(paths["text"])[0],
    RetrievalTask().load_model(paths["text"], torch.float32, "cpu")[0],
    get_qa_task("kv_squad_v2").load_model(paths["text"], torch.float32, "cpu")[0],
    Qwen2ForCausalLM.from_pretrained(paths["scout"], **no_hub_kernels()),  # as training/train_reference.py loads
    Qwen2ForCausalLM(model_config("scout")),  # and as it starts from scratch
]
for model in models:
    model.train()
    loss = model(torch.tensor([[1, 5, 7, 9]]), labels=torch.tensor([[1, 5, 7, 9]])).loss
    loss.backward()
    model.eval()
    assert not getattr(model, "use_kernels", False), type(model).__name__
print(json.dumps({"plain": plain, "loaded": len(models)}))
'''


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return make_text_model(str(tmp_path_factory.mktemp("text_model")))


def _run_loads(text_model: str, pythonpath: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + [p for p in [env.get("PYTHONPATH")] if p])
    paths = {"reference": str(REFERENCE_DIR), "scout": str(SCOUT_DIR), "text": text_model}
    out = subprocess.run([sys.executable, "-c", LOADS, json.dumps(paths)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_keyword_follows_the_installed_release():
    assert no_hub_kernels() == ({"use_kernels": False} if KERNELIZES_BY_DEFAULT else {})
    assert no_hub_kernels() is not no_hub_kernels()  # a fresh dict: a caller may add to it


def test_package_loads_with_kernels_absent(text_model):
    probe = subprocess.run([sys.executable, "-c", "import kernels"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("kernels is installed here")
    result = _run_loads(text_model)
    assert result["loaded"] == 7
    if KERNELIZES_BY_DEFAULT:  # the failure the package avoids: transformers' own load raises without kernels
        assert result["plain"].startswith("Kernels are not available"), result["plain"]
    else:
        assert result["plain"] == "loaded"


@pytest.mark.skipif(not KERNELIZES_BY_DEFAULT, reason="before 5.25 hub kernels are opt-in and left alone")
def test_package_loads_never_kernelize_with_kernels_importable(text_model, tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text(textwrap.dedent(KERNELS_STAND_IN))
    dist_info = tmp_path / "kernels-0.19.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    result = _run_loads(text_model, pythonpath=tmp_path)
    assert result["plain"].startswith("hub kernels reached"), result["plain"]  # the stand-in is seen and reached
    assert result["loaded"] == 7
