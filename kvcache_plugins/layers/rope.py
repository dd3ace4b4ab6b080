"""The model's rotary embedding as a rotation of cached keys (for keys stored before RoPE, e.g. low-rank factors)."""

from __future__ import annotations

from typing import Any

import torch

from ..quant.lowrank import LayerRanks

KEY_SPACES = ("pre_rope", "post_rope")
#: rope types whose rotation of a position depends on the forward passes before it (refused for pre-RoPE keys)
HISTORY_DEPENDENT_ROPE = frozenset({"dynamic"})


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class RopeRotation:
    """The model's rotary embedding as a rotation of cached keys at integer slot positions.

    Keys follow transformers' ``rotate_half`` convention on the first ``R`` channels (``R = cos.shape[-1]``: all of
    head_dim, or a part for partial rotary models): ``k = x cos + rotate_half(x) sin``. :meth:`apply` computes that;
    ``inverse=True`` computes ``x = (k cos - rotate_half(k) sin) / (cos^2 + sin^2)``, exact also when the rope type
    scales ``cos`` and ``sin`` (attention scaling). Everything in fp32.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        import inspect

        self.module = module
        self._layer_type = "layer_type" in inspect.signature(module.forward).parameters  # Gemma-3: one per type

    def __deepcopy__(self, memo: dict) -> RopeRotation:
        return self  # the model's module, shared by forks of a cache (it holds no cache state)

    @classmethod
    def of(cls, model: Any) -> RopeRotation | None:
        """The rotary embedding of a transformers model (``None`` if it has none or ``model`` is a config)."""
        if not isinstance(model, torch.nn.Module):
            return None
        inner = getattr(model, "model", model)
        module = getattr(inner, "rotary_emb", None)
        if module is None:
            module = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
        return None if module is None else cls(module)

    def _cos_sin(self, positions: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        B, Hs, T = positions.shape
        dummy = torch.zeros((), dtype=torch.float32, device=device)
        pos = positions.reshape(B * Hs, T).to(device=device, dtype=torch.long)
        with torch.no_grad():
            args = (dummy, pos, "full_attention") if self._layer_type else (dummy, pos)
            cos, sin = self.module(*args)
        return cos.float().view(B, Hs, T, -1), sin.float().view(B, Hs, T, -1)

    def apply(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """Rotate ``x`` ``[B, H, T, D]`` by RoPE at ``positions`` ``[B, H_s, T]`` (``H_s`` 1 or ``H``); ``inverse``
        undoes it. Returns a new tensor in ``x.dtype``."""
        if x.shape[-2] == 0:
            return x.clone()
        cos, sin = self._cos_sin(positions, x.device)
        R = cos.shape[-1]
        xf = x.float()
        rot, rest = xf[..., :R], xf[..., R:]
        if inverse:
            rot = (rot * cos - _rotate_half(rot) * sin) / (cos * cos + sin * sin)
        else:
            rot = rot * cos + _rotate_half(rot) * sin
        return torch.cat([rot, rest], dim=-1).to(x.dtype)


def resolve_rope(keys: str, model_or_config: Any, ranks: list[LayerRanks]) -> RopeRotation | None:
    """The rotation ``keys="pre_rope"`` needs (``None`` for post-RoPE or when no key is factored)."""
    if keys not in KEY_SPACES:
        raise ValueError(f"keys must be one of {KEY_SPACES} (factor keys before or after RoPE), got {keys!r}")
    if keys == "post_rope" or all(k is None for k, _ in ranks):
        return None
    rope = RopeRotation.of(model_or_config)
    if rope is None:
        raise ValueError(
            "factoring keys before RoPE (keys='pre_rope', the default) needs the model's rotary embedding: pass the "
            "model, not its config, or choose keys='post_rope'"
        )
    types = getattr(rope.module, "rope_type", "default")
    types = set(types.values()) if isinstance(types, dict) else {types}
    if types & HISTORY_DEPENDENT_ROPE:
        # dynamic NTK changes its frequencies as the sequence grows: a DynamicCache holds each key rotated at the
        # frequencies of the forward that computed it, which a rotation by position alone cannot re-apply
        raise ValueError(
            f"keys='pre_rope' re-applies RoPE by position, but rope_type {sorted(types & HISTORY_DEPENDENT_ROPE)} "
            "changes its frequencies with the sequence length seen so far; choose keys='post_rope' for this model"
        )
    return rope

