"""The hires fix route: what the webui runs to reach a size from a first pass at the model's size.

txt2img with hires fix samples a first pass of ``steps`` steps, upscales it by ``hr_scale`` and
samples again at the target size. The second pass (``sample_hr_pass`` in the webui's
modules/processing.py) asks the sampler for ``hr_second_pass_steps or steps`` steps explicitly, so
``setup_img2img_steps`` (modules/sd_samplers_common.py) takes its first branch: the noise schedule
is stretched to ``int(steps / denoising)`` steps and only its last ``steps`` run. The denoising
strength moves where the second pass starts on the schedule, not how many U-Net steps it runs:
20 steps at the UI's default 0.7 run steps 8-27 of a 28-step schedule, 20 U-Net steps (plain
img2img, which passes no steps, would run ``int(0.7 * 20) + 1`` = 15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The model's own image side per architecture: a hires fix starts there (the engine's native gate too).
NATIVE_SIDE = {"sd15": 512, "sd21": 512, "sdxl": 1024}
# The smallest first pass: a latent side of 8, what the U-Net's three halvings need.
MIN_SIDE = 64
# txt2img's hires "Denoising strength" default (modules/ui.py); the API's default is 0.75.
DENOISING = 0.7


@dataclass(frozen=True)
class Hires:
    """A hires fix generation: a first pass at ``first`` (width, height) pixels of ``first_steps``
    steps, upscaled by ``scale``, then ``second_steps`` U-Net steps at the target size: steps
    ``start``..``schedule - 1`` of a ``schedule``-step noise schedule (``denoising`` strength)."""

    first: tuple[int, int]
    scale: float
    first_steps: int
    second_steps: int
    schedule: int
    start: int
    denoising: float

    def describe(self, target: tuple[int, int]) -> str:
        return (f"hires fix {self.first[0]}x{self.first[1]} -> {target[0]}x{target[1]} "
                f"({self.first_steps} + {self.second_steps} steps)")


def second_pass(steps: int, hr_second_pass_steps: int = 0, denoising: float = DENOISING) -> tuple[int, int, int]:
    """(U-Net steps, schedule length, first schedule step run) of the hires fix second pass,
    as the webui computes them (see the module docstring)."""
    if not 0 < denoising <= 1:
        raise ValueError(f"denoising strength must be in (0, 1], got {denoising}")
    requested = hr_second_pass_steps or steps
    schedule = int(requested / min(denoising, 0.999))
    start = schedule - (requested - 1) - 1  # sigmas[steps - t_enc - 1:], t_enc = requested - 1
    return schedule - start, schedule, start


def plan(arch: str, width: int, height: int, steps: int, scale: float | None = None,
         hr_second_pass_steps: int = 0, denoising: float = DENOISING) -> Hires | None:
    """The hires fix reaching width x height; None when its first pass would not be smaller.

    scale: the webui's "Upscale by"; None starts from the architecture's native size (SD 1.5:
    512 px, so x2 to 1024 and x4 to 2048). The first pass is the target divided by it, in
    multiples of 8 pixels, at least MIN_SIDE."""
    if scale is None:
        scale = math.sqrt(width * height) / NATIVE_SIDE[arch]
    if scale <= 1:
        return None
    first = (round(width / scale / 8) * 8, round(height / scale / 8) * 8)
    if min(first) < MIN_SIDE or (first[0] >= width and first[1] >= height):
        return None
    second, schedule, start = second_pass(steps, hr_second_pass_steps, denoising)
    return Hires(first, scale, steps, second, schedule, start, denoising)
