"""Attention straight from packed codes: the decode hot path of the quantized caches.

A decode step of a quantized layer attends a few queries to ``[stored past, new tokens]`` where most of the past is
a :class:`~kvcache_plugins.quant.groupwise.QuantizedTensor` (packed codes plus per-group scale and zero) and the rest
(sink tokens, the full-precision residual, the new tokens) is at model precision. The reference path dequantizes the
whole past into a dense ``[B, H, T, D]`` buffer and calls sdpa. This module instead computes, for every query ``q``
(already scaled and grouped by KV head, GQA) and stored token ``t``::

    s_t   = scaling * sum_d q_d (c_td * scale_t,g(d) + zero_t,g(d))        (+ the same over full-precision tokens)
    s_t   = softcap * tanh(s_t / softcap)                                  (when the model soft-caps)
    p     = softmax(s + mask)
    out_d = sum_t p_t (c_td * scale + zero)  +  sum_f p_f v_fd

as plain PyTorch that inductor compiles (C++ on CPU, Triton on CUDA) into loop nests that unpack each code byte,
scale it and consume it at once: the past is never written out in full precision.

The planar packing (:mod:`kvcache_plugins.quant.packing`) makes the unpacking a broadcast: shifting a segment's
bytes by ``bits * p`` gives plane ``p``, i.e. columns ``[p m, (p+1) m)`` of that segment, in natural order.

Shapes are dynamic (``torch.compile(dynamic=True)``): a growing cache, another batch size or another number of new
tokens reuse the same compiled code (sizes 0 and 1 are specialised by the compiler: batch 1 vs larger and one query
vs several compile once each).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from .. import compiler
from ..compiler import Kernel, call_kernel, compile_seconds, compiler_broken  # noqa: F401 - re-exported
from ..quant.packing import codes_per_unit

logger = logging.getLogger(__name__)

#: decode steps with at most this many new tokens run fused; longer steps (prefill, long follow-up turns) take the
#: reference path, where one dense matmul beats re-reading the codes for every query.
FUSED_MAX_QUERIES = 16


@dataclass(frozen=True)
class Layout:
    """How one stored tensor (keys or values of one layer) is quantized: the static part of a kernel's key."""

    bits: int
    group_size: int
    axis: str
    head_dim: int

    @property
    def unit(self) -> int:
        return codes_per_unit(self.bits)


