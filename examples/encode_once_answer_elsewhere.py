"""Encode a document once, send the compressed cache, answer several questions in another process.

    python examples/encode_once_answer_elsewhere.py demo            # both halves, as two processes
    python examples/encode_once_answer_elsewhere.py encode --out doc.safetensors
    python examples/encode_once_answer_elsewhere.py answer --cache doc.safetensors

The "document" is a list of key-value facts from the embedded retrieval task (``Example.document``); the questions
ask for some of the values (``Example.ask``, the task's own question and answer for a fact). The encoder runs the embedded reference model over the document once and saves an int8 cache (or, with
``--cache snapkv``, a SnapKV selection of half the document, which is question-agnostic: its window sits at the end
of the document). The answering process never sees the document text: it loads the cache, and for each question
forks it and generates from placeholder tokens standing in for the cached part plus the question's tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kvcache_plugins import CompressedCache, MixedPrecisionCache, cache_kwargs, load_cache
from kvcache_plugins.reference import load_reference_model
from kvcache_plugins.tasks.kv_retrieval import make_example


def questions_about(tokens: int, count: int, seed: int) -> tuple[str, list[tuple[str, str]]]:
    """The document (facts only) and ``count`` (question, answer) pairs about facts drawn from it."""
    ex = make_example(random.Random(seed), tokens)
    if not 1 <= count <= len(ex.facts):
        raise ValueError(f"--questions must be between 1 and {len(ex.facts)} (the document's facts), got {count}")
    asked = random.Random(seed + 1).sample([key for key, _ in ex.facts], count)
    return ex.document, [ex.ask(key) for key in asked]


def encode(out: Path, cache_kind: str, tokens: int, questions: int, seed: int) -> dict:
    document, asked = questions_about(tokens, questions, seed)
    model, tok = load_reference_model()
    ids = tok(document, return_tensors="pt", add_special_tokens=False).input_ids
    if cache_kind == "int8":
        cache = MixedPrecisionCache(model, "int8")
    else:
        cache = CompressedCache(model, selector="snapkv", retention=0.5, question_len=0, window=64)
    with torch.inference_mode():
        model(ids, **cache_kwargs(model, cache))
    size = cache.save(out)
    fp16 = cache.memory_footprint().reference
    info = {
        "questions": [q for q, _ in asked],
        "answers": [a for _, a in asked],
        "cache_bytes": size,
        "fp16_bytes": fp16,
        "document_text_bytes": len(document.encode()),
        "document_tokens": ids.shape[1],
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    print(f"encoded {ids.shape[1]} tokens into {size:,} bytes ({cache_kind}); the fp16 cache would be {fp16:,} bytes, "
          f"the document text is {info['document_text_bytes']:,} bytes")
    return info


def answer(cache_path: Path) -> float:
    model, tok = load_reference_model()
    info = json.loads(cache_path.with_suffix(".json").read_text())
    cache = load_cache(cache_path, model)
    cached = cache.get_seq_length()
    correct = 0
    for question, expected in zip(info["questions"], info["answers"]):
        q_ids = tok(question, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([torch.full((1, cached), tok.pad_token_id), q_ids], dim=1)  # the cached part is not needed
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache.fork()), max_new_tokens=4,
            do_sample=False,
        )
        text = tok.decode(out[0, ids.shape[1] :])
        ok = text.split("</s>")[0].strip() + " </s>" == expected
        correct += ok
        print(f"{question:<14} -> {text:<18} {'correct' if ok else 'expected ' + expected}")
    accuracy = correct / len(info["questions"])
    print(f"answered {len(info['questions'])} questions from one encoded document: {accuracy:.0%} exact match")
    return accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("--out", type=Path, required=True)
    ans = sub.add_parser("answer")
    ans.add_argument("--cache", type=Path, required=True)
    demo = sub.add_parser("demo")
    for p in (enc, demo):
        p.add_argument("--cache-kind", choices=["int8", "snapkv"], default="int8")
        p.add_argument("--tokens", type=int, default=512)
        p.add_argument("--questions", type=int, default=5)
        p.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if args.command == "encode":
        encode(args.out, args.cache_kind, args.tokens, args.questions, args.seed)
    elif args.command == "answer":
        answer(args.cache)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "document.safetensors"
            common = [sys.executable, __file__]
            subprocess.run(common + ["encode", "--out", str(path), "--cache-kind", args.cache_kind, "--tokens",
                                     str(args.tokens), "--questions", str(args.questions), "--seed", str(args.seed)],
                           check=True)
            subprocess.run(common + ["answer", "--cache", str(path)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
