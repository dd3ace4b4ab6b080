"""Shared fixtures: tiny random models of several architectures and a tokenizer, all built offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# fused decode runs its kernels' math eagerly in tests (inductor compiles take tens of seconds each on CI's two
# cores); tests/test_fused_attention.py compiles the kernels explicitly
os.environ.setdefault("KVCACHE_PLUGINS_COMPILE", "0")
# ... through the compiled math's path (run eagerly, as just said) rather than a timed choice (that would make tests
# depend on the machine's speed); tests/test_cpu_kernel.py runs the C++ kernel and the choice explicitly
os.environ.setdefault("KVCACHE_PLUGINS_DECODE_PATH", "compiled")

import pytest
import torch
import transformers
from hypothesis import settings
from transformers import AutoModelForCausalLM

transformers.logging.set_verbosity_error()

# CI replays the same examples every run (a red CI must be reproducible); locally hypothesis explores
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

VOCAB = 96
#: wall-clock bound for the subprocesses tests start (the bench, lm_eval, examples, a notebook). It only stops a hung
#: child: a test asserts results, never time. Generous because a fresh user's machine doing other work ran the
#: README's test command in 56 minutes, and a tight bound (900 s) failed test_bench_default_run on a result that
#: was fine.
SUBPROCESS_TIMEOUT_S = 3600

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gpt_neox", "gemma2", "gemma3")
#: the four the foundation issue names; the rest join with the selection caches
CORE_ARCHITECTURES = ("llama", "qwen2", "mistral", "phi3")


def tiny_config(arch: str, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, **overrides):
    """A tiny random config of ``arch`` (head_dim 16 unless overridden)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=kv_heads, **common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(num_key_value_heads=kv_heads, **common)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(num_key_value_heads=kv_heads, head_dim=hidden // heads, **common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=kv_heads, sliding_window=None, **common)
    elif arch == "phi3":
        cfg = transformers.Phi3Config(num_key_value_heads=kv_heads, **common)
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(rotary_pct=0.5, **common)
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(
            num_key_value_heads=kv_heads, head_dim=hidden // heads, sliding_window=16,
            layer_types=(["sliding_attention", "full_attention"] * layers)[:layers], **common,
        )
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            num_key_value_heads=kv_heads, head_dim=hidden // heads, sliding_window=16,
            layer_types=(["sliding_attention", "full_attention"] * layers)[:layers], **common,
        )
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str = "llama", attn: str = "sdpa", seed: int = 0, dtype=torch.float32, **config_kwargs):
    """A tiny random causal LM of ``arch`` with attention implementation ``attn``, in eval mode."""
    cfg = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    # sharpen the output distribution so that greedy decoding and KL comparisons are meaningful
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def prompt_ids(batch: int = 1, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer over a small vocabulary, built with the `tokenizers` library."""
    return make_tokenizer()


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def make_text_model(path: str, seed: int = 0) -> str:
    """A tiny random Llama with a byte-level BPE tokenizer trained on the fixture texts, saved to ``path``."""
    import glob
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for file in sorted(glob.glob(os.path.join(FIXTURES, "*.jsonl"))):
        with open(file) as f:
            texts += [json.dumps(json.loads(line)) for line in f if line.strip()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts * 2, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    return path