def chunk_tokens(lay: Layout) -> int:
    """Token granule ``C`` of the kernels' inputs: the quantized past is passed padded to a multiple of ``C`` tokens
    (and at least ``2 C``), its padding masked. Sums over tokens then run as ``[T / C, C]`` (``C`` static), which keeps
    the compiled code independent of the length: inductor specialises a single float sum on "longer than 4096"
    (it switches to cascade summation there), so a plain sum over a growing cache would recompile mid-generation."""
    return 128 if lay.axis == "token" or 128 % lay.group_size == 0 else lay.group_size * -(-128 // lay.group_size)


def _tsum(x: torch.Tensor, dim: int, chunk: int) -> torch.Tensor:
    """Sum over the token dimension ``dim`` (a multiple of ``chunk`` long) in two static-size steps."""
    dim = dim % x.dim()
    return x.unflatten(dim, (-1, chunk)).sum(dim + 1).sum(dim)


def _values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Dequantized ``codes * scale + zero`` as fp32 ``[B, H, T, S, k, m]``: ``S`` packed segments of ``k`` planes of
    ``m`` columns, i.e. head_dim in natural order (column ``(s k + p) m + j``). Lazy: inductor unpacks inside the loop
    that consumes the values and never writes them out. Keeping the planes as a dimension of their own lets that loop
    run over ``m`` contiguous bytes with one constant shift, which vectorises.
    """
    B, H, T, _ = codes.shape
    D, k, bits = lay.head_dim, lay.unit, lay.bits
    segment = lay.group_size if lay.axis == "token" else D
    S, m = D // segment, segment // k
    if bits == 8:
        c = codes.view(B, H, T, S, 1, m)
    elif bits == 3:
        b = codes.view(B, H, T, S, 3, m).to(torch.int32)
        units = (b[..., 0, :] | (b[..., 1, :] << 8) | (b[..., 2, :] << 16)).unsqueeze(-2)  # [B, H, T, S, 1, m]
        shifts = (torch.arange(k, device=codes.device, dtype=torch.int32) * 3).view(k, 1)
        c = (units >> shifts) & 7
    else:
        shifts = (torch.arange(k, device=codes.device, dtype=torch.uint8) * bits).view(k, 1)
        c = (codes.view(B, H, T, S, 1, m) >> shifts) & ((1 << bits) - 1)
    c = c.float()
    if lay.axis == "token":  # scale/zero [B, H, T, S]
        return c * scale.float()[..., None, None] + zero.float()[..., None, None]
    g = lay.group_size  # scale/zero [B, H, T/g, D]
    s = scale.float().view(B, H, T // g, 1, 1, k, m)
    z = zero.float().view(B, H, T // g, 1, 1, k, m)
    return (c.view(B, H, T // g, g, 1, k, m) * s + z).view(B, H, T, 1, k, m)


def _attend(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    fp_keys: torch.Tensor,
    fp_values: torch.Tensor,
    mask: torch.Tensor,
    *,
    k_layout: Layout,
    v_layout: Layout,
    scaling: float,
    softcap: float | None,
    weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fused attention (module docstring). ``q [B, Hq, n, D]``; quantized past ``[B, H, Tp, *]`` (``Tp`` a multiple
    of :func:`chunk_tokens`, padding masked); full-precision tokens ``fp_keys/fp_values [B, H, F, D]``; additive
    ``mask [B, 1, n, Tp + F]`` over ``[past | fp tokens]``.

    Returns the output ``[B, n, Hq, D]`` (the layout transformers' attention functions return) in ``q``'s dtype
    and, when ``weights``, the probabilities ``[B, Hq, n, Tp + F]`` (fp32).
    """
    B, Hq, n, D = q.shape
    H = k_codes.shape[1]
    R = Hq // H
    Tp = k_codes.shape[2]
    chunk = max(chunk_tokens(k_layout), chunk_tokens(v_layout))
    qf = q.float().reshape(B, H, R * n, D)
    keys = _values(k_codes, k_scale, k_zero, k_layout)  # [B, H, Tp, S, k, m]
    past = (qf.view(B, H, R * n, 1, *keys.shape[3:]) * keys.unsqueeze(2)).sum((-1, -2, -3)) * scaling
    recent = torch.matmul(qf, fp_keys.float().transpose(-1, -2)) * scaling  # [B, H, R n, F]
    if softcap is not None:
        past = torch.tanh(past / softcap) * softcap
        recent = torch.tanh(recent / softcap) * softcap
    mask = mask.float().unsqueeze(2)  # [B, 1, 1, n, Tp + F]
    past = past.view(B, H, R, n, Tp) + mask[..., :Tp]
    recent = recent.view(B, H, R, n, -1) + mask[..., Tp:]
    top = torch.maximum(past.amax(-1), recent.amax(-1)).unsqueeze(-1)
    e_past, e_recent = torch.exp(past - top), torch.exp(recent - top)
    denom = _tsum(e_past, -1, chunk) + e_recent.sum(-1)
    p_past = (e_past / denom.unsqueeze(-1)).view(B, H, R * n, Tp)
    p_recent = (e_recent / denom.unsqueeze(-1)).view(B, H, R * n, -1)
    values = _values(v_codes, v_scale, v_zero, v_layout)  # [B, H, Tp, S, k, m]
    mixed = _tsum(p_past.view(B, H, R * n, Tp, 1, 1, 1) * values.unsqueeze(2), 3, chunk)  # [B, H, R n, S, k, m]
    out = mixed.reshape(B, H, R * n, D) + torch.matmul(p_recent, fp_values.float())
    out = out.view(B, Hq, n, D).transpose(1, 2).to(q.dtype).contiguous()
    if not weights:
        return out, None
    return out, torch.cat([p_past, p_recent], dim=-1).view(B, Hq, n, -1)


@functools.cache
def _kernel(
    k_layout: Layout, v_layout: Layout, scaling: float, softcap: float | None, weights: bool, shapes: tuple = ()
) -> Kernel:
    """One kernel (one code object, so one set of dynamo entries) per static arguments and per model shape
    (``shapes``: heads, query heads, dtype, device), so that models of other shapes never count against each
    other's recompile limit."""
    statics = dict(k_layout=k_layout, v_layout=v_layout, scaling=scaling, softcap=softcap, weights=weights)
    # token counts and the batch are dynamic: a growing cache and another batch reuse the compiled code
    dynamic = [(i, d) for i in range(10) for d in (0, -2)] + [(9, 3)]
    return Kernel(_attend, "_attend", statics, dynamic)


def fused_attention(
    query: torch.Tensor,
    key_past,
    value_past,
    fp_keys: torch.Tensor,
    fp_values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    weights: bool = False,
    compiled: bool | None = None,
    path: str | None = None,
    valid: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Attention of ``query [B, Hq, n, D]`` over quantized ``key_past``/``value_past`` (:class:`QuantizedTensor`
    ``[B, H, Tb, D]``) followed by the full-precision ``fp_keys``/``fp_values`` ``[B, H, F, D]``, with the additive
    ``mask [B, 1, n, Tb + F]`` in that column order.

    Returns ``(output [B, n, Hq, D], probabilities [B, Hq, n, Tb + F] or None)``, or ``None`` when the path cannot
    run here (after one warning; callers then take the reference path). ``path`` picks the implementation:
    ``"cpp"`` (:mod:`~kvcache_plugins.attention.cpu_kernel`; it skips the past tokens from ``valid`` on, which the
    mask must hide), ``"eager"`` (the compiled math run eagerly: slow; for tests and debugging), or ``"compiled"``
    / ``None``: compiled as ``compiled`` says (``None`` follows :data:`kvcache_plugins.compiler.COMPILE`).
    """
    k_layout = Layout(key_past.bits, key_past.group_size, key_past.axis, key_past.head_dim)
    v_layout = Layout(value_past.bits, value_past.group_size, value_past.axis, value_past.head_dim)
    args = (
        query, key_past.codes, key_past.scale, key_past.zero, value_past.codes, value_past.scale, value_past.zero,
        fp_keys, fp_values, mask,
    )
    statics = (k_layout, v_layout, float(scaling), None if softcap is None else float(softcap), bool(weights))
    if path == "cpp":
        return _cpp(args, k_layout, v_layout, statics, key_past.num_tokens if valid is None else valid)
    if path == "eager":
        compiled = False
    if not (compiler.COMPILE if compiled is None else compiled):
        return _attend(*args, k_layout=k_layout, v_layout=v_layout, scaling=statics[2], softcap=statics[3],
                       weights=statics[4])
    shapes = (key_past.codes.shape[1], query.shape[1], query.dtype, query.device.type)
    variant = ("attend", *statics, *shapes, query.shape[0] == 1, query.shape[2] == 1)
    return call_kernel(_kernel(*statics, shapes), args, variant)


def _cpp(args: tuple, k_layout: Layout, v_layout: Layout, statics: tuple, valid: int):
    """The step through the C++ kernel (``None`` after its one warning when it cannot be built here)."""
    from . import cpu_kernel

    op = cpu_kernel.load()
    if op is None:
        return None
    axis = {"token": 0, "channel": 1}
    scaling, softcap, weights = statics[2:]
    out, probs = op(
        *args, k_layout.bits, k_layout.group_size, axis[k_layout.axis], v_layout.bits, v_layout.group_size,
        axis[v_layout.axis], valid, scaling, 0.0 if softcap is None else softcap, weights,
    )
    return out, (probs if weights else None)


def additive_mask(
    attention_mask: torch.Tensor | None, batch: int, queries: int, length: int, device: torch.device
) -> torch.Tensor:
    """fp32 ``[B, 1, n, L]`` additive mask from what transformers hands an attention function: ``None`` (no padding:
    causal among the ``n`` new tokens, each sees the whole past), a boolean mask (``True`` = attend) or an additive
    float mask. Masked entries become the most negative fp32 value."""
    low = torch.finfo(torch.float32).min
    if attention_mask is None and queries == 1:
        return torch.zeros(batch, 1, 1, length, device=device)
    if attention_mask is None:
        allowed = torch.ones(queries, length, dtype=torch.bool, device=device).tril(length - queries)
        mask = torch.zeros(queries, length, device=device).masked_fill_(~allowed, low).view(1, 1, queries, length)
    elif attention_mask.dtype == torch.bool:
        mask = torch.zeros(attention_mask.shape, device=device).masked_fill_(~attention_mask, low)
    else:
        mask = attention_mask.float().clamp(min=low)
    return mask[..., -queries:, :length].expand(batch, 1, queries, length)


#: the last kernel mask made, with the attention mask it came from: the layers of one forward pass share the
#: model's mask object (held here, so ``is`` cannot match a new object at a recycled address) and, with equal
#: sizes, the same kernel mask
_mask_memo: list[tuple | None] = [None]


def _kernel_mask(
    attention_mask: torch.Tensor | None, B: int, n: int, L: int, S: int, Tb: int, Tp: int, device: torch.device
) -> torch.Tensor:
    """fp32 ``[B, 1, n, Tp + F]`` additive mask in the kernel's column order ``[body buffer | sinks, residual,
    new]`` from the model's mask over the step's ``L`` tokens in position order ``[sinks | body | residual, new]``;
    the ``Tp - Tb`` unused buffer slots are masked."""
    key = (B, n, L, S, Tb, Tp, device)
    memo = _mask_memo[0]
    if memo is not None and memo[0] is attention_mask and memo[1] == key:
        return memo[2]
    full = additive_mask(attention_mask, B, n, L, device)
    pad = full.new_full((B, 1, n, Tp - Tb), torch.finfo(torch.float32).min)
    mask = torch.cat([full[..., S : S + Tb], pad, full[..., :S], full[..., S + Tb :]], dim=-1)
    _mask_memo[0] = (attention_mask, key, mask)
    return mask


@dataclass
class FusedStep:
    """What one decode step of one quantized layer attends to, captured before the new tokens are stored.

    Token positions run ``[sink | quantized body | residual | new]``. The body tensors are whole buffers of a
    multiple of :func:`chunk_tokens` tokens; their first ``body_len`` tokens are real, the rest is masked.
    """

    key_body: object  # QuantizedTensor [B, H, Tp, *]
    value_body: object
    body_len: int
    sink: tuple[torch.Tensor, torch.Tensor] | None  # [B, H, S, D] keys, values
    residual: tuple[torch.Tensor, torch.Tensor] | None
    new: tuple[torch.Tensor, torch.Tensor]

    def _fp(self, i: int) -> list[torch.Tensor]:
        return [part[i] for part in (self.sink, self.residual, self.new) if part is not None]

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference inputs: ``[B, H, L, D]`` keys and values in position order, the past dequantized."""
        dtype = self.new[0].dtype
        out = []
        for i, body in enumerate((self.key_body, self.value_body)):
            parts = self._fp(i)
            mid = body.keep_tokens(self.body_len).dequantize(dtype)
            at = 0 if self.sink is None else 1
            out.append(torch.cat([*parts[:at], mid, *parts[at:]], dim=-2))
        return out[0], out[1]

    def attend(
        self,
        query: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        softcap: float | None = None,
        compiled: bool | None = None,
        weights: bool = False,
        path: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Fused attention of ``query [B, Hq, n, D]`` over this step through ``path`` (see
        :func:`fused_attention`); ``None`` if that path cannot run here.

        Returns ``(output [B, n, Hq, D], probabilities)``: with ``weights``, the attention probabilities
        ``fp32 [B, Hq, n, L]`` over the step's tokens in position order (``L`` = sinks + body + residual + new),
        else ``None``.
        """
        B, _, n, _ = query.shape
        S = 0 if self.sink is None else self.sink[0].shape[-2]
        Tb, Tp = self.body_len, self.key_body.num_tokens
        fp_keys, fp_values = (torch.cat(self._fp(i), dim=-2) for i in (0, 1))
        mask = _kernel_mask(attention_mask, B, n, Tb + fp_keys.shape[-2], S, Tb, Tp, query.device)
        out = fused_attention(
            query, self.key_body, self.value_body, fp_keys, fp_values, mask, scaling, softcap, weights, compiled,
            path, Tb,
        )
        if out is None or not weights:
            return None if out is None else (out[0], None)
        p = out[1]  # [B, Hq, n, Tp + F] over [body buffer | sinks, residual, new]
        return out[0], torch.cat([p[..., Tp : Tp + S], p[..., :Tb], p[..., Tp + S :]], dim=-1)
