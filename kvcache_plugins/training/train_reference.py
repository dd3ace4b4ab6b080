"""Train the embedded reference model (or, with ``--size scout``, the small scout) on key-value retrieval.

Run (the shipped models; seeded, so a run repeats on the same device and thread count; ``--device cuda`` for a GPU)::

    # scout: 2 layers, about 16 minutes on one CPU thread
    python -m kvcache_plugins.training.train_reference --out scout --size scout --seed 1 --threads 1
    # reference: a 2-layer model until it unlocks 32-token prompts (about 8 minutes), then grown to 4 layers
    python -m kvcache_plugins.training.train_reference --out stage1 --size scout --seed 0 --threads 1
    # (stopped by hand once it had unlocked 32-token prompts: the checkpoint saved at that advance is stage 1)
    python -m kvcache_plugins.training.train_reference --out stage2 --grow-from stage1 --seed 2 --start-length 32
    # then settle at 2048 tokens with a lower learning rate (500 steps, about 9 minutes): the shipped reference model
    python -m kvcache_plugins.training.train_reference --out reference --init stage2 --start-length 2048 \
        --lr 5e-4 --seed 5 --eval-every 250 --threads 1

Model: a transformers-native Qwen2 (GQA: 4 query heads, 2 KV heads of size 32; RoPE), hidden 64, MLP 128, tied
embeddings; 4 layers for the reference model, 2 for the scout. Both are a few hundred thousand parameters.

Data: every training sequence is a prompt of facts followed by questions with their answers
(``... Q : K17 V402 </s> Q2 : K5 K133 V9 </s> ...``), half of its tokens on questions; the loss covers the answer
tokens only. At evaluation a prompt holds one question, exactly what the first training question looks like. The
answer continues after the asked key as it continued after that key in its fact: the copying pattern (an induction
head) that small models learn first.

Curriculum: associative recall is learned only after a long loss plateau, while the heads that find and copy the
answer form; small steps (2048 tokens) get through it sooner than large ones, and two-layer models far sooner than
four-layer ones (which stayed on it for 30+ minutes here, hence ``--grow-from``). 20% of the sequences are a prompt
followed by a verbatim repeat of a run of its facts (every repeated token is predictable by copying what followed its
earlier occurrence: the same copying head). The run trains on questions, starting on short prompts (16 tokens) and
unlocking longer ones (x2 at a time, up to 2048) only when held-out exact match at the current length reaches 90%; multi-hop questions join once single-hop
works. Half the steps train at the longest unlocked length, half at a shorter one. The run stops when both kinds are
solved at 2048 tokens, or at ``--max-minutes``; ``training_log.json`` records the history and the final held-out
exact match at 512 and 2048 tokens (200 prompts each, a seed the training never saw).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from .._compat import no_hub_kernels
from ..tasks.kv_retrieval import FACT_TOKENS, NUM_KEYS, NUM_VALUES, QUESTION_TOKENS, make_example, vocabulary
from .tokenizer import build_tokenizer

EVAL_SEED = 1_000_003


SIZES = {
    "reference": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=32),
    "scout": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=32),
}


def model_config(size: str = "reference", layers: int | None = None) -> Qwen2Config:
    vocab = vocabulary()
    shape = dict(SIZES[size], **({"num_hidden_layers": layers} if layers else {}))
    return Qwen2Config(
        vocab_size=len(vocab),
        **shape,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=vocab.index("<s>"),
        eos_token_id=vocab.index("</s>"),
        pad_token_id=vocab.index("<pad>"),
    )


def grow(small: Qwen2ForCausalLM, config: Qwen2Config) -> Qwen2ForCausalLM:
    """A deeper model computing exactly ``small``'s function: ``small``'s layers first, then new layers whose output
    projections (attention ``o_proj``, MLP ``down_proj``) are zero, so they add nothing to the residual stream until
    training moves them. Deep models sit on the retrieval plateau far longer than two-layer ones; growing a trained
    two-layer model skips it."""
    big = Qwen2ForCausalLM(config)
    state = big.state_dict()
    state.update(small.state_dict())
    for i in range(small.config.num_hidden_layers, config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.o_proj.weight"].zero_()
        state[f"model.layers.{i}.mlp.down_proj.weight"].zero_()
    big.load_state_dict(state)
    return big


class Encoder:
    """Word-level ids without going through the tokenizer (the same vocabulary, faster)."""

    def __init__(self) -> None:
        self.ids = {w: i for i, w in enumerate(vocabulary())}

    def __call__(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]


def training_sequence(rng: random.Random, enc: Encoder, prompt_len: int, questions: int, multi_hop: float):
    """Token ids of a prompt of ``prompt_len`` tokens followed by ``questions`` question/answer pairs, and a 0/1
    loss mask over the answers.

    With ``multi_hop > 0`` some facts become links (``K5 : K133 ;``) to value-holding facts; link sources and
    targets are disjoint, so every chain has exactly two hops. Each question is two-hop with probability
    ``multi_hop`` (about a link source), else single-hop (about a value-holding fact).
    """
    ex = make_example(rng, max(prompt_len, 16), hops=1)
    words = ex.prompt.split()[1:-QUESTION_TOKENS]
    facts = [[words[i], words[i + 1]] for i in range(0, len(words), FACT_TOKENS)]
    links: list[int] = []
    if multi_hop > 0 and len(facts) >= 4:
        order = rng.sample(range(len(facts)), len(facts))
        half = len(order) // 2
        for a, b in zip(order[: 1 + len(facts) // 8], order[half:]):  # as many links as kv_retrieval's prompts
            facts[a][1] = facts[b][0]
            links.append(a)
    values = [i for i in range(len(facts)) if facts[i][1].startswith("V")]
    lookup = {k: v for k, v in facts}
    ids = enc("<s> " + " ".join(f"{k} {v} ;" for k, v in facts))
    mask = [0] * len(ids)
    for _ in range(questions):
        if links and rng.random() < multi_hop:
            key = facts[rng.choice(links)][0]
            q, ans = f"Q2 : {key}", f"{lookup[key]} {lookup[lookup[key]]} </s>"
        else:
            key = facts[rng.choice(values)][0]
            q, ans = f"Q : {key}", f"{lookup[key]} </s>"
        q_ids, a_ids = enc(q), enc(ans)
        ids += q_ids + a_ids
        mask += [0] * len(q_ids) + [1] * len(a_ids)
    return ids, mask


def repeat_sequence(rng: random.Random, enc: Encoder, prompt_len: int):
    """A prompt of facts followed by a verbatim repeat of a random run of its facts; the loss covers every repeated
    token after the first. Predicting them needs the content-based copying head the questions need (find the earlier
    occurrence of the current token, copy what followed it); it forms within a few hundred steps here, while the
    isolated questions alone take far longer to discover it."""
    ex = make_example(rng, max(prompt_len, 16), hops=1)
    words = ex.prompt.split()[: -QUESTION_TOKENS]
    facts = len(words) // FACT_TOKENS
    count = rng.randint(2, max(2, min(16, facts)))
    first = 1 + FACT_TOKENS * rng.randrange(max(1, facts - count + 1))
    repeat = words[first : first + FACT_TOKENS * count]
    ids = enc(" ".join(words + repeat))
    mask = [0] * (len(words) + 1) + [1] * (len(repeat) - 1)
    return ids, mask


def batch(rng, enc, prompt_len, size, questions, multi_hop, device, repeat_share: float = 0.0):
    seqs = [
        repeat_sequence(rng, enc, prompt_len) if rng.random() < repeat_share
        else training_sequence(rng, enc, prompt_len, questions, multi_hop)
        for _ in range(size)
    ]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="reference", help="model size (scout: the small one)")
    parser.add_argument("--layers", type=int, default=None, help="override the size's number of layers")
    parser.add_argument("--max-steps", type=int, default=60_000)
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--questions-per-token", type=float, default=1 / 6, help="questions per prompt token")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--start-length", type=int, default=16)
    parser.add_argument("--final-length", type=int, default=2048)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--advance-at", type=float, default=0.9, help="held-out exact match that unlocks longer prompts")
    parser.add_argument("--growth", type=float, default=2.0, help="factor by which each advance lengthens the prompts")
    parser.add_argument("--repeat-share", type=float, default=0.2, help="share of fact-repeat sequences")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    parser.add_argument("--grow-from", type=Path, default=None,
                        help="start from a trained shallower model, grown to this size (see grow())")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from a saved model (e.g. the last checkpoint of an interrupted run; pass the "
                             "length it had reached as --start-length)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    enc = Encoder()
    if args.init:
        model = Qwen2ForCausalLM.from_pretrained(args.init, **no_hub_kernels())
    elif args.grow_from:
        shallower = Qwen2ForCausalLM.from_pretrained(args.grow_from, **no_hub_kernels())
        model = grow(shallower, model_config(args.size, args.layers))
    else:
        model = Qwen2ForCausalLM(model_config(args.size, args.layers))
    model = model.to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    args.out.mkdir(parents=True, exist_ok=True)
    log: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "history": []}
    start = time.time()
    top = args.start_length  # longest prompt length unlocked so far
    multi_hop = 0.0
    solved_final = False
    for step in range(args.max_steps):
        # half the steps at the longest unlocked prompt length, half at a uniform shorter one: short prompts stay
        # solved. The questions after the prompt take about as many tokens again.
        length = top if step % 2 == 0 else rng.randint(min(48, top), top)
        questions = max(4, int(args.questions_per_token * length))
        size = max(1, args.tokens_per_step // (length + 6 * questions))
        ids, mask = batch(rng, enc, length, size, questions, multi_hop, device, args.repeat_share)
        lr = args.lr * min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr
        logits = model(ids[:, :-1]).logits
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = (time.time() - start) / 60
        if step % 100 == 0:
            print(f"step {step:6d} top {top:5d} len {length:5d} batch {size:4d} q {questions:3d} loss {loss.item():.4f} "
                  f"multi-hop {multi_hop:.1f} {elapsed:.1f} min", flush=True)
        out_of_time = args.max_minutes is not None and elapsed > args.max_minutes
        if (step + 1) % args.eval_every == 0 or out_of_time:
            em_single = exact_match(model, enc, top, 48, 1, EVAL_SEED + step, device)
            em_multi = exact_match(model, enc, top, 48, 2, EVAL_SEED + step, device) if multi_hop else 0.0
            entry = {"step": step + 1, "minutes": round(elapsed, 1), "loss": round(loss.item(), 4), "top": top,
                     "em_single": em_single, "em_multi": em_multi, "multi_hop": multi_hop}
            log["history"].append(entry)
            print(json.dumps(entry), flush=True)
            if em_single >= args.advance_at and not multi_hop:
                multi_hop = 0.3  # single-hop retrieval works: bring in the two-hop questions
            if em_single >= args.advance_at and (not multi_hop or em_multi >= args.advance_at - 0.1):
                if top >= args.final_length:
                    solved_final = em_single >= 0.95 and em_multi >= 0.9
                top = min(args.final_length, int(top * args.growth))
                model.save_pretrained(args.out, safe_serialization=True)
            if solved_final or out_of_time:
                break
    model.save_pretrained(args.out, safe_serialization=True)
    final = Qwen2ForCausalLM.from_pretrained(args.out, **no_hub_kernels()).to(device)
    log["final"] = {
        f"em_{'single' if hops == 1 else 'multi'}_{tokens}": exact_match(final, enc, tokens, 200, hops, EVAL_SEED, device, 8)
        for tokens in (512, 2048)
        for hops in (1, 2)
    }
    log["minutes"] = round((time.time() - start) / 60, 1)
    log["steps"] = step + 1
    log["task"] = {"num_keys": NUM_KEYS, "num_values": NUM_VALUES}
    print(json.dumps(log["final"]), flush=True)
    build_tokenizer().save_pretrained(args.out)
    build_tokenizer().save_pretrained(args.out / "tokenizer")  # for AutoTokenizer (see kvcache_plugins.reference)
    final.generation_config.pad_token_id = final.config.pad_token_id
    final.generation_config.save_pretrained(args.out)
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
