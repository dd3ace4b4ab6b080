"""The embedded reference models: small Qwen2 models trained on the key-value retrieval task, shipped in the
package so that the benchmark and the notebooks run offline out of the box.

* ``reference_model``: 4 layers, hidden 64, GQA (4 query / 2 KV heads of size 32), RoPE; solves single- and multi-hop
  retrieval in prompts up to 2048 tokens (see ``training_log.json`` next to the weights for its held-out scores).
* ``scout_model``: 2 layers, otherwise the same shape and the same tokenizer: the small model of the scout studies.

Both load with plain ``AutoModelForCausalLM.from_pretrained(path)`` (from transformers 5.25 on with
``use_kernels=False`` where ``kernels`` is absent; see :func:`._compat.no_hub_kernels`); :func:`reference_model_path`
gives the path.
The word-level tokenizer is at the model root (``PreTrainedTokenizerFast.from_pretrained(path)``) and again in
``path / "tokenizer"`` for ``AutoTokenizer``: from transformers 5.2x on, ``AutoTokenizer`` given a directory whose
``config.json`` says ``qwen2`` always builds a ``Qwen2Tokenizer`` (byte-level BPE), which cannot read this
vocabulary; without a model config beside it, it honours ``tokenizer_config.json``.
They were trained by ``python -m kvcache_plugins.training.train_reference``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
REFERENCE_DIR = ASSETS / "reference_model"
SCOUT_DIR = ASSETS / "scout_model"


def reference_model_path(scout: bool = False) -> Path:
    return SCOUT_DIR if scout else REFERENCE_DIR


def reference_tokenizer_path(scout: bool = False) -> Path:
    """A directory ``AutoTokenizer.from_pretrained`` loads the models' word-level tokenizer from (any 5.x)."""
    return reference_model_path(scout) / "tokenizer"


def reference_available(scout: bool = False) -> bool:
    """Whether the reference model (and, with ``scout=True``, the scout model too) is installed."""
    dirs = [REFERENCE_DIR] + ([SCOUT_DIR] if scout else [])
    return all((d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file() for d in dirs)


def _load(path: Path, dtype: torch.dtype, attn_implementation: str, device: str | torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from ._compat import no_hub_kernels

    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no trained model at {path}; train it with `python -m kvcache_plugins.training.train_reference --out {path}`"
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, **no_hub_kernels()
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def load_reference_model(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the embedded reference model, loaded offline from the installed package."""
    return _load(REFERENCE_DIR, dtype, attn_implementation, device)


def load_scout_model(
    dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa", device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the embedded scout model (same tokenizer as the reference model)."""
    return _load(SCOUT_DIR, dtype, attn_implementation, device)


def training_log(scout: bool = False) -> dict[str, Any]:
    """The training record shipped next to the weights (arguments, minutes, held-out exact match)."""
    return json.loads((reference_model_path(scout) / "training_log.json").read_text())
