"""Run a benchmark: build each architecture, count FLOPs, time every configuration.

With the reference compared, each configuration runs on the engine and on the authors' package
forward after forward (which first alternates between rounds), so both see the same machine
state; repeats go round all configurations again rather than repeating one. Patches are applied
before the clock starts and removed after it stops. Each size starts with an untimed forward per
side (of its cheapest state: see :func:`_warm_up_config`). All FLOPs are counted before the
first timed forward, so the run can say how long it will take (see :mod:`.progress`).

With the webui's Hypertile (``hypertile_dir``), its rows run on the same U-Net, same weights,
same run: Hypertile hooked as the webui's script hooks it, before HiDiffusion, for the forward
only, then taken off again (see :mod:`.hypertile`).
"""

from __future__ import annotations

import gc
import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..patching import apply
from ..schedule import resolve
from ..settings import Settings
from ..state import shift_indices
from . import hires as hires_fix
from . import hypertile as ht
from .attention import ldm_attention, set_diffusers_attention
from .flops import count_flops
from .measure import Sample, measure, release_memory, synchronize
from .models import ARCHITECTURES, build_unet, example_inputs
from .plan import BOTH, HYPERTILE, Config, configs, idle_config
from .precision import ldm_precision
from .progress import Progress
from .results import ENGINE, REFERENCE, BenchResult, ConfigResult, HypertileRun, SizeResult, Timing
from .system import describe

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_SIZES = {"sd15": (1024, 1024), "sd21": (1024, 1024), "sdxl": (2048, 2048)}
WARMUP_LATENT = 16
# Latent side of the forward whose speed predicts the run's duration (at most the run's largest):
# a 256 px forward ran at 0.4x the FLOP rate of a 1024 px one on a 2-core CPU, a 512 px one closer.
CALIBRATION_LATENT = 64
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
    scaled-down architecture (tests); None = the real one. seed: weights, inputs, Hypertile's
    draws. hypertile_dir: a webui checkout whose Hypertile to run (None: no Hypertile rows).
    hires: add the hires fix route; hires_scale: its "Upscale by" (None: from the native size);
    hires_steps: its hr_second_pass_steps (0 = steps); denoising: its denoising strength."""

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
    hypertile_dir: str | None = None
    hires: bool = True
    hires_scale: float | None = None
    hires_steps: int = 0
    denoising: float = hires_fix.DENOISING

    def sizes_for(self, arch: str) -> list[tuple[int, int]]:
        return self.sizes or [DEFAULT_SIZES[arch]]

    def hires_for(self, arch: str, width: int, height: int) -> hires_fix.Hires | None:
        if not self.hires:
            return None
        return hires_fix.plan(arch, width, height, self.steps, self.hires_scale, self.hires_steps, self.denoising)

    def plan(self, arch: str, width: int, height: int) -> list[Config]:
        if width % 8 or height % 8 or width <= 0 or height <= 0:
            raise ValueError(f"{width}x{height}: sizes must be positive multiples of 8 pixels")
        settings = Settings(seed=self.seed)
        schedule = resolve(settings, ARCHITECTURES[arch][0], height // 8, width // 8)
        hires = self.hires_for(arch, width, height)
        return configs(schedule, self.steps, settings, self.idle, self.hypertile_dir is not None,
                       hires.first if hires else None)

    def forwards(self) -> int:
        """Timed forwards of the whole run."""
        sides = 2 if self.compare_reference else 1
        count = 0
        for arch in self.archs:
            for width, height in self.sizes_for(arch):
                count += sum(sides if c.compared else 1 for c in self.plan(arch, width, height))
        return count * self.repeats


def run(options: Options, progress: Progress | None = None) -> BenchResult:
    """Benchmark every architecture and size of ``options``, reporting to ``progress``."""
    device = torch.device(options.device)
    dtype = DTYPES[options.dtype]
    if options.threads:
        torch.set_num_threads(options.threads)
    for arch in options.archs:  # bad sizes fail before minutes of work
        for width, height in options.sizes_for(arch):
            options.plan(arch, width, height)
    engine = ht.load(options.hypertile_dir) if options.hypertile_dir is not None else None
    result = BenchResult(describe(options, device))
    result.meta["expected_seconds"] = 0.0
    result.meta["complete"] = False  # until every size is done (a partial JSON says so)
    report = progress or Progress()
    start = time.perf_counter()
    for arch in options.archs:
        report.doing(f"{arch}: building the U-Net{'s' if options.compare_reference else ''}")
        sides = _Sides.build(arch, options, device, dtype, engine)
        with ldm_attention(options.attention), ldm_precision(dtype), torch.no_grad():
            counted = [_count_size(arch, width, height, options, sides, report)
                       for width, height in options.sizes_for(arch)]
            report.doing(f"{arch}: warming up")
            sides.warm_up(options.batch)
            rate = sides.calibrate(options.batch, _calibration_latent(options, arch))
            result.meta.setdefault("calibration_flops_per_second", {})[arch] = rate
            work = [_work(size, plan, options) for size, plan in counted]
            flops = sum(w for w, _ in work)
            result.meta["expected_seconds"] += flops / rate
            report.planned(flops, flops / rate, sum(n for _, n in work))
            planned_at = time.perf_counter()
            if options.idle:
                report.doing(f"{arch}: timing the idle patch on a small map")
            idle_cost = sides.idle_cost(options) if options.idle else None
            for size, plan in counted:
                _time_size(size, plan, options, sides, report)
                size.idle_cost = idle_cost
                result.sizes.append(size)
                # the process's peak resident memory so far (weights included), in MiB
                result.meta["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                report.measured(result)
            result.meta["planned_seconds"] = result.meta.get("planned_seconds", 0.0) + time.perf_counter() - planned_at
        del sides
        gc.collect()
    result.meta["load_average_end"] = list(os.getloadavg())
    result.meta["elapsed_seconds"] = time.perf_counter() - start
    result.meta["complete"] = True
    return result


def estimate(options: Options, progress: Progress | None = None) -> list[dict]:
    """Count and calibrate as :func:`run` does, time nothing else: per architecture and size,
    {"label", "flops", "forwards", "seconds"} of the forwards a run would time there."""
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    if options.threads:
        torch.set_num_threads(options.threads)
    engine = ht.load(options.hypertile_dir) if options.hypertile_dir is not None else None
    report = progress or Progress()
    found = []
    for arch in options.archs:
        sides = _Sides.build(arch, options, device, dtype, engine)
        with ldm_attention(options.attention), ldm_precision(dtype), torch.no_grad():
            counted = [_count_size(arch, w, h, options, sides, report) for w, h in options.sizes_for(arch)]
            report.doing(f"{arch}: timing a small forward")
            sides.warm_up(options.batch)
            rate = sides.calibrate(options.batch, _calibration_latent(options, arch))
        for size, plan in counted:
            flops, forwards = _work(size, plan, options)
            found.append({"label": f"{arch} {size.width}x{size.height}", "flops": flops, "forwards": forwards,
                          "seconds": flops / rate})
        del sides
        gc.collect()
    return found


@dataclass
class _Sides:
    """The engine's U-Net and the reference's twin, each with a "meta" copy for FLOP counts;
    with Hypertile, a holder of each U-Net standing where the webui's ``sd_model.model`` stands."""

    arch: str
    unet: torch.nn.Module
    meta_unet: torch.nn.Module
    twin: torch.nn.Module | None
    meta_twin: torch.nn.Module | None
    device: torch.device
    seed: int = 0
    hypertile: ht.Hypertile | None = None
    holders: dict[bool, ht.Holder] = field(default_factory=dict)

    @classmethod
    def build(cls, arch: str, options: Options, device: torch.device, dtype: torch.dtype,
              hypertile: ht.Hypertile | None = None) -> _Sides:
        unet = build_unet(arch, options.seed, device, dtype, options.channels)
        meta_unet = build_unet(arch, None, "meta", dtype, options.channels)
        twin = meta_twin = None
        if options.compare_reference:
            from .reference import make_twin

            twin, meta_twin = make_twin(unet), make_twin(meta_unet)
            set_diffusers_attention(twin, options.attention)
            set_diffusers_attention(meta_twin, options.attention)
        holders = {False: ht.Holder(unet), True: ht.Holder(meta_unet)} if hypertile else {}
        return cls(ARCHITECTURES[arch][0], unet, meta_unet, twin, meta_twin, device, options.seed, hypertile, holders)

    def warm_up(self, batch: int) -> None:
        """One small forward each: thread pools and kernels start outside the timings."""
        inputs = example_inputs(self.unet, batch, WARMUP_LATENT, WARMUP_LATENT)
        with self.engine(None, inputs, 1) as call:
            call()
        if self.twin is not None:
            with self.reference(None, inputs) as call:
                call()
        synchronize(self.device)

    def calibrate(self, batch: int, latent: int) -> float:
        """FLOP/s of a vanilla forward on a latent x latent map."""
        inputs = example_inputs(self.unet, batch, latent, latent)
        meta_inputs = example_inputs(self.meta_unet, batch, latent, latent)
        with self.engine(None, meta_inputs, 1, meta=True) as call:
            flops = count_flops(call)
        with self.engine(None, inputs, 1) as call:
            seconds = measure(call, self.device, memory=False)[0].seconds
        return flops / max(seconds, 1e-9)

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
        """A call of the engine's U-Net in ``config``'s state (None: unpatched); under Hypertile
        when the config says so, hooked first as in the webui (its script's ``process`` runs
        before HiDiffusion patches the pass), with the config's tile draws."""
        unet = self.meta_unet if meta else self.unet
        x, t, context = inputs
        with ExitStack() as stack:
            if config is not None and config.hypertile:
                stack.enter_context(self.tiled(inputs, meta, config.draws))
            if config is not None and config.settings is not None:
                stack.enter_context(apply(unet, config.settings)).set_step(config.step, steps)
            yield lambda: unet(x, timesteps=t, context=context)

    def tiled(self, inputs: tuple, meta: bool, draws: object | None = None):
        """Hypertile on the U-Net for the image size of ``inputs``, seeded as the webui seeds it."""
        latent_h, latent_w = inputs[0].shape[-2:]
        return ht.tiled(self.hypertile, self.holders[meta], latent_w * 8, latent_h * 8, self.seed,
                        self.arch == "sdxl", draws)

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

    def replay(self, route: str, settings: Settings, inputs: tuple, steps: int) -> tuple[list[int], list[object]]:
        """A whole ``steps``-step pass of ``route`` under Hypertile on the meta U-Net, from the
        seed: the FLOPs of every step and where Hypertile's draws stood before it."""
        flops, draws = [], []
        x, t, context = inputs
        with ExitStack() as stack:
            stack.enter_context(self.tiled(inputs, meta=True))
            handle = stack.enter_context(apply(self.meta_unet, settings)) if route == BOTH else None
            for step in range(steps):
                draws.append(ht.draws(self.hypertile))
                if handle is not None:
                    handle.set_step(step, steps)
                flops.append(count_flops(lambda: self.meta_unet(x, timesteps=t, context=context)))
        return flops, draws


