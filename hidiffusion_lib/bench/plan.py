"""What a benchmark times at one size: the configurations and the steps each one stands for.

A sampling pass of N steps runs the U-Net in a few distinct states, set by the preset's T1/T2
(see :func:`hidiffusion_lib.active_switches`): e.g. SD 1.5 at 1024 px, 20 steps: RAU-Net +
MSW-MSA for steps 0-7, MSW-MSA only for steps 8-19. Timing one forward per state gives the
whole generation's U-Net time without running N forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..schedule import Schedule, active_switches
from ..settings import Settings

VANILLA, IDLE = "vanilla", "idle"


@dataclass(frozen=True)
class Config:
    """One U-Net state to time.

    key: short name ("vanilla", "idle", "mswmsa", "raunet", ...). label: for people.
    settings: what the engine applies; None for the unpatched U-Net.
    step: the step to tell the engine. steps: the steps of the pass run in this state.
    switches: (main, extra) RAU-Net switches active in this state.
    """

    key: str
    label: str
    settings: Settings | None
    step: int
    steps: tuple[int, ...]
    switches: tuple[bool, bool] = (False, False)


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


def configs(schedule: Schedule, steps: int, settings: Settings, idle: bool = True) -> list[Config]:
    """The configurations for one size: vanilla, optionally the idle patch (installed, nothing
    active: its cost alone), then each state of the pass, the fastest last."""
    result = [Config(VANILLA, "vanilla (unpatched)", None, 0, tuple(range(steps)))]
    if idle:
        result.append(idle_config(settings))
    states = phases(schedule, steps)
    for state in sorted(states, key=lambda s: (s[0] + s[1], s[1])):
        key, label = _PHASES[state]
        result.append(Config(key, label, settings, states[state][0], states[state], state))
    return result


def idle_config(settings: Settings) -> Config:
    """HiDiffusion installed with every part off at every step: the cost of the patch alone."""
    off = Settings(**{**settings.as_dict(), "mswmsa": False, "t1": 0.0, "t2": 0.0, "aggressive": False})
    return Config(IDLE, "HiDiffusion idle (patched, all off)", off, 0, ())


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
