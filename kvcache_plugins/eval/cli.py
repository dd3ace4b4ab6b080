"""``kvcache-eval``: lm-eval's command line with ``cache=<spec>`` support, e.g.

    kvcache-eval --model hf --model_args pretrained=Qwen/Qwen2.5-7B-Instruct,cache=mixed_l0 \\
        --tasks kv_squad_v2 --include_path eval_tasks

Everything after the program name goes to lm-eval unchanged; the ``hf-kvcache`` model name works too.
"""

from __future__ import annotations


def main() -> int:
    from .lm_eval_model import install

    install()
    from lm_eval.__main__ import cli_evaluate

    result = cli_evaluate()
    return int(result or 0) if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
