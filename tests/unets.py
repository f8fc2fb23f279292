"""Small ldm U-Nets with the real SD 1.x, SD 2.x and SDXL block layouts, random weights.

ldm zero-initialises output convolutions; every parameter is redrawn here so that an
equivalence test can fail.
"""

from __future__ import annotations

import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel

from hidiffusion_lib.bench.models import randomize

CONTEXT_DIM = {"sd1": 32, "sd2": 1024, "sdxl": 32}
__all__ = ["CONTEXT_DIM", "make_inputs", "make_unet", "randomize", "unet_config"]


def unet_config(layout: str, channels: int = 32) -> dict:
    """Keyword arguments of ldm's UNetModel for a small U-Net of ``layout``."""
    common = dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=channels, num_res_blocks=2,
        num_head_channels=16, use_spatial_transformer=True, legacy=False,
    )
    if layout == "sd1":
        return dict(common, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4],
                    transformer_depth=1, context_dim=CONTEXT_DIM["sd1"])
    if layout == "sd2":
        return dict(common, attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4],
                    transformer_depth=1, context_dim=CONTEXT_DIM["sd2"], use_linear_in_transformer=True)
    if layout == "sdxl":
        # ldm takes one depth for all levels and wants context_dim as a list per block
        return dict(common, attention_resolutions=[4, 2], channel_mult=[1, 2, 4],
                    transformer_depth=2, context_dim=[CONTEXT_DIM["sdxl"]] * 2, use_linear_in_transformer=True)
    raise ValueError(f"unknown layout {layout!r}")


def make_unet(layout: str, seed: int = 0, channels: int = 32) -> UNetModel:
    return randomize(UNetModel(**unet_config(layout, channels)), seed).eval()


def make_inputs(layout: str, batch: int, h: int, w: int, seed: int = 1, tokens: int = 7):
    """(x, timesteps, context) as the webui passes them; SDXL-layout context is a list."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=generator)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, tokens, CONTEXT_DIM[layout], generator=generator)
    if layout == "sdxl":
        return x, t, [context, context]
    return x, t, context
