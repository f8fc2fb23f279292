"""The per-forward state of a live patch: what the patched modules read, rebuilt at the start
of every U-Net forward from the settings, the step and the latent size.

It imports neither part of the method, so the arrows run one way:
patching -> raunet / mswmsa -> state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .detection import Detected
from .schedule import Schedule, active_switches, gated, resolve
from .settings import Settings

SWITCHES = ("main", "extra")


class Forward(NamedTuple):
    """What one U-Net forward of a live patch did: the step it was told, the latent size, which
    RAU-Net switches ran and whether MSW-MSA windowed (with the shifts it used)."""

    step: int
    steps: int | None
    height: int
    width: int
    main: bool
    extra: bool
    windows: tuple[int, ...] | None


@dataclass
class State:
    """What the patched modules read during one forward; rebuilt at its start."""

    settings: Settings
    detected: Detected
    alive: bool = True
    step: int = 0
    steps: int | None = None
    schedule: Schedule | None = None
    gated: bool = False
    active: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(SWITCHES, False))
    windows_on: bool = False
    shift_indices: list[int] = field(default_factory=list)
    skip_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)
    pooled_from: dict[str, tuple[int, int]] = field(default_factory=dict)
    trace: list[Forward] = field(default_factory=list)

    def begin_forward(self, latent_h: int, latent_w: int) -> None:
        settings, detected = self.settings, self.detected
        self.skip_sizes.clear()
        self.pooled_from.clear()
        self.gated = gated(settings, detected.block_map.native_latent, latent_h, latent_w)
        self.schedule = resolve(settings, detected.arch, latent_h, latent_w, detected.inpaint)
        main, extra = active_switches(self.schedule, self.step, self.steps)
        use_raunet = settings.raunet and not self.gated
        self.active["main"] = use_raunet and main
        self.active["extra"] = use_raunet and extra and detected.block_map.extra is not None
        self.windows_on = settings.mswmsa and not self.gated
        if self.windows_on:
            self.shift_indices = shift_indices(settings, self.step, len(detected.block_map.windowed))
        self.trace.append(Forward(self.step, self.steps, latent_h, latent_w, self.active["main"], self.active["extra"],
                                  tuple(self.shift_indices) if self.windows_on else None))


def shift_indices(settings: Settings, step: int, count: int) -> list[int]:
    """The window shift (0..3) of each windowed block at ``step``: a pure function of the
    settings and the step, so a run is reproducible and never touches the global RNG."""
    if settings.shift == "fixed":
        return [settings.shift_index] * count
    if settings.shift == "cycle":
        return [(step + k) % 4 for k in range(count)]
    generator = torch.Generator(device="cpu").manual_seed((settings.seed * 1_000_003 + step) % (1 << 63))
    return torch.randint(0, 4, (count,), generator=generator).tolist()