def _calibration_latent(options: Options, arch: str) -> int:
    largest = max(min(w, h) for w, h in options.sizes_for(arch)) // 8
    return max(8, min(CALIBRATION_LATENT, largest) // 8 * 8)


def _latent(config: Config, width: int, height: int) -> tuple[int, int]:
    pixels = config.pixels or (width, height)
    return pixels[1] // 8, pixels[0] // 8


def _count_size(arch: str, width: int, height: int, options: Options, sides: _Sides,
                progress: Progress) -> tuple[SizeResult, list[Config]]:
    """The size's result with the FLOPs of every configuration, and the plan to time; under
    Hypertile, whole passes are replayed step by step and each Hypertile configuration gets the
    step of its pass nearest its mean FLOPs, with that step's draws."""
    latent_h, latent_w = height // 8, width // 8
    plan = options.plan(arch, width, height)
    schedule = resolve(Settings(seed=options.seed), sides.arch, latent_h, latent_w)
    size = SizeResult(arch, width, height, options.batch, options.steps, schedule.preset, schedule.t1,
                      schedule.t2, schedule.aggressive, hires=options.hires_for(arch, width, height))
    label = f"{arch} {width}x{height}"
    if sides.hypertile is not None:
        engine = sides.hypertile
        size.hypertile = HypertileRun(str(engine.path), engine.max_depth, engine.tile_size_max, engine.swap_size,
                                      options.seed)
        plan = _place_tiled(plan, size, options, sides, progress, label)
    progress.doing(f"{label}: counting FLOPs")
    for config in plan:
        meta_inputs = example_inputs(sides.meta_unet, options.batch, *_latent(config, width, height))
        if config.hypertile:
            flops = size.hypertile.pass_flops[config.route][config.step]
        else:
            with sides.engine(config, meta_inputs, options.steps, meta=True) as call:
                flops = count_flops(call)
        row = ConfigResult(config.key, config.label, config.steps, config.switches, Timing(flops=flops),
                           route=config.route, step=config.step, pixels=config.pixels)
        if sides.twin is not None and config.compared:
            with sides.reference(config, meta_inputs, meta=True) as call:
                row.reference = Timing(flops=count_flops(call))
        size.configs.append(row)
    return size, plan


def _place_tiled(plan: list[Config], size: SizeResult, options: Options, sides: _Sides, progress: Progress,
                 label: str) -> list[Config]:
    inputs = example_inputs(sides.meta_unet, options.batch, size.height // 8, size.width // 8)
    placed = []
    for route in (HYPERTILE, BOTH):
        tiled = [c for c in plan if c.route == route]
        if not tiled and route == BOTH:
            continue
        progress.doing(f"{label}: replaying Hypertile's draws, {options.steps} steps ({route})")
        settings = tiled[0].settings if route == BOTH else Settings(seed=options.seed)
        flops, draws = sides.replay(route, settings, inputs, options.steps)
        size.hypertile.pass_flops[route] = flops
        for config in tiled:
            mean = sum(flops[s] for s in config.steps) / len(config.steps)
            step = min(config.steps, key=lambda s: abs(flops[s] - mean))
            placed.append(replace(config, step=step, draws=draws[step]))
    by_key = {c.key: c for c in placed}
    return [by_key.get(c.key, c) for c in plan]


def _warm_up_config(plan: list[Config], size: SizeResult) -> tuple[Config, ConfigResult]:
    """The warm-up of a size: its cheapest vanilla or HiDiffusion state. Every state reaches the
    same peak memory (the full-size top level sets it), so the cheapest grows the heap as far as
    vanilla would, at a fraction of the time."""
    pairs = [(c, r) for c, r in zip(plan, size.configs, strict=True) if c.compared]
    return min(pairs, key=lambda pair: pair[1].engine.flops)


def _work(size: SizeResult, plan: list[Config], options: Options) -> tuple[int, int]:
    """(FLOPs, forwards) still to run for a size: its warm-up, then every timed forward."""
    warm = _warm_up_config(plan, size)[1]
    flops = warm.engine.flops + (warm.reference.flops if warm.reference else 0)
    forwards = 1 + (warm.reference is not None)
    for row in size.configs:
        flops += options.repeats * (row.engine.flops + (row.reference.flops if row.reference else 0))
        forwards += options.repeats * (1 + (row.reference is not None))
    return flops, forwards


def _time_size(size: SizeResult, plan: list[Config], options: Options, sides: _Sides, progress: Progress) -> None:
    from .reference import max_diff

    width, height = size.width, size.height
    inputs = example_inputs(sides.unet, options.batch, height // 8, width // 8, seed=options.seed + 1)
    label = f"{size.arch} {width}x{height}"
    release_memory()
    # The first forward at a new peak size runs ~20% slower on a CPU (the heap grows): untimed.
    config, row = _warm_up_config(plan, size)
    progress.doing(f"{label}: warming up ({config.key})")
    with sides.engine(config, inputs, options.steps) as call:
        call()
    progress.did(row.engine.flops)
    if row.reference is not None:
        with sides.reference(config, inputs) as call:
            call()
        progress.did(row.reference.flops)
    others = {}  # inputs at another size (the hires fix's first pass)
    for repeat in range(options.repeats):
        memory = options.memory and repeat == 0
        for config, row in zip(plan, size.configs, strict=True):
            if config.pixels is None:
                here = inputs
            else:
                here = others.get(config.pixels) or example_inputs(
                    sides.unet, options.batch, *_latent(config, width, height), seed=options.seed + 1)
                others[config.pixels] = here
            runs = [(ENGINE, row.engine, config.key)]
            if row.reference is not None:
                runs.append((REFERENCE, row.reference, f"{config.key}, authors' package"))
            outputs = {}
            # Who goes first alternates between rounds, so neither side always follows the other.
            for side, timing, what in runs if repeat % 2 == 0 else runs[::-1]:
                progress.doing(f"{label}: {what}")
                with sides.engine(config, here, options.steps) if side == ENGINE else sides.reference(
                        config, here) as call:
                    sample, outputs[side] = measure(call, sides.device, memory)
                _record(timing, sample, options.repeats)
                progress.did(timing.flops)
            if repeat == 0 and len(outputs) == 2:
                row.max_diff = max_diff(outputs[ENGINE], outputs[REFERENCE])
            del outputs


def _record(timing: Timing, sample: Sample, repeats: int) -> None:
    if sample.peak_bytes is not None:
        timing.peak_bytes = sample.peak_bytes
    # A forward under the profiler runs a little slower: time it only when it is the only one.
    if not (sample.profiled and repeats > 1):
        timing.seconds.append(sample.seconds)
