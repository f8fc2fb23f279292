"""User-facing settings of the engine, validated before anything is patched."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

ARCHES = ("sd1", "sd2", "sdxl", "sdxl_turbo")
SHIFT_POLICIES = ("random", "cycle", "fixed")
RAU_MODES = ("nearest", "bicubic")


@dataclass
class Settings:
    """What HiDiffusion does to a U-Net.

    raunet: resolution-aware down/upsampling (RAU-Net) in the early steps.
    mswmsa: shifted-window self-attention (MSW-MSA) in the top transformer blocks.
    t1, t2: switching ratios of the main and extra RAU-Net switch; a switch is active
        while ``step < int(steps * ratio)``. None takes the authors' preset for the
        architecture and latent size.
    aggressive: SDXL's split schedule (extra RAD first, then the pool). None = the
        authors' choice: on for SDXL base below 4096 px, off for inpainting models.
    shift: window shift policy: "random" (drawn from a generator seeded by ``seed`` and
        the step, never from the global RNG), "cycle" (step + block position), "fixed".
    shift_index: the shift used with "fixed": 0..3, in quarters of a window.
    seed: seeds the "random" shift policy.
    rau_mode: interpolation of the RAU upsampler while its switch is active.
    arch: "sd1", "sd2", "sdxl" or "sdxl_turbo"; None detects it from the module tree.
    native_gate: skip both parts when the latent's area is not larger than
        ``native_size`` squared (at the model's training sizes, its ~1-megapixel buckets
        included for SDXL, they only cost quality). Off by default so the
        engine behaves like the authors' code; the webui extension turns it on.
    native_size: latent side of the gate's square; None = 64 for SD 1.x/2.x, 128 for SDXL.
    controlnet: a ControlNet guides this text-to-image pass: the preset ratios become the
        authors' ControlNet ones where they have them (SDXL 2048 px: T1 0.5 instead of 0.4).
    """

    raunet: bool = True
    mswmsa: bool = True
    t1: float | None = None
    t2: float | None = None
    aggressive: bool | None = None
    shift: str = "random"
    shift_index: int = 0
    seed: int = 0
    rau_mode: str = "nearest"
    arch: str | None = None
    native_gate: bool = False
    native_size: int | None = None
    controlnet: bool = False

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the first bad field and what it accepts."""
        for name in ("raunet", "mswmsa", "native_gate", "controlnet"):
            _check_bool(name, getattr(self, name))
        if self.aggressive is not None:
            _check_bool("aggressive", self.aggressive)
        for name in ("t1", "t2"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"Settings.{name} must be a number in [0, 1] or None, got {value!r}")
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"Settings.{name} must be in [0, 1] (or None for the preset), got {value!r}")
        _check_choice("shift", self.shift, SHIFT_POLICIES)
        _check_choice("rau_mode", self.rau_mode, RAU_MODES)
        if self.arch is not None:
            _check_choice("arch", self.arch, ARCHES)
        _check_int("shift_index", self.shift_index, 0, 3)
        _check_int("seed", self.seed, -(2**63), 2**64 - 1)
        if self.native_size is not None:
            _check_int("native_size", self.native_size, 1, 1 << 20)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Settings.{name} must be True or False, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Settings.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Settings.{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"Settings.{name} must be in [{low}, {high}], got {value!r}")
