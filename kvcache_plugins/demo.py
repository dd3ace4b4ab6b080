"""``kvcache-demo``: MixedPrecisionCache presets on a tiny local model, offline, in a few seconds.

The model is a tiny random Qwen2 built in memory (nothing is downloaded); its answers carry no meaning, so the
table shows what the caches do to the *computation*: bytes held, bandwidth against a 16-bit cache, how many of
the greedy tokens match the full cache, and the largest change in next-token log-probabilities.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from ._compat import cache_kwargs
from .caches.mixed_precision import MixedPrecisionCache

PRESETS = ("full", "int8", "int4", "mixed_l0", "kivi4", "int3", "int2")


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192,
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked next-token distribution, like a trained model's
    return model


def run(prompt_tokens: int = 1024, new_tokens: int = 32, out=None) -> list[dict]:
    out = out or sys.stdout
    model = tiny_model()
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    kwargs = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    ref = model.generate(prompt, **cache_kwargs(model, DynamicCache(config=model.config)), **kwargs)
    ref_tokens = ref.sequences[0, prompt_tokens:]
    ref_logp = torch.stack(ref.logits).log_softmax(-1)
    print(f"tiny random Qwen2 (4 layers, 2 KV heads, head_dim 64), {prompt_tokens}-token prompt, "
          f"{new_tokens} greedy tokens", file=out)
    print(f"{'cache':<10}{'KV bytes':>12}{'bandwidth':>11}{'tokens = full':>15}{'max |dlogp|':>13}", file=out)
    rows = []
    for preset in PRESETS:
        cache = MixedPrecisionCache(model, preset)
        res = model.generate(prompt, **cache_kwargs(model, cache), **kwargs)
        same = int((res.sequences[0, prompt_tokens:] == ref_tokens).sum())
        n = min(len(res.logits), len(ref.logits))
        dlogp = float((torch.stack(res.logits[:n]).log_softmax(-1) - ref_logp[:n]).abs().max())
        fp = cache.memory_footprint()
        rows.append({"cache": preset, "bytes": fp.total, "bandwidth": fp.bandwidth, "same_tokens": same, "max_dlogp": dlogp})
        print(f"{preset:<10}{fp.total:>12,}{fp.bandwidth:>10.1%}{same:>9}/{len(ref_tokens):<5}{dlogp:>13.4f}", file=out)
    print("bandwidth = bytes held / bytes of the same tokens as 16-bit K and V (this fp32 model stores 'full' "
          "at 200%)", file=out)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="random prompt length (default: 1024)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated (default: 32)")
    args = parser.parse_args(argv)
    run(args.prompt_tokens, args.new_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
