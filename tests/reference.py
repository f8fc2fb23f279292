"""The authors' package on diffusers twins of the small ldm U-Nets in unets.py.

Twins, ReferenceRun and the comparison helpers live in :mod:`hidiffusion_lib.reference` (the
benchmark uses them too); this module only pairs them with the test U-Nets.
"""

from __future__ import annotations

import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from unets import make_unet

from hidiffusion_lib.bench.reference import make_twin, max_diff, run_diffusers

LAYOUT = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sdxl_turbo": "sdxl"}
VANILLA_TOLERANCE = 1e-5


def run_ldm(unet: UNetModel, x: torch.Tensor, t: torch.Tensor, context) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, timesteps=t, context=context)


def make_pair(layout: str, x: torch.Tensor, t: torch.Tensor, context, seed: int = 0, channels: int = 32):
    """An ldm U-Net and its diffusers twin; asserts they agree on ``(x, t, context)`` unpatched."""
    ldm_unet = make_unet(layout, seed, channels)
    twin = make_twin(ldm_unet)
    diff = max_diff(run_ldm(ldm_unet, x, t, context), run_diffusers(twin, x, t, context))
    assert diff <= VANILLA_TOLERANCE, f"{layout}: vanilla ldm and diffusers U-Nets differ by {diff:.2e}"
    return ldm_unet, twin
