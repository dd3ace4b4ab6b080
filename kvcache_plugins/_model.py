"""Small helpers to read what the caches need from a model or its config."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


def text_config(model_or_config: Any) -> PretrainedConfig:
    """The decoder text config of a model or config (multimodal configs hold it as a sub-config)."""
    if isinstance(model_or_config, PreTrainedModel):
        config = model_or_config.config
    elif isinstance(model_or_config, PretrainedConfig):
        config = model_or_config
    else:
        raise TypeError(
            "expected a transformers PreTrainedModel or PretrainedConfig as the first argument, got "
            f"{type(model_or_config).__name__}"
        )
    return config.get_text_config(decoder=True)


def head_dim(config: PretrainedConfig) -> int:
    """Attention head dimension: ``config.head_dim`` where set, else ``hidden_size // num_attention_heads``."""
    value = getattr(config, "head_dim", None)
    return int(value) if value else config.hidden_size // config.num_attention_heads


def num_layers(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)

def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers decoder: they carry ``layer_idx`` and the config they dispatch on."""
    found = []
    for module in model.modules():
        if (
            type(module).__name__.endswith("Attention")
            and isinstance(getattr(module, "layer_idx", None), int)
            and hasattr(getattr(module, "config", None), "_attn_implementation")
        ):
            found.append(module)
    return found
