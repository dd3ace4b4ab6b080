"""The reference model's tokenizer: word-level over the task vocabulary, built with the `tokenizers` library."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from ..tasks.kv_retrieval import vocabulary


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` splitting on whitespace, one id per task word (``<unk>`` for anything else)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", model_max_length=4096,
    )
