"""The authors' presets and which RAU-Net switch is active at a given step."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from .blockmap import BLOCK_MAPS
from .settings import Settings

# name -> (T1 ratio, T2 ratio), from hidiffusion 0.1.10's switching_threshold_ratio_dict
PRESETS: dict[str, tuple[float, float]] = {
    "sd15_1024": (0.4, 0.0),
    "sd15_2048": (0.7, 0.3),
    "sdxl_2048": (0.4, 0.0),
    "sdxl_4096": (0.7, 0.3),
    "sdxl_turbo_1024": (0.5, 0.0),
}
# With a ControlNet guiding a text-to-image pass the authors switch later where they have a value
# (text_to_img_controlnet_switching_threshold_ratio_dict); other presets keep their ratios.
CONTROLNET_PRESETS: dict[str, tuple[float, float]] = {"sdxl_2048": (0.5, 0.0)}
# The authors' pipeline runs the ControlNet while step < 0.6 * steps (controlnet_apply_steps_rate).
CONTROL_SHARE = 0.6
# The aggressive split hands over from the extra RAD to the pool at int(8 / 50 * steps).
AGGRESSIVE_STEP = 8


@dataclass(frozen=True)
class Schedule:
    """Resolved ratios for one latent size. aggressive applies to SDXL only."""

    preset: str
    t1: float
    t2: float
    aggressive: bool


def preset_for(arch: str, latent_h: int, latent_w: int) -> str:
    """The authors' preset: the larger one once both latent sides reach 2048/4096 px."""
    if arch in ("sd1", "sd2"):
        return "sd15_2048" if min(latent_h, latent_w) >= 256 else "sd15_1024"
    if arch == "sdxl_turbo":
        return "sdxl_turbo_1024"
    return "sdxl_4096" if min(latent_h, latent_w) >= 512 else "sdxl_2048"


def resolve(settings: Settings, arch: str, latent_h: int, latent_w: int, inpaint: bool = False) -> Schedule:
    """Ratios for this size: the preset's (its ControlNet ratios with ``settings.controlnet``),
    overridden by ``settings.t1``/``t2``/``aggressive``. T2 is 0 for a block map without an
    extra switch (SDXL-Turbo, as the authors' sdxl_turbo keys have none), whatever was asked."""
    preset = preset_for(arch, latent_h, latent_w)
    t1, t2 = PRESETS[preset]
    if settings.controlnet:
        t1, t2 = CONTROLNET_PRESETS.get(preset, (t1, t2))
    aggressive = settings.aggressive
    if aggressive is None:
        aggressive = preset == "sdxl_2048" and not inpaint
    if settings.t2 is not None:
        t2 = float(settings.t2)
    return Schedule(
        preset,
        t1 if settings.t1 is None else float(settings.t1),
        t2 if BLOCK_MAPS[arch].extra is not None else 0.0,
        aggressive and arch == "sdxl",  # the authors set the split for SDXL only, never for Turbo
    )


def active_switches(schedule: Schedule, step: int, steps: int | None) -> tuple[bool, bool]:
    """(main, extra) for ``step`` of a ``steps``-step pass, exactly as the reference:
    a switch is active while ``step < int(steps * ratio)`` in floating point.

    steps None (the caller never said) counts as step 0 of a long pass: a switch with a
    ratio above 0 is active.
    """
    if steps is None:
        if schedule.aggressive:
            return False, True
        return schedule.t1 > 0, schedule.t2 > 0
    if schedule.aggressive:
        handover = int(AGGRESSIVE_STEP / 50 * steps)
        return handover <= step < int(steps * schedule.t1), step < handover
    return step < int(steps * schedule.t1), step < int(steps * schedule.t2)


def switch_table(schedule: Schedule, steps: int) -> list[tuple[bool, bool]]:
    """(main, extra) at every step of a ``steps``-step pass: which steps RAU-Net changes.
    Few-step models show the rule's edges: at 1 step int(1 * 0.5) = 0, so no switch runs."""
    return [active_switches(schedule, step, steps) for step in range(steps)]


def step_of_call(call: int, steps: int, total_calls: int) -> int:
    """The denoising step of the ``call``-th model call (0-based) in a pass of ``steps``
    steps that makes ``total_calls`` calls: two per step for Heun/DPM2, so both calls of
    a step map to it and every sampler switches at the same point of the schedule."""
    if total_calls <= steps:
        return call
    return call * steps // total_calls


def step_of_calls(call: int, calls_per_step: Sequence[int]) -> int:
    """The step of the ``call``-th model call (0-based) of a sampler that makes
    ``calls_per_step[i]`` calls in step i (e.g. Forge's HeunPP2: 3, ..., 3, 2, 1), for
    samplers whose calls the host does not count (its total says one a step)."""
    for step, end in enumerate(itertools.accumulate(calls_per_step)):
        if call < end:
            return step
    return max(len(calls_per_step) - 1, 0)


def heunpp2_calls(steps: int) -> list[int]:
    """Calls a step of k-diffusion's ``sample_heunpp2`` (Forge's HeunPP2) in a ``steps``-step
    pass: Heun++ (3) while two more sigmas follow, Heun (2) before the last step, Euler (1)."""
    return [3] * max(steps - 2, 0) + [2, 1][-min(steps, 2):] if steps else []


def step_of_progress(progress: float, steps: int) -> int:
    """The step of a ``steps``-step pass that is ``progress`` (0..1) of the way through, for
    samplers whose number of calls is not known in advance (DPM adaptive)."""
    return min(max(int(progress * steps), 0), steps)


def native_side(settings: Settings, native_latent: int) -> int:
    """The latent side of the model's training size: ``settings.native_size`` where it is set
    (the host's, e.g. 96 for SD 2.x 768-v), else the block map's ``native_latent``."""
    return settings.native_size or native_latent


def gated(settings: Settings, native_latent: int, latent_h: int, latent_w: int) -> bool:
    """True when the native-resolution gate turns HiDiffusion off at this latent size: the
    latent's area is not larger than the training size's (native x native, see native_side), so
    SDXL's ~1-megapixel buckets such as 832x1216 count as native, as 512x512 does for SD 1.x."""
    native = native_side(settings, native_latent)
    return settings.native_gate and latent_h * latent_w <= native * native
