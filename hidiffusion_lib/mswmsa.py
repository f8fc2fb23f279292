"""MSW-MSA: self-attention inside a 2x2 grid of cyclically shifted windows.

Only the input of ``attn1`` is windowed (the residual, cross-attention and feed-forward
are untouched), so wrapping the ``attn1`` call is exactly the authors' change to the
transformer block, and whatever attention the host installed still does the work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .state import State
from .wrapping import call_original, marked


def window_size(h: int, w: int) -> tuple[int, int]:
    """Window of a 2x2 grid over an h x w token map."""
    return (h + 1) // 2, (w + 1) // 2


def shift_for(window: tuple[int, int], index: int) -> tuple[int, int]:
    """Cyclic shift ``index`` (0..3) in quarters of a window, as the reference rounds it."""
    return window[0] // 4 * index, window[1] // 4 * index


def partition(x: torch.Tensor, h: int, w: int, shift: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, C) tokens -> (4B, wh*ww, C) windows.

    Odd maps are bicubic-resized to twice the window first; the reference rolls only when
    the row shift is positive, so a window under 4 rows is never shifted.
    """
    b, _, c = x.shape
    wh, ww = window_size(h, w)
    x = x.view(b, h, w, c)
    if h % 2 or w % 2:
        x = F.interpolate(x.permute(0, 3, 1, 2).contiguous(), size=(2 * wh, 2 * ww), mode="bicubic")
        x = x.permute(0, 2, 3, 1)
    if shift[0] > 0:
        # One gather does the roll and the partition: a roll copies once per axis.
        order, _ = _window_order(2 * wh, 2 * ww, shift, x.device)
        return x.reshape(b, 4 * wh * ww, c).index_select(1, order).view(b * 4, wh * ww, c)
    x = x.reshape(b, 2, wh, 2, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * 4, wh * ww, c)


def reverse(windows: torch.Tensor, h: int, w: int, shift: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`partition`: (4B, wh*ww, C) -> (B, h*w, C)."""
    wh, ww = window_size(h, w)
    c = windows.shape[-1]
    b = windows.shape[0] // 4
    if shift[0] > 0:
        _, inverse = _window_order(2 * wh, 2 * ww, shift, windows.device)
        x = windows.reshape(b, 4 * wh * ww, c).index_select(1, inverse).view(b, 2 * wh, 2 * ww, c)
    else:
        x = windows.reshape(b, 2, 2, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * wh, 2 * ww, c)
    if h % 2 or w % 2:
        x = F.interpolate(x.permute(0, 3, 1, 2).contiguous(), size=(h, w), mode="bicubic").permute(0, 2, 3, 1)
    return x.reshape(b, h * w, c)


def _window_order(h: int, w: int, shift: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of an even h x w map rolled by -shift and read window by window, and the
    inverse permutation. Built per call (microseconds): a cache would hold memory for good."""
    grid = torch.arange(h * w, device=device)
    order = grid.view(h, w).roll((-shift[0], -shift[1]), dims=(0, 1)).view(2, h // 2, 2, w // 2)
    inverse = grid.view(2, 2, h // 2, w // 2).permute(0, 2, 1, 3).reshape(h, w).roll(shift, dims=(0, 1))
    return order.permute(0, 2, 1, 3).reshape(-1), inverse.reshape(-1)


def _is_plain_self_attention(x: torch.Tensor, context: object, args: tuple, kwargs: dict) -> bool:
    # Anything else (a reference bank as context or value, sgm's extra tokens, a mask) passes
    # through. Forge's attn1 takes ``value`` too: None, or the input itself after an attn1 patch.
    if context is not None and context is not x:
        return False
    if kwargs.get("value") is not None and kwargs["value"] is not x:
        return False
    if any(a is not None for a in args) or kwargs.get("mask") is not None:
        return False
    return kwargs.get("additional_tokens") is None and not kwargs.get("n_times_crossframe_attn_in_self")


def windowed_forward(attn: nn.Module, state: State, position: int, token_hw: list) -> Callable:
    """An instance ``forward`` for ``attn`` (an attn1) that windows plain self-attention.

    position: this block's index among the windowed blocks (picks its shift).
    token_hw: a one-item list the enclosing SpatialTransformer's pre-hook fills with (h, w).
    The inner call goes to the instance forward found at patch time (e.g. Hypertile's) or
    else to the class's forward looked up at call time, so later class-level swaps of the
    attention implementation are honoured.
    """
    previous = attn.__dict__.get("forward")

    def forward(x, context=None, *args, **kwargs):
        hw = token_hw[0]
        if (
            not (state.alive and state.windows_on)
            or hw is None
            or x.ndim != 3
            or x.shape[1] != hw[0] * hw[1]
            or not _is_plain_self_attention(x, context, args, kwargs)
        ):
            return call_original(attn, previous, x, context, *args, **kwargs)
        h, w = hw
        shift = shift_for(window_size(h, w), state.shift_indices[position])
        windows = partition(x, h, w, shift)
        if kwargs.get("value") is not None:
            kwargs = {**kwargs, "value": windows}
        out = call_original(attn, previous, windows, windows if context is x else None, *args, **kwargs)
        return reverse(out, h, w, shift)

    return marked(forward, state, previous)


def record_token_hw(state: State, token_hw: list) -> Callable:
    """A forward pre-hook for a SpatialTransformer: remember its input's (h, w)."""

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        token_hw[0] = tuple(x.shape[-2:]) if x is not None and x.ndim == 4 else None

    return marked(hook, state)
