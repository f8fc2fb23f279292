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
    RAU-Net switches ran, whether MSW-MSA windowed (with the shifts it used), the output size of
    every input block (filled in as they run), the sizes of the control residuals handed to a
    host for it and the latent size its control model ran at (see :mod:`.controlnet`; None
    without a control model, and ``control`` None where the model did not run)."""

    step: int
    steps: int | None
    height: int
    width: int
    main: bool
    extra: bool
    windows: tuple[int, ...] | None
    skips: list[tuple[int, int]]
    residuals: list[tuple[int, int]] | None
    control: tuple[int, int] | None
    features: list[tuple[int, int]] | None = None


@dataclass(frozen=True)
class Resampling:
    """How the input blocks change the latent size: ``convs`` maps a block index to its
    Downsample's (kernel, stride, padding, dilation) per axis; ``rad`` and ``pool`` map the
    block a RAU-Net switch acts on to the switch's name."""

    count: int
    convs: dict[int, tuple[tuple[int, int], ...]]
    rad: dict[int, str]
    pool: dict[int, str]


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
    resampling: Resampling | None = None
    pending_residuals: list[tuple[int, int]] | None = None
    pending_control: tuple[int, int] | None = None
    pending_features: list[tuple[int, int]] | None = None

    def switches_at(self, latent_h: int, latent_w: int) -> tuple[bool, Schedule, dict[str, bool]]:
        """(gated, schedule, active switches) of a forward at this latent size and the current step."""
        settings, detected = self.settings, self.detected
        is_gated = gated(settings, detected.block_map.native_latent, latent_h, latent_w)
        schedule = resolve(settings, detected.arch, latent_h, latent_w, detected.inpaint)
        main, extra = active_switches(schedule, self.step, self.steps)
        use_raunet = settings.raunet and not is_gated
        return is_gated, schedule, {"main": use_raunet and main,
                                    "extra": use_raunet and extra and detected.block_map.extra is not None}

    def begin_forward(self, latent_h: int, latent_w: int) -> None:
        settings, detected = self.settings, self.detected
        self.skip_sizes.clear()
        self.pooled_from.clear()
        self.gated, self.schedule, active = self.switches_at(latent_h, latent_w)
        self.active.update(active)
        self.windows_on = settings.mswmsa and not self.gated
        if self.windows_on:
            self.shift_indices = shift_indices(settings, self.step, len(detected.block_map.windowed))
        self.trace.append(Forward(self.step, self.steps, latent_h, latent_w, self.active["main"], self.active["extra"],
                                  tuple(self.shift_indices) if self.windows_on else None, [],
                                  self.pending_residuals, self.pending_control, self.pending_features))
        self.pending_residuals = self.pending_control = self.pending_features = None

    def skips_at(self, latent_h: int, latent_w: int) -> list[tuple[int, int]]:
        """The output size of every input block in a forward at this latent size and the current
        step, computed before it runs (the middle block keeps the last one's size)."""
        if self.resampling is None:
            raise RuntimeError("skips_at needs a patch installed by apply()")
        _, _, active = self.switches_at(latent_h, latent_w)
        size, sizes = (latent_h, latent_w), []
        for index in range(self.resampling.count):
            conv = self.resampling.convs.get(index)
            if conv is not None:
                if active.get(self.resampling.rad.get(index, ""), False):
                    size = tuple(-(-n // 2) for n in size)  # RAD subsamples, then the conv runs as it is
                size = tuple(_conv_out(n, *axis) for n, axis in zip(size, conv, strict=True))
            if active.get(self.resampling.pool.get(index, ""), False):
                size = tuple(-(-n // 2) for n in size)
            sizes.append(size)
        return sizes


def _conv_out(n: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (n + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def shift_indices(settings: Settings, step: int, count: int) -> list[int]:
    """The window shift (0..3) of each windowed block at ``step``: a pure function of the
    settings and the step, so a run is reproducible and never touches the global RNG."""
    if settings.shift == "fixed":
        return [settings.shift_index] * count
    if settings.shift == "cycle":
        return [(step + k) % 4 for k in range(count)]
    generator = torch.Generator(device="cpu").manual_seed((settings.seed * 1_000_003 + step) % (1 << 63))
    return torch.randint(0, 4, (count,), generator=generator).tolist()
