"""Small ldm U-Nets with the real SD 1.x, SD 2.x and SDXL block layouts, random weights.

ldm zero-initialises output convolutions; every parameter is redrawn here so that an
equivalence test can fail.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel

from hidiffusion_lib.bench.models import randomize

CONTEXT_DIM = {"sd1": 32, "sd2": 1024, "sdxl": 32}
__all__ = ["CONTEXT_DIM", "TinyMMDiT", "forge_config", "make_forge_unet", "make_inputs", "make_unet", "randomize",
           "unet_config"]


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


def forge_backend() -> types.ModuleType:
    """Forge's ``backend.nn.unet`` from the checkout at FORGE_DIR (skips the test without one).

    Forge parses its flags at import (backend/args.py): CPU and PyTorch attention, as the e2e
    tests start it. Its module imports need ``psutil`` and ``sentencepiece`` (for the vendored
    ``packages_3rdparty/gguf``), which requirements-test.txt pins.
    """
    import pytest

    forge = os.environ.get("FORGE_DIR")
    if not forge:
        pytest.skip("FORGE_DIR is not set: no Forge checkout to build its U-Net from")
    for path in (forge, os.path.join(forge, "packages_3rdparty")):
        if path not in sys.path:
            sys.path.insert(0, path)
    argv = sys.argv
    sys.argv = [argv[0], "--always-cpu", "--attention-pytorch"]
    try:
        return importlib.import_module("backend.nn.unet")
    finally:
        sys.argv = argv


def forge_config(layout: str, channels: int = 32) -> dict:
    """``IntegratedUNet2DConditionModel`` keyword arguments equal to ``unet_config(layout)``:
    depths per res block (input, output) as Forge's loader gives them, not per resolution."""
    ldm = unet_config(layout, channels)
    depth, levels, blocks = ldm["transformer_depth"], len(ldm["channel_mult"]), ldm["num_res_blocks"]
    per_level = [depth if 2**level in ldm["attention_resolutions"] else 0 for level in range(levels)]
    context = ldm["context_dim"]
    return dict(
        in_channels=ldm["in_channels"], out_channels=ldm["out_channels"], model_channels=channels,
        num_res_blocks=[blocks] * levels, channel_mult=ldm["channel_mult"], num_head_channels=ldm["num_head_channels"],
        use_spatial_transformer=True, context_dim=context[0] if isinstance(context, list) else context,
        use_linear_in_transformer=ldm.get("use_linear_in_transformer", False),
        transformer_depth=[d for d in per_level for _ in range(blocks)],
        transformer_depth_output=[d for d in per_level for _ in range(blocks + 1)],
        transformer_depth_middle=depth,
    )


def make_forge_unet(layout: str, seed: int = 0, channels: int = 32) -> torch.nn.Module:
    """Forge's U-Net class with the weights of ``make_unet(layout, seed, channels)``."""
    unet = forge_backend().IntegratedUNet2DConditionModel(**forge_config(layout, channels))
    unet.load_state_dict(make_unet(layout, seed, channels).state_dict())
    return unet.eval()


class TinyMMDiT(torch.nn.Module):
    """What a script sees of SD3's diffusion model in the webui v1.10.1: ``sd_model.model.
    diffusion_model`` (modules/models/sd3/sd3_model.py SD3Inferencer -> sd3_impls.py BaseModel)
    is modules/models/sd3/mmdit.py's MMDiT: a patch embedding (``x_embedder.proj``), timestep and
    pooled-text embedders, ``joint_blocks`` and a ``final_layer``, no ``input_blocks``; BaseModel
    calls it as ``diffusion_model(x, timestep, context=..., y=...)``. Small, with 4 latent
    channels (SD3 has 16) so the host stand-in's noise fits; Forge's SD3 transformer
    (backend/nn/mmditx.py) looks the same to HiDiffusion."""

    def __init__(self, channels: int = 4, hidden: int = 32, depth: int = 2, patch: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.patch = patch
        self.x_embedder = torch.nn.Module()
        self.x_embedder.proj = torch.nn.Conv2d(channels, hidden, patch, stride=patch)
        self.t_embedder = torch.nn.Linear(1, hidden)
        self.joint_blocks = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(depth))
        self.final_layer = torch.nn.Linear(hidden, channels * patch * patch)
        randomize(self, seed).eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor, context=None, y=None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.t_embedder(t.float().view(-1, 1) / 1000)[:, None]
        for block in self.joint_blocks:
            tokens = tokens + torch.tanh(block(tokens))
        out = self.final_layer(tokens).view(b, h // self.patch, w // self.patch, c, self.patch, self.patch)
        return out.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
