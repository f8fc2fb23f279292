"""Run a benchmark: build each architecture, count FLOPs, time every configuration.

With the reference compared, each configuration runs on the engine and on the authors' package
forward after forward (which first alternates between rounds), so both see the same machine
state; repeats go round all configurations again rather than repeating one. Patches are applied before the clock starts
and removed after it stops. Each size starts with an untimed vanilla forward per side.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..patching import apply
from ..schedule import resolve
from ..settings import Settings
from ..state import shift_indices
from .attention import ldm_attention, set_diffusers_attention
from .flops import count_flops
from .measure import Sample, measure, synchronize
from .models import ARCHITECTURES, build_unet, example_inputs
from .plan import IDLE, Config, configs, idle_config
from .precision import ldm_precision
from .results import ENGINE, REFERENCE, BenchResult, ConfigResult, SizeResult, Timing
from .system import describe

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SIZES = {"sd15": (1024, 1024), "sd21": (1024, 1024), "sdxl": (2048, 2048)}
WARMUP_LATENT = 16
# Forwards of each kind that time the idle patch's fixed cost at WARMUP_LATENT.
IDLE_SAMPLES = 8


@dataclass
class Options:
    """archs: architectures of :mod:`hidiffusion_lib.bench.models`. sizes: (width, height) in pixels;
    None = each architecture's default. batch: U-Net batch (2 = one image with CFG). steps: pass
    length of the whole-generation estimate. repeats: forwards per configuration (the fastest
    counts). device, dtype, attention: where and how the U-Nets run. threads: torch CPU threads
    (None: torch's default). compare_reference: also time the authors' package. idle: time the
    installed patch with everything off. memory: measure peak memory. channels: width of a
    scaled-down architecture (tests); None = the real one. seed: weights and inputs."""

    archs: list[str] = field(default_factory=lambda: ["sd15"])
    sizes: list[tuple[int, int]] | None = None
    batch: int = 2
    steps: int = 20
    repeats: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "sdp"
    threads: int | None = None
    compare_reference: bool = False
    idle: bool = True
    memory: bool = True
    channels: int | None = None
    seed: int = 0

    def sizes_for(self, arch: str) -> list[tuple[int, int]]:
        return self.sizes or [DEFAULT_SIZES[arch]]

    def plan(self, arch: str, width: int, height: int) -> list[Config]:
        if width % 8 or height % 8 or width <= 0 or height <= 0:
            raise ValueError(f"{width}x{height}: sizes must be positive multiples of 8 pixels")
        settings = Settings(seed=self.seed)
        schedule = resolve(settings, ARCHITECTURES[arch][0], height // 8, width // 8)
        return configs(schedule, self.steps, settings, self.idle)

    def forwards(self) -> int:
        """Timed forwards of the whole run (for a progress bar)."""
        sides = 2 if self.compare_reference else 1
        count = 0
        for arch in self.archs:
            for width, height in self.sizes_for(arch):
                count += sum(1 if c.key == IDLE else sides for c in self.plan(arch, width, height))
        return count * self.repeats


# progress(what, done): ``what`` is starting (done False), or one timed forward ended (done True).
Progress = Callable[[str, bool], None]


def run(options: Options, progress: Progress | None = None) -> BenchResult:
    """Benchmark every architecture and size of ``options``, reporting to ``progress``."""
    device = torch.device(options.device)
    dtype = DTYPES[options.dtype]
    if options.threads:
        torch.set_num_threads(options.threads)
    for arch in options.archs:  # bad sizes fail before minutes of work
        for width, height in options.sizes_for(arch):
            options.plan(arch, width, height)
    result = BenchResult(describe(options, device))
    report = progress or (lambda what, done: None)
    for arch in options.archs:
        report(f"{arch}: building the U-Net{'s' if options.compare_reference else ''}", False)
        sides = _Sides.build(arch, options, device, dtype)
        with ldm_attention(options.attention), ldm_precision(dtype), torch.no_grad():
            report(f"{arch}: warming up", False)
            sides.warm_up(options.batch)
            if options.idle:
                report(f"{arch}: timing the idle patch on a small map", False)
            idle_cost = sides.idle_cost(options) if options.idle else None
            for width, height in options.sizes_for(arch):
                size = _run_size(arch, width, height, options, sides, report)
                size.idle_cost = idle_cost
                result.sizes.append(size)
        del sides
        gc.collect()
    result.meta["load_average_end"] = list(os.getloadavg())
    return result


@dataclass
class _Sides:
    """The engine's U-Net and the reference's twin, each with a "meta" copy for FLOP counts."""

    arch: str
    unet: torch.nn.Module
    meta_unet: torch.nn.Module
    twin: torch.nn.Module | None
    meta_twin: torch.nn.Module | None
    device: torch.device

    @classmethod
    def build(cls, arch: str, options: Options, device: torch.device, dtype: torch.dtype) -> _Sides:
        unet = build_unet(arch, options.seed, device, dtype, options.channels)
        meta_unet = build_unet(arch, None, "meta", dtype, options.channels)
        twin = meta_twin = None
        if options.compare_reference:
            from .reference import make_twin

            twin, meta_twin = make_twin(unet), make_twin(meta_unet)
            set_diffusers_attention(twin, options.attention)
            set_diffusers_attention(meta_twin, options.attention)
        return cls(ARCHITECTURES[arch][0], unet, meta_unet, twin, meta_twin, device)

    def warm_up(self, batch: int) -> None:
        """One small forward each: thread pools and kernels start outside the timings."""
        inputs = example_inputs(self.unet, batch, WARMUP_LATENT, WARMUP_LATENT)
        with self.engine(None, inputs, 1) as call:
            call()
        if self.twin is not None:
            with self.reference(None, inputs) as call:
                call()
        synchronize(self.device)

    def idle_cost(self, options: Options) -> float:
        """Seconds the installed, all-off patch adds to a forward: its hooks are fixed costs in
        Python, so they are timed on a small map, where noise is a fraction of a millisecond,
        vanilla and idle in turn, best of IDLE_SAMPLES each."""
        inputs = example_inputs(self.unet, options.batch, WARMUP_LATENT, WARMUP_LATENT)
        idle = idle_config(Settings(seed=options.seed))
        best = {"vanilla": float("inf"), "idle": float("inf")}
        for _ in range(IDLE_SAMPLES):
            for key, config in (("vanilla", None), ("idle", idle)):
                with self.engine(config, inputs, 1) as call:
                    best[key] = min(best[key], measure(call, self.device, memory=False)[0].seconds)
        return best["idle"] - best["vanilla"]

    @contextmanager
    def engine(self, config: Config | None, inputs: tuple, steps: int, meta: bool = False) -> Iterator[Callable]:
        """A call of the engine's U-Net in ``config``'s state (None: unpatched)."""
        unet = self.meta_unet if meta else self.unet
        x, t, context = inputs
        patched = config is not None and config.settings is not None
        with apply(unet, config.settings) if patched else nullcontext() as handle:
            if patched:
                handle.set_step(config.step, steps)
            yield lambda: unet(x, timesteps=t, context=context)

    @contextmanager
    def reference(self, config: Config | None, inputs: tuple, meta: bool = False) -> Iterator[Callable]:
        """A call of the authors' package in ``config``'s state, with the engine's window shifts."""
        from .reference import WINDOWED, ReferenceRun, run_diffusers

        twin = self.meta_twin if meta else self.twin
        x, t, context = inputs
        if config is None or config.settings is None:
            yield lambda: run_diffusers(twin, x, t, context)
            return
        # A one-step pass with ratios 1 or 0 puts the reference in this state at its step 0.
        main, extra = config.switches
        shifts = shift_indices(config.settings, config.step, WINDOWED[self.arch])
        with ReferenceRun(twin, self.arch, 1, t1=float(main), t2=float(extra), aggressive=False) as reference:
            yield lambda: reference(x, t, context, shifts)


def _run_size(arch: str, width: int, height: int, options: Options, sides: _Sides,
              progress: Progress) -> SizeResult:
    from .reference import max_diff

    latent_h, latent_w = height // 8, width // 8
    plan = options.plan(arch, width, height)
    schedule = resolve(Settings(seed=options.seed), sides.arch, latent_h, latent_w)
    size = SizeResult(arch, width, height, options.batch, options.steps, schedule.preset, schedule.t1,
                      schedule.t2, schedule.aggressive)
    compare = sides.twin is not None
    progress(f"{arch} {width}x{height}: counting FLOPs", False)
    meta_inputs = example_inputs(sides.meta_unet, options.batch, latent_h, latent_w)
    for config in plan:
        with sides.engine(config, meta_inputs, options.steps, meta=True) as call:
            row = ConfigResult(config.key, config.label, config.steps, config.switches, Timing(flops=count_flops(call)))
        if compare and config.key != IDLE:
            with sides.reference(config, meta_inputs, meta=True) as call:
                row.reference = Timing(flops=count_flops(call))
        size.configs.append(row)

    inputs = example_inputs(sides.unet, options.batch, latent_h, latent_w, seed=options.seed + 1)
    label = f"{arch} {width}x{height}"
    # The first forward at a new peak size runs ~20% slower on a CPU (the heap grows): untimed.
    progress(f"{label}: warming up", False)
    with sides.engine(None, inputs, options.steps) as call:
        call()
    if compare:
        with sides.reference(None, inputs) as call:
            call()
    for repeat in range(options.repeats):
        memory = options.memory and repeat == 0
        for config, row in zip(plan, size.configs, strict=True):
            runs = [(ENGINE, row.engine, config.key)]
            if row.reference is not None:
                runs.append((REFERENCE, row.reference, f"{config.key}, authors' package"))
            outputs = {}
            # Who goes first alternates between rounds, so neither side always follows the other.
            for side, timing, what in runs if repeat % 2 == 0 else runs[::-1]:
                progress(f"{label}: {what}", False)
                with sides.engine(config, inputs, options.steps) if side == ENGINE else sides.reference(
                        config, inputs) as call:
                    sample, outputs[side] = measure(call, sides.device, memory)
                _record(timing, sample, options.repeats)
                progress(f"{label}: {what}", True)
            if repeat == 0 and len(outputs) == 2:
                row.max_diff = max_diff(outputs[ENGINE], outputs[REFERENCE])
            del outputs
    return size


def _record(timing: Timing, sample: Sample, repeats: int) -> None:
    if sample.peak_bytes is not None:
        timing.peak_bytes = sample.peak_bytes
    # A forward under the profiler runs a little slower: time it only when it is the only one.
    if not (sample.profiled and repeats > 1):
        timing.seconds.append(sample.seconds)
