"""What a benchmark times at one size: the configurations and the steps each one stands for.

A sampling pass of N steps runs the U-Net in a few distinct states, set by the preset's T1/T2
(see :func:`hidiffusion_lib.active_switches`): e.g. SD 1.5 at 1024 px, 20 steps: RAU-Net +
MSW-MSA for steps 0-7, MSW-MSA only for steps 8-19. Timing one forward per state gives the
whole generation's U-Net time without running N forwards.

Each configuration belongs to a route, a way a webui user reaches the size: vanilla, HiDiffusion,
the webui's Hypertile alone, both together (Hypertile's U-Net option on: MSW-MSA steps aside and
RAU-Net runs under Hypertile, as the extension runs them), or hires fix (its first pass is a
vanilla forward at a smaller size; its second pass is vanilla at this size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schedule import Schedule, active_switches
from ..settings import Settings

VANILLA, IDLE = "vanilla", "idle"
# Routes; VANILLA and IDLE are routes of their own too.
HIDIFFUSION, HYPERTILE, BOTH, HIRES = "hidiffusion", "hypertile", "both", "hires"
ROUTE_LABELS = {
    VANILLA: "vanilla", HIDIFFUSION: "HiDiffusion", HYPERTILE: "Hypertile (webui defaults)",
    BOTH: "RAU-Net + Hypertile (HiDiffusion with Hypertile's U-Net option on)", HIRES: "hires fix",
}
HIRES_FIRST = "hires_first"
# How the report and the chart name the architectures.
NAMES = {"sd15": "SD 1.5", "sd21": "SD 2.1", "sdxl": "SDXL"}


@dataclass(frozen=True)
class Config:
    """One U-Net state to time.

    key: short name ("vanilla", "idle", "mswmsa", "raunet", ...). label: for people.
    settings: what the engine applies; None for the unpatched U-Net.
    step: the step to tell the engine (and, under Hypertile, the step of the pass whose tile
    draws the timed forward uses). steps: the steps of the pass run in this state.
    switches: (main, extra) RAU-Net switches active in this state. route: see the module.
    hypertile: Hypertile tiles this forward; draws: where its tile draws start (None: at the
    seed). pixels: the forward's image size when it is not the benchmarked one (hires fix).
    """

    key: str
    label: str
    settings: Settings | None
    step: int
    steps: tuple[int, ...]
    switches: tuple[bool, bool] = (False, False)
    route: str = HIDIFFUSION
    hypertile: bool = False
    draws: object = field(default=None, compare=False, repr=False)
    pixels: tuple[int, int] | None = None

    @property
    def compared(self) -> bool:
        """Whether the authors' package runs this configuration too."""
        return self.route in (VANILLA, HIDIFFUSION)


_PHASES = {
    (False, False): ("mswmsa", "MSW-MSA only"),
    (True, False): ("raunet", "RAU-Net + MSW-MSA"),
    (True, True): ("raunet_t2", "RAU-Net T1+T2 + MSW-MSA"),
    (False, True): ("raunet_extra", "RAU-Net (extra RAD) + MSW-MSA"),
}


def phases(schedule: Schedule, steps: int) -> dict[tuple[bool, bool], tuple[int, ...]]:
    """(main, extra) -> the steps of an N-step pass in that state, in order of first use."""
    found: dict[tuple[bool, bool], list[int]] = {}
    for step in range(steps):
        found.setdefault(active_switches(schedule, step, steps), []).append(step)
    return {state: tuple(s) for state, s in found.items()}


def configs(schedule: Schedule, steps: int, settings: Settings, idle: bool = True, hypertile: bool = False,
            hires_first: tuple[int, int] | None = None) -> list[Config]:
    """The configurations for one size: vanilla, optionally the idle patch (installed, nothing
    active: its cost alone), then each state of the pass, the fastest last; with ``hypertile``,
    Hypertile alone (all steps) and each RAU-Net state under Hypertile with MSW-MSA off; with
    ``hires_first`` (width, height), the hires fix's first pass: vanilla at that size."""
    every = tuple(range(steps))
    result = [Config(VANILLA, "vanilla (unpatched)", None, 0, every, route=VANILLA)]
    if idle:
        result.append(idle_config(settings))
    states = phases(schedule, steps)
    ordered = sorted(states, key=lambda s: (s[0] + s[1], s[1]))
    for state in ordered:
        key, label = _PHASES[state]
        result.append(Config(key, label, settings, states[state][0], states[state], state))
    if hypertile:
        result.append(Config(HYPERTILE, "Hypertile (webui defaults)", None, 0, every, route=HYPERTILE,
                             hypertile=True))
        aside = Settings(**{**settings.as_dict(), "mswmsa": False})
        for state in ordered:
            if any(state):
                key, label = _PHASES[state]
                result.append(Config(f"{key}_hypertile", label.replace("MSW-MSA", "Hypertile"), aside,
                                     states[state][0], states[state], state, route=BOTH, hypertile=True))
    if hires_first is not None:
        result.append(Config(HIRES_FIRST, f"vanilla at {hires_first[0]}x{hires_first[1]} (hires fix first pass)",
                             None, 0, every, route=HIRES, pixels=hires_first))
    return result


def idle_config(settings: Settings) -> Config:
    """HiDiffusion installed with every part off at every step: the cost of the patch alone."""
    off = Settings(**{**settings.as_dict(), "mswmsa": False, "t1": 0.0, "t2": 0.0, "aggressive": False})
    return Config(IDLE, "HiDiffusion idle (patched, all off)", off, 0, (), route=IDLE)


def step_ranges(steps: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2, 5"."""
    parts, start = [], None
    for i, step in enumerate(steps):
        if start is None:
            start = step
        if i + 1 == len(steps) or steps[i + 1] != step + 1:
            parts.append(f"{start}" if start == step else f"{start}-{step}")
            start = None
    return ", ".join(parts)
