"""Benchmark results: what was measured, and the speed-ups derived from it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .plan import IDLE, VANILLA

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
    """key/label/steps/switches: see :class:`.plan.Config`. reference: the authors' package
    (None when not compared). max_diff: largest output difference between the two, relative
    to the reference's largest magnitude."""

    key: str
    label: str
    steps: tuple[int, ...]
    switches: tuple[bool, bool]
    engine: Timing
    reference: Timing | None = None
    max_diff: float | None = None

    def timing(self, side: str) -> Timing | None:
        return self.engine if side == ENGINE else self.reference


@dataclass
class SizeResult:
    """All configurations of one architecture at one size; ``steps`` is the pass length of the
    whole-generation estimate, with ``preset``'s ratios ``t1``/``t2``. idle_cost: seconds the
    installed, all-off patch adds to a forward, timed on a small map (None: not measured)."""

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

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    def config(self, key: str) -> ConfigResult:
        return next(c for c in self.configs if c.key == key)

    def speedup(self, key: str, side: str = ENGINE) -> float | None:
        """Vanilla's best time over this configuration's, on the same implementation."""
        vanilla, timing = self.config(VANILLA).timing(side), self.config(key).timing(side)
        if vanilla is None or timing is None or not timing.seconds:
            return None
        return vanilla.best / timing.best

    def flop_ratio(self, key: str, side: str = ENGINE) -> float | None:
        vanilla, timing = self.config(VANILLA).timing(side), self.config(key).timing(side)
        if vanilla is None or timing is None or not timing.flops:
            return None
        return vanilla.flops / timing.flops

    def phases(self) -> list[ConfigResult]:
        """The configurations a HiDiffusion pass runs in, each for its ``steps``."""
        return [c for c in self.configs if c.key not in (VANILLA, IDLE)]

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
class BenchResult:
    """meta: machine, versions, date, options, load average; sizes: one per (arch, size)."""

    meta: dict
    sizes: list[SizeResult] = field(default_factory=list)
