"""Decode-step attention for grouped-query models: no copied key/value heads under ``torch.compile``.

Hugging Face's ``sdpa`` attention expands the key and value caches to one copy per query head
(``repeat_kv``) whenever it runs inside ``torch.compile`` and a mask is given, which a static cache
always gives. For a decode step that copy moves the whole cache several times per layer: with
SmolLM2 (9 query heads on 3 key/value heads) at batch 16 and a 128-slot cache it doubled the step
time on CPU. ``sdpa`` without compile avoids it by folding the query heads of each key/value head
into the query-length axis; ``decode_sdpa`` does the same inside compiled graphs and hands every
other case (prefill, dropout, softcap, position bias, paged caches) to Hugging Face's function.

``decode_attention(model)`` switches a model whose config says ``sdpa`` to ``decode_sdpa`` for the
duration of a block and restores it afterwards, so the model the user holds never changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

NAME = "pysteer_decode_sdpa"
_REGISTERED = False


def decode_sdpa(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """``sdpa`` attention with a single query token per row attending per key/value head."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    B, H, q_len, D = query.shape
    special = any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "cache", "s_aux"))
    if q_len != 1 or groups <= 1 or dropout or special or kwargs.get("output_attentions"):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    # [B, H, 1, D] -> [B, H_kv, groups, D]: the query heads sharing a key/value head become its queries
    q = query.reshape(B, H // groups, groups, D)
    mask = attention_mask
    if mask is not None and mask.shape[1] != 1:  # a per-head mask follows its heads
        mask = mask.reshape(B, H // groups, groups, mask.shape[-1])
    out = F.scaled_dot_product_attention(
        q, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling, is_causal=False
    )
    return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None


def _register() -> bool:
    global _REGISTERED
    if not _REGISTERED:
        try:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        except ImportError:  # older transformers: keep the model's own attention
            return False
        AttentionInterface.register(NAME, decode_sdpa)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _REGISTERED = True
    return True


@contextmanager
def decode_attention(model: nn.Module) -> Iterator[bool]:
    """Run the block with ``decode_sdpa`` when the model uses ``sdpa``; yields whether it switched."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa" or not _register():
        yield False
        return
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = current


__all__ = ["decode_attention", "decode_sdpa"]
