"""One-line mutants for ``tools/mutate.py``: realistic bugs in the code behind issue 25's behaviours 1-4.

Each names the file, a snippet that occurs exactly once there, its replacement and the pytest stages that should
catch it: stage 1 the rule tests written for the behaviour, stage 2 the closest existing tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    stages: tuple[tuple[str, ...], ...]
    note: str


FUSED = (
    ("tests/test_rules_fused.py",),
    ("tests/test_fused_attention.py", "-k", "kernel_matches or additive_mask or (fused_decode_matches and qwen2)"
     " or compressed_cache_fused or scout_masked_cache_fused"),
)
CHUNKED = (
    ("tests/test_rules_chunked_ragged.py", "-k", "prefill_in_chunks"),
    ("tests/test_chunked_prefill.py", "-k", "keeps_the_whole_prompts_budget or by_hand"),
)
BUDGETS = (
    ("tests/test_rules_budgets.py",),
    ("tests/test_budgets_and_scorers.py", "-k", "adakv"),
)
RAGGED = (
    ("tests/test_rules_chunked_ragged.py", "-k", "repeat_interleave or beam_search"),
    ("tests/test_budgets_and_scorers.py", "-k", "adakv or ragged"),
)
ROWS = (
    ("tests/test_rules_chunked_ragged.py", "-k", "repeat_interleave or beam_search"),
    ("tests/test_compressed_cache.py", "-k", "beam_search or num_return_sequences"),
)

FU = "kvcache_plugins/attention/fused.py"
CH = "kvcache_plugins/caches/chunked.py"
LY = "kvcache_plugins/selection/layout.py"
BU = "kvcache_plugins/selection/budget.py"
BA = "kvcache_plugins/selection/base.py"
RA = "kvcache_plugins/layers/ragged.py"
LA = "kvcache_plugins/layers/base.py"

MUTANTS = [
    # ---------------------------------------------------------------- 1. fused kernel numerics and memo
    Mutant("F1", FU, "top = torch.maximum(past.amax(-1), recent.amax(-1)).unsqueeze(-1)",
           "top = past.amax(-1).unsqueeze(-1)", FUSED, "running max ignores the full-precision (new) tokens"),
    Mutant("F2", FU, "top = torch.maximum(past.amax(-1), recent.amax(-1)).unsqueeze(-1)",
           "top = recent.amax(-1).unsqueeze(-1)", FUSED, "running max ignores the quantized past"),
    Mutant("F3", FU, "if memo is not None and memo[0] is attention_mask and memo[1] == key:",
           "if memo is not None and memo[1] == key:", FUSED, "kernel-mask memo keyed by sizes only (key too loose)"),
    Mutant("F4", FU, "key = (B, n, L, S, Tb, Tp, device)", "key = (B, n, L, Tp, device)", FUSED,
           "kernel-mask memo key drops the sink and body lengths"),
    Mutant("F5", FU, "pad = full.new_full((B, 1, n, Tp - Tb), torch.finfo(torch.float32).min)",
           "pad = full.new_zeros((B, 1, n, Tp - Tb))", FUSED, "unused buffer slots not masked (mask forgotten)"),
    Mutant("F6", FU, "mask = torch.cat([full[..., S : S + Tb], pad, full[..., :S], full[..., S + Tb :]], dim=-1)",
           "mask = torch.cat([full[..., :Tb], pad, full[..., Tb : Tb + S], full[..., S + Tb :]], dim=-1)", FUSED,
           "kernel mask columns taken in position order, not kernel order (sinks misplaced)"),
    Mutant("F7", FU, ".tril(length - queries)", ".tril(length - queries - 1)", FUSED,
           "causal mask among new tokens off by one (a token cannot see itself)"),
    Mutant("F8", FU, "return mask[..., -queries:, :length].expand(batch, 1, queries, length)",
           "return mask[..., :queries, :length].expand(batch, 1, queries, length)", FUSED,
           "additive mask takes the first query rows instead of the last"),
    Mutant("F9", FU, "recent = torch.tanh(recent / softcap) * softcap", "recent = recent", FUSED,
           "soft-capping forgotten on the full-precision tokens"),
    Mutant("F10", FU, "denom = _tsum(e_past, -1, chunk) + e_recent.sum(-1)", "denom = _tsum(e_past, -1, chunk)",
           FUSED, "softmax denominator omits the full-precision tokens"),
    Mutant("F11", FU, "torch.cat([p[..., Tp : Tp + S], p[..., :Tb], p[..., Tp + S :]], dim=-1)",
           "torch.cat([p[..., :Tb], p[..., Tp : Tp + S], p[..., Tp + S :]], dim=-1)", FUSED,
           "returned probabilities not put back in position order (sinks after the body)"),
    # ---------------------------------------------------------------- 2. chunked prefill bookkeeping
    Mutant("C1", CH, "plan.start(layout, retention, max_tokens, (q == 0).long() if finch is False else None)",
           "plan.start(layout, retention, max_tokens, None)", CHUNKED,
           "held-back last token not charged to the context budget"),
    Mutant("C2", CH, "(q == 0).long() if finch is False else None", "(q > 0).long() if finch is False else None",
           CHUNKED, "held-back token charged to the rows that have a question instead"),
    Mutant("C3", CH, "end = n if finch is None else (n - int(q[0]) if finch else n - 1)",
           "end = n if finch is None else (n - int(q[0]) if finch else n - 2)", CHUNKED,
           "prefill stops one token early (generate then processes two)"),
    Mutant("C4", LY, "return protected, valid & ~protected", "return protected, ~protected", CHUNKED,
           "padding slots become eviction candidates (mask forgotten)"),
    Mutant("C5", LY, "sink = positions < pad + layout.sinks.view(B, 1)", "sink = positions < layout.sinks.view(B, 1)",
           CHUNKED, "sinks counted from position 0, not after the padding"),
    Mutant("C6", LY, "question = (positions >= layout.length - layout.question_len.view(B, 1))",
           "question = (positions > layout.length - layout.question_len.view(B, 1))", CHUNKED,
           "question span off by one (its first token evictable)"),
    Mutant("C7", BA, "torch.ceil(ctx.double() * retention - 1e-9)", "torch.floor(ctx.double() * retention + 1e-9)",
           CHUNKED, "retention budget rounded down instead of up"),
    # ---------------------------------------------------------------- 3. adaptive budgets (AdaKV)
    Mutant("B1", BU, "floor = torch.ceil(budget.double() * self.floor - 1e-9).long()",
           "floor = (budget.double() * self.floor).long()", BUDGETS, "safeguard truncated instead of ceiled"),
    Mutant("B2", BU, "floor = torch.ceil(budget.double() * self.floor - 1e-9).long()",
           "floor = torch.ceil(budget.double() * self.floor).long()", BUDGETS,
           "safeguard ceiling without float-noise guard ((1 - 0.7) * 10 -> 4)"),
    Mutant("B3", BU, "floor = torch.ceil(budget.double() * self.floor - 1e-9).long()",
           "floor = torch.round(budget.double() * self.floor).long()", BUDGETS, "safeguard rounded to nearest"),
    Mutant("B4", BU, "(own_rank < floor) & cand", "(own_rank <= floor) & cand", BUDGETS,
           "safeguard one position too many per head"),
    Mutant("B5", BU, "across = _ranks(boosted.transpose(1, 2).reshape(B, n * H)).view(B, n, H).transpose(1, 2)",
           "across = _ranks(boosted.reshape(B, H * n)).view(B, H, n)", BUDGETS,
           "ties across heads go to the lower head first, not the earlier position"),
    Mutant("B6", BU, "return keep | protected.to(device).view(B, 1, n)", "return keep", BUDGETS,
           "protected positions (sinks, question) dropped"),
    Mutant("B7", BU, "keep = (across < H * budget.view(B, 1, 1)) & cand",
           "keep = (across < H * budget.view(B, 1, 1) - 1) & cand", BUDGETS, "layer budget off by one"),
    # ---------------------------------------------------------------- 4. row edits of ragged layers
    Mutant("R1", RA, "self._select_rows(torch.arange(self.counts.shape[0]).repeat_interleave(repeats))",
           "self._select_rows(torch.arange(self.counts.shape[0]).repeat(repeats))", RAGGED,
           "batch_repeat_interleave tiles the rows instead of interleaving"),
    Mutant("R2", RA, "if cached is not None and cached[0] is self.counts:", "if cached is not None:", RAGGED,
           "slot-index memo reused after the counts changed (memo key too loose)"),
    Mutant("R3", RA, "start = torch.cumsum(per_row, 0) - per_row\n        index",
           "start = torch.cumsum(per_row, 0) - per_row[0]\n        index", RAGGED,
           "row offsets of the flat store off (first row's size subtracted everywhere)"),
    Mutant("R4", RA, "            indices = indices.nonzero().flatten()\n        self._select_rows",
           "            indices = indices.long()\n        self._select_rows", RAGGED,
           "boolean row selection read as indices 0/1"),
    Mutant("R5", RA, "prompt = torch.arange(C, device=self.counts.device).view(1, 1, C) >= (C - self.counts)",
           "prompt = torch.arange(C, device=self.counts.device).view(1, 1, C) > (C - self.counts)", RAGGED,
           "valid-slot mask drops each head's oldest kept token (off by one)"),
    Mutant("R6", RA, "slot = self.width - counts[owner] + within", "slot = within", RAGGED,
           "ragged entries left-aligned while the slot mask is right-aligned"),
    Mutant("R7", RA, "if int(going.sum()) != B * H * from_prompt:", "if False:", RAGGED,
           "crop into evicted positions no longer refused (check dropped)"),
    Mutant("R8", LA, "self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))",
           "self._map_rows(lambda t: t.repeat(repeats, *[1] * (t.dim() - 1)))", ROWS,
           "dense compressed layers tile rows in batch_repeat_interleave"),
]
