"""RAU-Net: resolution-aware downsampling early in sampling, undone on the way up.

RAD: a Downsample's 3x3 conv with its own weights at stride 4, padding 2, dilation 2 (x4
instead of x2). That conv equals the unchanged stride-2 conv run on every second row and
column of its input (see :func:`rad_forward`), so the Downsample itself runs, untouched, and
whatever patches its conv (the webui's Lora, in both of its modes) applies on RAD steps too.
Pool: avg-pool (ceil mode) after a cross-attention input block, bicubic back after the
matching output block.
Every Upsample interpolates to the size of the skip it meets next, as the authors'
diffusers hack does: that keeps any latent size and both switches consistent, and
equals the vanilla nearest x2 bit for bit where sizes are even. A nearest x4 RAU
followed by its 3x3 conv runs as the conv of a x3 map (see :func:`conv_of_nearest_x4`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .state import State
from .wrapping import call_original, marked


def rad_forward(downsample: nn.Module, state: State, switch: str) -> Callable:
    """Instance forward for a Downsample: x4 instead of x2 while ``switch`` is active.

    Output pixel i of the stride-4, padding-2, dilation-2 conv reads input rows
    4i - 2 + 2a (a = 0, 1, 2); those are rows 2i - 1 + a of ``x[..., ::2, ::2]``, which is
    exactly what the stride-2, padding-1 conv reads there (padding included, any size). So the
    Downsample runs as it is, on the subsampled input: a Lora that adds its own conv of the
    same stride and padding (webui's lora_functional mode) or merges its weights (default mode)
    lands on the RAD conv as on the vanilla one.
    """
    previous = downsample.__dict__.get("forward")

    def forward(x, *args, **kwargs):
        if state.alive and state.active[switch]:
            x = x[..., ::2, ::2]
        return call_original(downsample, previous, x, *args, **kwargs)

    return marked(forward, state, previous)


def upsample_forward(upsample: nn.Module, state: State, skip: int, rau_switch: str | None) -> Callable:
    """Instance forward for an Upsample: interpolate to the size of ``input_blocks[skip]``'s
    output, with ``settings.rau_mode`` while ``rau_switch`` is active, else nearest."""
    previous = upsample.__dict__.get("forward")

    def forward(x, *args, **kwargs):
        size = state.skip_sizes.get(skip)
        if not state.alive or size is None or x.ndim != 4:
            return call_original(upsample, previous, x, *args, **kwargs)
        mode = state.settings.rau_mode if rau_switch is not None and state.active[rau_switch] else "nearest"
        if mode == "nearest" and tuple(size) == (4 * x.shape[-2], 4 * x.shape[-1]) and _plain_3x3(upsample):
            return conv_of_nearest_x4(upsample.conv, x)
        x = F.interpolate(x, size=size, mode=mode)
        return upsample.conv(x) if upsample.use_conv else x

    return marked(forward, state, previous)


def _plain_3x3(upsample: nn.Module) -> bool:
    conv = getattr(upsample, "conv", None) if upsample.use_conv else None
    return conv is not None and all(
        tuple(getattr(conv, name, ())) == value
        for name, value in (("kernel_size", (3, 3)), ("stride", (1, 1)), ("padding", (1, 1)), ("dilation", (1, 1)))
    )


def conv_of_nearest_x4(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(nearest x4 of x)`` for a 3x3, padding-1 ``conv``, at 9/16 of the cost (bit for bit on
    the CPU; a GPU may pick other conv kernels for the two sizes and differ in the last bits).

    Along each axis the 3-tap window over a x4 nearest upsampling sees only three patterns of
    source rows, (i-1, i, i), (i, i, i) and (i, i, i+1), and a x3 upsampling holds each exactly
    once: the conv runs on the x3 map (the module itself, so patched convs still apply) and its
    rows and columns are picked in the order 0, 1, 1, 2 per source row.
    """
    h, w = x.shape[-2:]
    y = conv(F.interpolate(x, size=(3 * h, 3 * w), mode="nearest"))
    pick = torch.tensor([0, 1, 1, 2], device=x.device)
    rows = (torch.arange(h, device=x.device)[:, None] * 3 + pick).view(-1)
    cols = (torch.arange(w, device=x.device)[:, None] * 3 + pick).view(-1)
    # one gather: index_select on the last axis is far slower
    return y[:, :, rows[:, None], cols]


def input_block_hook(state: State, index: int, pool_switch: str | None) -> Callable:
    """Forward hook on ``input_blocks[index]``: pool its output while ``pool_switch`` is
    active, and record the output size an Upsample will need."""

    def hook(module, args, output):
        if pool_switch is not None and state.active[pool_switch]:
            state.pooled_from[pool_switch] = tuple(output.shape[-2:])
            output = F.avg_pool2d(output, kernel_size=2, ceil_mode=True)
        state.skip_sizes[index] = tuple(output.shape[-2:])
        if state.trace:
            state.trace[-1].skips.append(state.skip_sizes[index])
        return output

    return marked(hook, state)


def unpool_hook(state: State, pool_switch: str) -> Callable:
    """Forward hook on the output block that undoes ``pool_switch``: bicubic back to the
    size recorded before pooling in this same forward."""

    def hook(module, args, output):
        size = state.pooled_from.pop(pool_switch, None)
        if size is None:
            return output
        return F.interpolate(output, size=size, mode="bicubic")

    return marked(hook, state)
