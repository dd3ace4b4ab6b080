"""Train the embedded reference model on the key-value retrieval task.

Run: ``python -m kvcache_plugins.training.train_reference --out kvcache_plugins/assets/reference_model``
(``--device cuda`` to train on a GPU; everything is seeded, so a run is reproducible on the same device).

Model: a transformers-native Qwen2 (GQA, RoPE): 4 layers, hidden 128, 4 query heads and 2 KV heads of size 64
(wide heads match exact key identities among hundreds of distractors), MLP 384, tied embeddings, about 1.1 M
parameters. ``--size scout``: 2 layers, hidden 96, heads of 48, MLP 256 (the small model of the scout studies).

Data: every training sequence is one prompt of facts followed by several questions with their answers
(``... Q : K17 ? V402 </s> Q : K5 ? V9 </s> ...``); the loss covers the answer tokens only. At evaluation a
prompt holds one question, exactly what the first training question looks like.

Curriculum: associative recall is learned after a long plateau (the retrieval heads form late), and it forms
faster with few distractors. Prompt lengths ramp from 48 tokens to 2048 over the run, at a constant number of
tokens per step (many short sequences early, a few long ones late); multi-hop questions join once single-hop
retrieval works. Held-out exact match (a different seed) is logged as training goes and at the end at 512 and
2048 tokens; the best checkpoint by the 512-token score is saved.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from ..tasks.kv_retrieval import FACT_TOKENS, NUM_KEYS, NUM_VALUES, make_example, vocabulary
from .tokenizer import build_tokenizer

EVAL_SEED = 1_000_003


SIZES = {
    "reference": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, head_dim=64),
    "scout": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, head_dim=48),
}


def model_config(size: str = "reference") -> Qwen2Config:
    vocab = vocabulary()
    return Qwen2Config(
        vocab_size=len(vocab),
        **SIZES[size],
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=vocab.index("<s>"),
        eos_token_id=vocab.index("</s>"),
        pad_token_id=vocab.index("<pad>"),
    )


class Encoder:
    """Word-level ids without going through the tokenizer (the same vocabulary, faster)."""

    def __init__(self) -> None:
        self.ids = {w: i for i, w in enumerate(vocabulary())}

    def __call__(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]


def training_sequence(rng: random.Random, enc: Encoder, length: int, questions: int, multi_hop: float):
    """Token ids of one prompt with ``questions`` question/answer pairs, and a 0/1 loss mask over them.

    With ``multi_hop > 0`` some facts become links (``K5 : K133 ;``) to value-holding facts; link sources and
    targets are disjoint, so every chain has exactly two hops. Each question is two-hop with probability
    ``multi_hop`` (about a link source), else single-hop (about a value-holding fact).
    """
    prompt_len = length - questions * 8
    ex = make_example(rng, max(prompt_len, 16), hops=1)
    words = ex.prompt.split()[1:-4]
    facts = [[words[i], words[i + 2]] for i in range(0, len(words), FACT_TOKENS)]
    links: list[int] = []
    if multi_hop > 0 and len(facts) >= 4:
        order = rng.sample(range(len(facts)), len(facts))
        half = len(order) // 2
        for a, b in zip(order[: max(1, len(facts) // 8)], order[half:]):
            facts[a][1] = facts[b][0]
            links.append(a)
    values = [i for i in range(len(facts)) if facts[i][1].startswith("V")]
    lookup = {k: v for k, v in facts}
    ids = enc("<s> " + " ".join(f"{k} : {v} ;" for k, v in facts))
    mask = [0] * len(ids)
    for _ in range(questions):
        if links and rng.random() < multi_hop:
            key = facts[rng.choice(links)][0]
            q, ans = f"Q2 : {key} ?", f"{lookup[key]} {lookup[lookup[key]]} </s>"
        else:
            key = facts[rng.choice(values)][0]
            q, ans = f"Q : {key} ?", f"{lookup[key]} </s>"
        q_ids, a_ids = enc(q), enc(ans)
        ids += q_ids + a_ids
        mask += [0] * len(q_ids) + [1] * len(a_ids)
    return ids, mask


def batch(rng, enc, length, size, questions, multi_hop, device):
    seqs = [training_sequence(rng, enc, length, questions, multi_hop) for _ in range(size)]
    n = max(len(s) for s, _ in seqs)
    ids = torch.zeros(size, n, dtype=torch.long)
    mask = torch.zeros(size, n, dtype=torch.bool)
    for i, (s, m) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def exact_match(model, enc: Encoder, tokens: int, count: int, hops: int, seed: int, device, batch_size: int = 16) -> float:
    """Greedy exact match on held-out prompts, scored teacher-forced: every answer token must be the argmax."""
    rng = random.Random(seed + 7919 * tokens + hops)
    examples = [make_example(rng, tokens, hops) for _ in range(count)]
    correct = 0
    model.eval()
    for start in range(0, count, batch_size):
        chunk = examples[start : start + batch_size]
        seqs = [enc(e.prompt) + enc(e.answer) for e in chunk]
        ids = torch.tensor(seqs, device=device)
        logits = model(ids).logits
        for row, e in enumerate(chunk):
            p = len(enc(e.prompt))
            a = len(enc(e.answer))
            pred = logits[row, p - 1 : p - 1 + a].argmax(-1)
            correct += int(torch.equal(pred, ids[row, p : p + a]))
    model.train()
    return correct / count


def length_at(step: int, steps: int, lo: int = 48, hi: int = 2048) -> int:
    """Longest prompt length of a step: a geometric ramp from ``lo`` to ``hi`` over the first 80% of the run.
    Every other step trains at that length, the others at a uniform shorter length, so short prompts stay solved."""
    ramp = min(1.0, step / (0.8 * steps))
    return int(lo * (hi / lo) ** ramp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="reference", help="model size (scout: the small one)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--tokens-per-step", type=int, default=12288)
    parser.add_argument("--questions", type=int, default=8, help="questions per sequence (at least; ~1 per 64 tokens)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early (and save) after this long")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    enc = Encoder()
    model = Qwen2ForCausalLM(model_config(args.size)).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))

    args.out.mkdir(parents=True, exist_ok=True)
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "history": []}
    best = -1.0
    start = time.time()
    multi_hop_from = int(0.35 * args.steps)
    for step in range(args.steps):
        top = length_at(step, args.steps)
        length = top if (step % 2 == 0 or top <= 128) else rng.randint(48, top)
        size = max(1, args.tokens_per_step // length)
        multi_hop = 0.3 if step >= multi_hop_from else 0.0
        questions = max(args.questions, length // 64)
        ids, mask = batch(rng, enc, length, size, questions, multi_hop, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(ids[:, :-1]).logits
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = (time.time() - start) / 60
        last = step == args.steps - 1 or (args.max_minutes is not None and elapsed > args.max_minutes)
        if step % 50 == 0:
            print(f"step {step:5d} len {length:5d} batch {size:4d} loss {loss.item():.4f} lr {lr_at(step):.2e} "
                  f"{elapsed:.1f} min", flush=True)
        if (step + 1) % args.eval_every == 0 or last:
            em = {
                "step": step + 1,
                "minutes": round(elapsed, 1),
                "loss": round(loss.item(), 4),
                "train_len": top,
                "em_single_train_len": exact_match(model, enc, max(32, top), 64, 1, EVAL_SEED, device),
                "em_single_512": exact_match(model, enc, 512, 64, 1, EVAL_SEED, device),
                "em_multi_512": exact_match(model, enc, 512, 64, 2, EVAL_SEED, device),
            }
            log["history"].append(em)
            print(json.dumps(em), flush=True)
            score = em["em_single_512"] + em["em_multi_512"]
            if score >= best:
                best = score
                model.save_pretrained(args.out, safe_serialization=True)
        if last:
            break
    final = Qwen2ForCausalLM.from_pretrained(args.out).to(device)
    log["final"] = {
        f"em_{'single' if hops == 1 else 'multi'}_{tokens}": exact_match(final, enc, tokens, 200, hops, EVAL_SEED, device, 8)
        for tokens in (512, 2048)
        for hops in (1, 2)
    }
    log["minutes"] = round((time.time() - start) / 60, 1)
    log["task"] = {"num_keys": NUM_KEYS, "num_values": NUM_VALUES}
    print(json.dumps(log["final"]), flush=True)
    build_tokenizer().save_pretrained(args.out)
    final.generation_config.pad_token_id = final.config.pad_token_id
    final.generation_config.save_pretrained(args.out)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
