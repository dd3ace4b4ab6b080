"""Scout transfer report: a small model selects, a large one keeps; agreement, bytes on the wire, accuracy.

Run: ``python -m kvcache_plugins.bench.scout_transfer`` (options: ``--tokens 512 --prompts 16``).

Part 1 (always): two tiny random Qwen2 models of different size sharing one tokenizer, in the spirit of the lab's
Qwen2.5-3B -> 7B study. For Q2C at 50% and 75% retention it prints how many kept positions the scout's selection
shares with the large model's own (the lab's agreement metric), and the selection's wire size next to the 16-bit KV
cache it replaces. Random weights carry no meaning, so no accuracy here.

Part 2 (when the embedded reference models are installed): the trained scout and reference models on held-out
key-value retrieval prompts: exact match of the reference model with its own Q2C selection vs the scout's.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..caches.scout_masked import ScoutMaskedCache
from ..scout import Scout, kv_cache_bytes, selection_overlap
from ..training.tokenizer import build_tokenizer
from .measure import greedy, tiny_qwen2


def random_pair_report(tokens: int, prompts: int, out=None) -> list[dict[str, Any]]:
    out = out or sys.stdout
    tok = build_tokenizer()
    vocab = len(tok)
    scout = tiny_qwen2(seed=1, layers=2, hidden=64, heads=4, vocab=vocab, max_positions=8192)
    large = tiny_qwen2(seed=2, layers=4, hidden=192, heads=6, vocab=vocab, max_positions=8192)
    ids = torch.randint(9, vocab, (prompts, tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    print(f"tiny random Qwen2 pair (scout 2x64, large 4x192), {prompts} prompts of {tokens} tokens, question 4 tokens",
          file=out)
    print(f"{'retention':>10}{'overlap':>10}{'wire bytes':>12}{'KV bytes (16-bit)':>19}{'ratio':>10}", file=out)
    for retention in (0.5, 0.75):
        from_scout = Scout(scout, tok, "q2c", retention).select(ids, question_len=4)
        own = Scout(large, tok, "q2c", retention).select(ids, question_len=4)
        kv = kv_cache_bytes(large.config, tokens, batch=prompts)
        wire = from_scout.nbytes
        overlap = selection_overlap(from_scout, own)
        rows.append({"retention": retention, "overlap": overlap, "wire_bytes": wire, "kv_bytes": kv})
        print(f"{retention:>10.0%}{overlap:>10.1%}{wire:>12,}{kv:>19,}{kv / wire:>9.0f}x", file=out)
    print("(random weights: the overlap of two unrelated random models is a floor, not a finding)", file=out)
    return rows


def embedded_report(tokens: int, prompts: int, out=None) -> dict[str, float] | None:
    out = out or sys.stdout
    from ..reference import load_reference_model, load_scout_model, reference_available
    from ..tasks.kv_retrieval import exact_match, make_dataset

    if not reference_available(scout=True):
        print("\nembedded reference and scout models not installed: accuracy part skipped", file=out)
        return None
    large, tok = load_reference_model()
    scout, _ = load_scout_model()
    # multi-hop: the second hop is read from the compressed cache (a single-hop answer comes from the prefill)
    examples = make_dataset(seed=424242, count=prompts, num_tokens=tokens, multi_hop_share=1.0)
    result = {"own": 0, "scout": 0, "full": 0}
    overlaps = []
    for ex in examples:
        ids = tok(ex.prompt, return_tensors="pt").input_ids
        own = Scout(large, tok, "q2c", 0.5).select(ids, question_len=ex.question_len)
        given = Scout(scout, tok, "q2c", 0.5).select(ids, question_len=ex.question_len)
        overlaps.append(selection_overlap(given, own))
        for name, cache in (
            ("own", ScoutMaskedCache(own, large, tokenizer=tok)),
            ("scout", ScoutMaskedCache(given, large, tokenizer=tok)),
            ("full", None),
        ):
            gen = greedy(large, ids, torch.ones_like(ids), cache, 4)
            result[name] += exact_match(tok.decode(gen[0, ids.shape[1] :]), ex)
    scores = {k: v / prompts for k, v in result.items()}
    scores["overlap"] = sum(overlaps) / len(overlaps)
    print(f"\nembedded models on {prompts} held-out {tokens}-token multi-hop retrieval prompts, q2c 50%", file=out)
    print(f"full cache EM {scores['full']:.1%} | own selection EM {scores['own']:.1%} | scout selection EM "
          f"{scores['scout']:.1%} | overlap {scores['overlap']:.1%}", file=out)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="prompt length (default: 512)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts to evaluate (default: 16)")
    args = parser.parse_args(argv)
    random_pair_report(args.tokens, args.prompts)
    embedded_report(args.tokens, args.prompts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
