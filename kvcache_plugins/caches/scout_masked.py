"""``ScoutMaskedCache``: a large model keeps only the prompt positions a scout selected, computing its own K/V.

The selection travels as a few hundred bytes of positions (:class:`~kvcache_plugins.scout.Selection`), never as
tensors. Three ways to apply it:

* ``mode="post_hoc"`` (default): the large model prefills the whole prompt as usual, then drops the unselected
  positions right after each layer's attention (like ``CompressedCache``, with the scout's positions).
* ``mode="construction"``: unselected context positions are also hidden from every later prompt token during the
  large model's prefill (the lab's batch 8-9 method), then dropped. Kept tokens never see an unselected one.
* ``cache.sparse_prefill(model, input_ids, attention_mask)``: the large model runs only the kept prompt tokens
  (all but the last prompt token), at their original positions; ``generate`` then continues from the cache. It is
  ``construction`` without computing the unselected tokens at all: the kept tokens' states are the same (up to
  float rounding), prefill compute shrinks with the retention. Needs a global selection, and ``generate`` must be
  called with the same ``input_ids``/``attention_mask`` (no beam search or ``num_return_sequences``, which would
  re-expand a cache that already holds the prompt).

With ``generate(..., prefill_chunk_size=N)`` each chunk's unselected tokens are dropped right after its attention, so
the cache never holds more than the selection plus one chunk. In ``construction`` mode the chunks also hide the
unselected tokens from later tokens of their own chunk: the result equals the unchunked ``construction`` prefill
(every token sees the same keys). In ``post_hoc`` mode later chunks no longer see earlier unselected tokens, so it
lies between the two modes.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_row_counts
from .._compat import cache_kwargs
from ..persist.state import StateReader, register_cache
from ..quant.spec import DEFAULT_GROUP_SIZE, Spec
from ..scout.selection import MAX_SELECTION_BYTES, Selection, vocabulary_fingerprint
from ..selection import PromptLayout, ScoreContext, Selector, left_padding, per_row, select_slots
from ..selection.plan import GivenPositions
from .compressed import CompressedCache
from .compressed_state import lowrank_state, read_lowrank
from .warmup import require_unused, warm_up

MODES = ("post_hoc", "construction")


class _GivenPositions(Selector):
    name = "scout"
    needs_queries = False

    def score(self, ctx: ScoreContext) -> torch.Tensor:  # pragma: no cover - never called: positions are given
        raise RuntimeError("a ScoutMaskedCache applies its selection directly")


class ScoutPositions(GivenPositions):
    """A scout's :class:`Selection` as the positions a :class:`CompressedCache`'s plan keeps (``plan.given``)."""

    def __init__(self, selection: Selection, mode: str, compressed: list[int]) -> None:
        self.selection = selection
        self.hides = mode == "construction"
        self.layers = len(compressed)
        self.layout: PromptLayout | None = None
        self.row_of: list[int] = []

    def bind(self, layout: PromptLayout, row_of: list[int] | None = None) -> None:
        self.layout = layout
        if row_of is not None:
            self.row_of = row_of

    def check_prompt(self, n: int, pad: torch.Tensor, rows: torch.Tensor | None) -> None:
        # which selection row serves each batch row: the same count, or generate()'s repeats of each prompt
        row_of = per_row(list(range(self.selection.rows)), pad.shape[0], "the selection", rows).tolist()
        expected = torch.tensor(self.selection.prompt_len)[torch.tensor(row_of)]
        real = n - pad.cpu().long()
        wrong = (real != expected).nonzero()
        if wrong.numel():
            b = int(wrong[0])
            raise ValueError(
                f"row {b}: the selection was made for a prompt of {int(expected[b])} tokens, this prompt has "
                f"{int(real[b])} (assisted generation and prompt lookup hand the first forward the prompt "
                "plus candidate tokens: they cannot be used with a ScoutMaskedCache)"
            )
        self.row_of = row_of

    def positions(self, layer_number: int, device: torch.device) -> torch.Tensor:
        """``LongTensor [B, 1, S]``: absolute kept positions per row, right-aligned, ``-1`` for unused slots."""
        number = layer_number if self.selection.per_layer else 0
        layout = self.layout
        kept = [int(layout.pad[b]) + self.selection.kept_index(r, number) for b, r in enumerate(self.row_of)]
        S = max(len(k) for k in kept)
        keep = torch.full((layout.batch, 1, S), -1, dtype=torch.long)
        for b, k in enumerate(kept):
            if len(k):
                keep[b, 0, S - len(k) :] = k
        return keep.to(device)

    def selected(self, layer_number: int, pos: torch.Tensor) -> torch.Tensor:
        """``Bool [B, T]``: whether each slot position ``pos`` ``[B, T]`` (``-1`` unused) is in the selection."""
        keep = self.positions(layer_number, pos.device)[:, 0, :]
        member = torch.zeros(pos.shape[0], self.layout.length + 1, dtype=torch.bool, device=pos.device)
        member.scatter_(1, keep.clamp(min=0), keep >= 0)
        return member.gather(1, pos.clamp(min=0)) & (pos >= 0)

    def keep(self, layer_number: int, positions: torch.Tensor, seen: int, chunked: bool) -> torch.Tensor:
        if not chunked:  # the prompt itself: slot j holds position j
            return self.positions(layer_number, positions.device)
        selected = self.selected(layer_number, positions)
        budget = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
        keep = select_slots(positions.float().unsqueeze(1), torch.zeros_like(selected), selected, budget)
        # every layer must hold the same number of slots (the model builds one mask for all): per-layer selections
        # keep different counts, so each is left-padded with unused slots to the largest count of any layer
        most = 0
        for number in range(self.layers if self.selection.per_layer else 1):
            kept = self.positions(number, positions.device)
            most = max(most, int(((kept >= 0) & (kept < seen)).sum(-1).max()))
        if most > keep.shape[-1]:
            keep = torch.cat([keep.new_full((keep.shape[0], 1, most - keep.shape[-1]), -1), keep], dim=-1)
        return keep

    def construction_mask(self, layer_number, mask, query, key, held, seen, chunked):
        if chunked:  # inside a chunk: a query sees the selected held keys at or before it, and itself
            c = query.shape[2]
            pos = torch.arange(c, device=key.device).expand(query.shape[0], c) if held is None else held
            qpos = torch.arange(seen - c, seen, device=key.device).view(1, 1, c, 1)
            slot = pos.view(pos.shape[0], 1, 1, -1)
            allowed = (self.selected(layer_number, pos).view(slot.shape) & (slot <= qpos)) | (slot == qpos)
        elif held is None:  # the prompt: unselected context positions hidden from every later prompt token
            n = key.shape[2]
            keep = self.positions(layer_number, key.device)[:, 0, :]
            visible = torch.zeros(self.layout.batch, n, dtype=torch.bool, device=key.device)
            visible.scatter_(1, keep.clamp(min=0), keep >= 0)
            own = torch.eye(n, dtype=torch.bool, device=key.device).view(1, 1, n, n)
            real = self.layout.real_mask(key.device).view(-1, 1, 1, n)
            causal = torch.ones(n, n, dtype=torch.bool, device=key.device).tril().view(1, 1, n, n)
            allowed = causal & real & (visible.view(-1, 1, 1, n) | own)
        else:
            return mask
        if mask is None:
            return allowed
        if mask.dtype == torch.bool:
            return mask & allowed
        return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


@register_cache("ScoutMaskedCache")
class ScoutMaskedCache(CompressedCache):
    """A ``DynamicCache`` for the large model that keeps the positions of a scout's :class:`Selection`.

    Args:
        selection: what the scout kept (or ``Selection.from_bytes(...)`` of what it sent).
        model: the large model (needed for padded batches and for ``construction``); or pass ``config``.
        tokenizer: the large model's tokenizer: its vocabulary must be the scout's, else positions mean nothing.
        question_len: optional check: the question span(s) of the prompts this cache will serve.
        mode: ``"post_hoc"`` or ``"construction"`` (see the module docstring).
        quant, group_size, scale_dtype: store kept and new tokens quantized, as in ``CompressedCache``.
        lowrank, lowrank_keys: store the kept tokens as rank-``r`` SVD factors, as in ``CompressedCache``.
        fused: quantized kept tokens decode straight from the packed codes, as in ``CompressedCache`` (``False``:
            the reference path, dequantize then attend).
    """

    def __init__(
        self,
        selection: Selection,
        model: Any = None,
        *,
        tokenizer: Any,
        mode: str = "post_hoc",
        question_len: Any = None,
        quant: Spec | None = None,
        group_size: int = DEFAULT_GROUP_SIZE,
        scale_dtype: torch.dtype | None = None,
        lowrank: Any = None,
        lowrank_keys: str = "pre_rope",
        config: Any = None,
        fused: bool = True,
    ) -> None:
        if not isinstance(selection, Selection):
            raise TypeError(f"expected a Selection, got {type(selection).__name__} (use Selection.from_bytes for bytes)")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {MODES} (or call sparse_prefill)")
        if mode == "construction" and model is None:
            raise ValueError("construction mode masks the large model's prefill: it needs the model")
        if question_len is not None:
            given = per_row(check_row_counts("question_len", question_len), selection.rows, "question_len").tolist()
            if given != list(selection.question_len):
                raise ValueError(
                    f"question_len {given} differs from the question span the selection was made for "
                    f"{selection.question_len}"
                )
        if vocabulary_fingerprint(tokenizer) != selection.fingerprint:
            raise ValueError(
                "the selection was made with another tokenizer vocabulary: positions do not carry over one to one. "
                "Map it with kvcache_plugins.scout.map_selection(...) first"
            )
        super().__init__(
            model, selector=_GivenPositions(), retention=1.0, question_len=selection.question_len,
            sink_tokens=selection.sinks, granularity="layer" if selection.per_layer else "global", quant=quant,
            group_size=group_size, scale_dtype=scale_dtype, lowrank=lowrank, lowrank_keys=lowrank_keys,
            config=config, fused=fused,
        )
        if selection.per_layer and selection.num_layers != len(self.compressed_layers):
            raise ValueError(
                f"the selection holds {selection.num_layers} layers but this model has {len(self.compressed_layers)} "
                "compressible layers; use a global selection to transfer between models of different depth"
            )
        self.selection = selection
        self.mode = mode
        self.plan.given = ScoutPositions(selection, mode, self.compressed_layers)

    def warmup(self, model: Any, batch_size: int = 1) -> float:
        """Compile the fused decode kernels before the first ``generate`` (see :meth:`CompressedCache.warmup`). This
        cache's selection belongs to one prompt, so the warm-up runs a :class:`CompressedCache` with the same storage
        specs: the compiled kernels are shared by every cache of the process."""
        require_unused(self)
        layer = self.layers[self.compressed_layers[0]]
        twin = CompressedCache(
            model, selector="knorm", retention=0.5, question_len=1, quant=self.layer_specs,
            scale_dtype=layer.scale_dtype, fused=self.fused,
        )
        return warm_up(twin, model, batch_size)

    # -------------------------------------------------------------- state
    def state_args(self) -> dict[str, Any]:
        return {"selection": self.selection.to_bytes().hex(), "mode": self.mode, **lowrank_state(self)}

    @classmethod
    def from_state_args(cls, a: StateReader, model: Any, specs: list, tokenizer: Any) -> ScoutMaskedCache:
        a.fields(["selection", "mode"], ["lowrank", "lowrank_keys"])
        text = a.str("selection")
        a.require(len(text) <= 2 * MAX_SELECTION_BYTES, "the selection is larger than any selection this library writes")
        try:
            data = bytes.fromhex(text)
        except ValueError:
            raise a.error("selection must be hexadecimal bytes") from None
        selection = Selection.from_bytes(data)
        if tokenizer is None:
            raise ValueError("loading a ScoutMaskedCache needs the model's tokenizer (tokenizer=...) to check its vocabulary")
        mode = a.str("mode", MODES)
        lowrank = read_lowrank(a, model)
        try:
            return cls(selection, model, tokenizer=tokenizer, mode=mode, quant=specs, **lowrank)
        except TypeError as err:
            raise a.error(f"arguments rejected: {err}") from None

    def finish_state(self, state: StateReader) -> None:
        super().finish_state(state)
        if self.layout is not None:
            B, rows = self.layout.batch, self.selection.rows
            state.require(B % rows == 0, f"{B} rows cannot come from a selection of {rows}")
            row_of = [b // (B // rows) for b in range(B)]
            self.plan.given.bind(self.layout, row_of)
            expected = [self.selection.prompt_len[r] for r in row_of]
            state.require(
                self.layout.real_len.tolist() == expected, f"prompt lengths {self.layout.real_len.tolist()} differ from "
                f"the selection's {expected}",
            )

    # --------------------------------------------------------------- sparse path
    @torch.inference_mode()
    def sparse_prefill(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Run only the kept prompt tokens (all but the last prompt token) through ``model`` at their positions.

        Afterwards ``model.generate(input_ids, attention_mask=attention_mask, cache=cache)`` (``past_key_values=``
        before transformers 5.24) processes the last prompt token and continues. See the module docstring for how
        this differs from the other modes.
        """
        if self.selection.per_layer:
            raise ValueError("sparse_prefill runs one token set through every layer: it needs a global selection")
        if self.get_seq_length() > 0:
            raise ValueError("sparse_prefill fills an empty cache")
        B, n = input_ids.shape
        pad = left_padding(attention_mask, B, n)
        self.layout = self._layout_for(B, n, pad, input_ids)
        keep = self.plan.given.positions(0, torch.device("cpu"))[:, 0, :]
        keep = keep.masked_fill(keep == n - 1, -1)  # the last prompt token goes through generate()
        keep = torch.stack([torch.cat([row[row < 0], row[row >= 0]]) for row in keep])  # re-right-align
        keep = keep[:, (keep >= 0).any(0).nonzero().min() :] if bool((keep >= 0).any()) else keep
        S = keep.shape[1]
        valid = keep >= 0
        ids = torch.where(valid, input_ids.cpu().gather(1, keep.clamp(min=0)), torch.zeros_like(keep))
        positions = torch.where(valid, keep - pad.view(B, 1), torch.zeros_like(keep))
        self.adopt_positions(keep.view(B, 1, S), n - 1)
        try:
            model(
                ids.to(input_ids.device), attention_mask=valid.long().to(input_ids.device),
                position_ids=positions.to(input_ids.device), **cache_kwargs(model, self), use_cache=True, logits_to_keep=1,
            )
        finally:
            self.adopt_positions(None)
