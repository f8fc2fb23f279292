"""HiDiffusion (RAU-Net + MSW-MSA) for ldm/sgm U-Nets, with no webui imports.

    handle = hidiffusion_lib.apply(unet, hidiffusion_lib.Settings())
    for step in range(steps):
        handle.set_step(step, steps)
        ...  # call the U-Net
    handle.remove()

Names load lazily, so the batch client (which needs no torch) can import this package.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    ".blockmap": ("BLOCK_MAPS", "BlockMap", "Switch"),
    ".detection": ("ArchMismatch", "RefinerUNet", "UnsupportedUNet", "detect"),
    ".patching": ("HiDiffusionHandle", "apply", "remove"),
    ".controlnet": ("control_latent_size", "install_adapter", "install_control", "install_region_mask",
                    "remove_control"),
    ".schedule": ("CONTROL_SHARE", "CONTROLNET_PRESETS", "PRESETS", "Schedule", "active_switches", "gated",
                  "heunpp2_calls", "preset_for", "resolve", "step_of_call", "step_of_calls",
                  "step_of_progress", "switch_table"),
    ".state": ("Forward",),
    ".settings": ("ARCHES", "RAU_MODES", "SHIFT_POLICIES", "Settings"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hidiffusion_lib' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)


def __dir__() -> list[str]:
    return __all__
