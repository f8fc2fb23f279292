"""HiDiffusion (RAU-Net + MSW-MSA) for ldm/sgm U-Nets, with no webui imports.

    handle = hidiffusion_lib.apply(unet, hidiffusion_lib.Settings())
    for step in range(steps):
        handle.set_step(step, steps)
        ...  # call the U-Net
    handle.remove()
"""

from .blockmap import BLOCK_MAPS, BlockMap, Switch
from .detection import UnsupportedUNet, detect
from .patching import HiDiffusionHandle, apply, remove
from .schedule import PRESETS, Schedule, active_switches, gated, preset_for, resolve, step_of_call
from .settings import ARCHES, RAU_MODES, SHIFT_POLICIES, Settings

__all__ = [
    "ARCHES",
    "BLOCK_MAPS",
    "PRESETS",
    "RAU_MODES",
    "SHIFT_POLICIES",
    "BlockMap",
    "HiDiffusionHandle",
    "Schedule",
    "Settings",
    "Switch",
    "UnsupportedUNet",
    "active_switches",
    "apply",
    "detect",
    "gated",
    "preset_for",
    "remove",
    "resolve",
    "step_of_call",
]
