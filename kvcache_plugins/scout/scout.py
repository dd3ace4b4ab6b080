"""``Scout``: a small model reads the prompt and chooses the positions a large model keeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._compat import cache_kwargs
from ..caches.compressed import CompressedCache
from ..selection import Selector
from .selection import Selection, vocabulary_fingerprint


class Scout:
    """Run a (small) model's prefill with a selector and hand back a :class:`Selection`.

    Args:
        scout_model: the model that reads the prompt (sdpa or eager attention for query-aware selectors).
        tokenizer: its tokenizer; the selection records its vocabulary fingerprint, and a large model with another
            vocabulary refuses it (see :func:`~kvcache_plugins.scout.map_selection` for cross-tokenizer use).
        selector, retention, max_tokens, sink_tokens, **selector_options: as in
            :class:`~kvcache_plugins.CompressedCache`.
        granularity: ``"global"`` (default: one position set for every layer, transferable to any model) or
            ``"layer"`` (per layer; only a model with the same number of layers can use it).
    """

    def __init__(
        self,
        scout_model: Any,
        tokenizer: Any,
        selector: str | Selector = "q2c",
        retention: float | None = 0.5,
        *,
        max_tokens: int | None = None,
        granularity: str = "global",
        sink_tokens: int | None = None,
        **selector_options: Any,
    ) -> None:
        if granularity not in ("global", "layer"):
            raise ValueError(f"a scout hands over 'global' or 'layer' selections, got granularity={granularity!r}")
        self.model = scout_model
        self.fingerprint = vocabulary_fingerprint(tokenizer)
        self.options = dict(
            selector=selector, retention=retention, max_tokens=max_tokens, granularity=granularity,
            sink_tokens=sink_tokens, **selector_options,
        )
        # validates every option before any prompt is read
        CompressedCache(scout_model, question_len=1, **self.options)

    @torch.inference_mode()
    def select(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        question_len: int | Sequence[int] | torch.Tensor | None = None,
    ) -> Selection:
        """Prefill ``input_ids`` ``[B, n]`` (left-padded if ``attention_mask`` has zeros) and return what to keep."""
        cache = CompressedCache(self.model, question_len=question_len, **self.options)
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        self.model(input_ids, **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1, **kwargs)
        layout = cache.layout
        per_layer = []
        layers = cache.compressed_layers if self.options["granularity"] == "layer" else cache.compressed_layers[:1]
        for idx in layers:
            kept = cache.kept_positions(idx)[:, 0, :].cpu()
            rows = []
            for b in range(layout.batch):
                pad, sinks = int(layout.pad[b]), int(layout.sinks[b])
                end = int(layout.real_len[b] - layout.question_len[b])
                rel = [int(p) - pad for p in kept[b].tolist() if p >= 0]
                rows.append([p for p in rel if sinks <= p < end])
            per_layer.append(rows)
        return Selection(
            positions=per_layer[0],
            prompt_len=layout.real_len.tolist(),
            question_len=layout.question_len.tolist(),
            sinks=int(layout.sinks[0]),
            fingerprint=self.fingerprint,
            selector=cache.selector.name,
            layer_positions=per_layer if self.options["granularity"] == "layer" else None,
        )
