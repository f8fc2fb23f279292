"""The attention implementation of a benchmark run, installed on both sides alike.

ldm's own CrossAttention materialises the full softmax matrix (about 34 GB at 1024 px on SD 1.5)
and every webui replaces it; "sdp" swaps in PyTorch's scaled_dot_product_attention at class
level, as the webui's --opt-sdp-attention does, and gives the diffusers twin the matching
``AttnProcessor2_0``. "ldm" keeps ldm's einsum softmax and gives the twin diffusers' classic
``AttnProcessor`` (same math).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

ATTENTIONS = ("sdp", "ldm")


def sdp_forward(self: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """ldm ``CrossAttention.forward`` with scaled_dot_product_attention."""
    if mask is not None:
        raise NotImplementedError("masked attention is not benchmarked")
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, heads = x.shape[0], self.heads
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3]))


@contextmanager
def ldm_attention(name: str) -> Iterator[None]:
    """Within the block, ldm's CrossAttention runs ``name`` ("sdp" or "ldm"); restored after."""
    from ldm.modules.attention import CrossAttention

    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose from {', '.join(ATTENTIONS)}")
    original = CrossAttention.forward
    if name == "sdp":
        CrossAttention.forward = sdp_forward
    try:
        yield
    finally:
        CrossAttention.forward = original


def set_diffusers_attention(unet: nn.Module, name: str) -> None:
    """Give a diffusers U-Net the processor matching ``name``."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; choose from {', '.join(ATTENTIONS)}")
    unet.set_attn_processor(AttnProcessor2_0() if name == "sdp" else AttnProcessor())
