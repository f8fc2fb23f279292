"""Benchmark results: what was measured, and the speed-ups and whole generations derived from it.

A whole generation per route (see :mod:`.plan`), U-Net time only: vanilla and hires fix are
their forwards times their steps; HiDiffusion sums its states, each timed once, over the steps
it runs them. Hypertile draws its tiles afresh on every forward, so every step of a pass costs
a little differently: the FLOPs of each step are counted (its draws replayed from the seed), one
step per state is timed (the one nearest the state's mean FLOPs), and every other step of that
state gets the timed one's seconds plus the FLOPs it differs by, at the seconds per FLOP that
Hypertile's tiling saves at this size (vanilla against the Hypertile row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .hires import Hires
from .plan import BOTH, HIDIFFUSION, HIRES, HIRES_FIRST, HYPERTILE, IDLE, VANILLA

ENGINE, REFERENCE = "engine", "reference"


@dataclass
class Timing:
    """One configuration on one implementation. seconds: every timed forward; peak_bytes: memory
    allocated above the starting point (None: not measured); flops: of one forward."""

    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    flops: int = 0

    @property
    def best(self) -> float:
        return min(self.seconds)


@dataclass
class ConfigResult:
    """key/label/steps/switches/route/step/pixels: see :class:`.plan.Config` (route None: vanilla
    and idle by key, else HiDiffusion). reference: the authors' package (None when not compared).
    max_diff: largest output difference between the two, relative to the reference's largest
    magnitude."""

    key: str
    label: str
    steps: tuple[int, ...]
    switches: tuple[bool, bool]
    engine: Timing
    reference: Timing | None = None
    max_diff: float | None = None
    route: str | None = None
    step: int = 0
    pixels: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.route is None:
            self.route = {VANILLA: VANILLA, IDLE: IDLE}.get(self.key, HIDIFFUSION)

    def timing(self, side: str) -> Timing | None:
        return self.engine if side == ENGINE else self.reference


@dataclass
class SizeResult:
    """All configurations of one architecture at one size; ``steps`` is the pass length of the
    whole-generation estimate, with ``preset``'s ratios ``t1``/``t2``. idle_cost: seconds the
    installed, all-off patch adds to a forward, timed on a small map (None: not measured).
    hypertile: the Hypertile runs of this size (None: not run). hires: the hires fix route."""

    arch: str
    width: int
    height: int
    batch: int
    steps: int
    preset: str
    t1: float
    t2: float
    aggressive: bool
    configs: list[ConfigResult] = field(default_factory=list)
    idle_cost: float | None = None
    hypertile: HypertileRun | None = None
    hires: Hires | None = None

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    def config(self, key: str) -> ConfigResult:
        return next(c for c in self.configs if c.key == key)

    def find(self, key: str) -> ConfigResult | None:
        return next((c for c in self.configs if c.key == key), None)

    def speedup(self, key: str, side: str = ENGINE) -> float | None:
        """Vanilla's best time over this configuration's, on the same implementation (None for
        a forward at another size)."""
        vanilla, config = self.config(VANILLA).timing(side), self.config(key)
        timing = config.timing(side)
        if vanilla is None or timing is None or not timing.seconds or config.pixels is not None:
            return None
        return vanilla.best / timing.best

    def flop_ratio(self, key: str, side: str = ENGINE) -> float | None:
        vanilla, config = self.config(VANILLA).timing(side), self.config(key)
        timing = config.timing(side)
        if vanilla is None or timing is None or not timing.flops or config.pixels is not None:
            return None
        return vanilla.flops / timing.flops

    def phases(self, route: str = HIDIFFUSION) -> list[ConfigResult]:
        """The configurations a pass of ``route`` runs in, each for its ``steps``."""
        return [c for c in self.configs if c.route == route and c.key not in (VANILLA, IDLE)]

    def routes(self, side: str = ENGINE) -> list[str]:
        """The routes with a whole generation at this size, besides vanilla."""
        return [r for r in (HIDIFFUSION, HYPERTILE, BOTH, HIRES) if self.route_total(r, side) is not None]

    def route_total(self, route: str, side: str = ENGINE, what: str = "seconds") -> float | None:
        """U-Net total of a whole generation by ``route`` (see the module): seconds or flops."""
        def value(timing: Timing) -> float:
            return timing.best if what == "seconds" else timing.flops

        vanilla = self.config(VANILLA).timing(side)
        if vanilla is None or not vanilla.seconds:
            return None
        if route == VANILLA:
            return value(vanilla) * self.steps
        if route == HIDIFFUSION:
            timings = [(c.timing(side), len(c.steps)) for c in self.phases()]
            if not timings or any(t is None or not t.seconds for t, _ in timings):
                return None
            return sum(value(t) * n for t, n in timings)
        if route == HIRES:
            first = self.find(HIRES_FIRST)
            if self.hires is None or first is None or first.timing(side) is None or not first.timing(side).seconds:
                return None
            return value(first.timing(side)) * self.hires.first_steps + value(vanilla) * self.hires.second_steps
        if route in (HYPERTILE, BOTH) and side == ENGINE and self.hypertile is not None:
            return self._tiled_total(route, what)
        return None

    def _tiled_total(self, route: str, what: str) -> float | None:
        alone = self.find(HYPERTILE)
        flops = self.hypertile.pass_flops.get(route)
        if alone is None or not flops or not all(c.engine.seconds for c in [alone, *self.phases(route)]):
            return None
        if what == "flops":
            return float(sum(flops))
        state = {step: c for c in self.phases(route) for step in c.steps} if route == BOTH else {}
        slope = self.hypertile_slope()
        total = 0.0
        for step, step_flops in enumerate(flops):
            timed = state.get(step, alone).engine
            total += timed.best + slope * (step_flops - timed.flops)
        return total

    def hypertile_slope(self) -> float:
        """Seconds per FLOP that Hypertile's tiling saves here: vanilla against the Hypertile row
        (0 when its forward tiled nothing)."""
        vanilla, alone = self.config(VANILLA).engine, self.find(HYPERTILE)
        if alone is None or alone.engine.flops == vanilla.flops:
            return 0.0
        return (vanilla.best - alone.engine.best) / (vanilla.flops - alone.engine.flops)

    def generation(self, side: str = ENGINE, what: str = "seconds") -> tuple[float, float] | None:
        """(vanilla, HiDiffusion) U-Net totals of a whole ``steps``-step pass: seconds or flops."""
        def value(timing: Timing) -> float:
            return timing.best if what == "seconds" else timing.flops

        vanilla = self.config(VANILLA).timing(side)
        timings = [(c.timing(side), len(c.steps)) for c in self.phases()]
        if vanilla is None or any(t is None or not t.seconds for t, _ in timings):
            return None
        return value(vanilla) * self.steps, sum(value(t) * n for t, n in timings)


@dataclass
class HypertileRun:
    """The webui's Hypertile at one size: where its engine came from, the U-Net settings and
    seed passed to it, and per route (HYPERTILE alone, BOTH) the FLOPs of every step of a pass."""

    path: str
    max_depth: int
    tile_size_max: int
    swap_size: int
    seed: int
    pass_flops: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class BenchResult:
    """meta: machine, versions, date, options, load average; sizes: one per (arch, size)."""

    meta: dict
    sizes: list[SizeResult] = field(default_factory=list)
