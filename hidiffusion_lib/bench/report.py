"""Benchmark results as a text table for people, and as JSON and CSV for programs."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from .plan import BOTH, HIDIFFUSION, HIRES, HYPERTILE, IDLE, NAMES, ROUTE_LABELS, VANILLA, step_ranges
from .progress import duration
from .results import ENGINE, REFERENCE, BenchResult, ConfigResult, SizeResult, Timing

BUSY_LOAD = 0.5  # a load average above this means other work shared the cores
CSV_FIELDS = (
    "arch", "width", "height", "batch", "config", "label", "steps", "implementation", "seconds_best",
    "seconds_all", "speedup", "gflops", "flop_ratio", "peak_mib", "max_diff", "route", "forward_px", "timed_step",
)


def _seconds(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _flops(value: int) -> str:
    return f"{value / 1e12:.2f} TFLOP" if value >= 1e11 else f"{value / 1e9:.2f} GFLOP"


def header(result: BenchResult) -> list[str]:
    meta = result.meta
    options = meta["options"]
    where = meta["accelerator"] or f"{meta['cpu']}, {meta['cpu_count']} cores, {meta['threads']} threads"
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    lines = [
        f"HiDiffusion benchmark, {meta['date']}",
        f"device {meta['device']} ({where}), {options['dtype']}, {options['attention']} attention",
        versions,
    ]
    start, end = meta["load_average_start"][0], meta.get("load_average_end", [0.0])[0]
    lines.append(f"load average (1 min): {start:.2f} at start, {end:.2f} at end (this run keeps {meta['threads']}"
                 f" busy){'  BUSY: other work shared the machine, timings are unreliable' if busy(meta) else ''}")
    if "elapsed_seconds" in meta:
        lines.append(f"the run took {duration(meta['elapsed_seconds'])}, {duration(meta['planned_seconds'])} of it"
                     f" in the timed forwards (expected {duration(meta['expected_seconds'])} from their FLOPs and the"
                     " speed of a small forward)")
    return lines


def busy(meta: dict) -> bool:
    """Whether other work ran: load before the start, or above this run's own threads at the end
    (on a GPU the run keeps about one CPU thread busy)."""
    own = meta["threads"] if meta["device"] == "cpu" else 1
    start, end = meta["load_average_start"][0], meta.get("load_average_end", [0.0])[0]
    return start > BUSY_LOAD or end > own + BUSY_LOAD


def size_table(size: SizeResult, compare: bool) -> list[str]:
    """The table of one architecture and size, then its whole-generation estimate."""
    lines = [
        "",
        f"{NAMES.get(size.arch, size.arch)} architecture ({size.arch}, random weights), {size.width}x{size.height} px"
        f" (latent {size.latent[0]}x{size.latent[1]}), batch {size.batch}",
        f"preset {size.preset}: T1 {size.t1}, T2 {size.t2}{', aggressive' if size.aggressive else ''}; "
        f"a {size.steps}-step pass runs "
        + "; ".join(f"{c.label} at steps {step_ranges(c.steps)}" for c in size.phases()),
    ]
    columns = ["configuration", "steps", "time/step", "speed-up", "FLOPs", "FLOP ratio", "peak memory"]
    if compare:
        columns += ["| authors' pkg", "speed-up", "peak memory", "max diff"]
    rows = [columns]
    for c in size.configs:
        row = [c.label, _steps_cell(c, size.steps), _seconds(c.engine.best), _ratio(size.speedup(c.key)),
               _flops(c.engine.flops), _ratio(size.flop_ratio(c.key)), _mib(c.engine.peak_bytes)]
        if compare:
            ref = c.reference
            row += (["|", "", "", ""] if ref is None else [
                f"| {_seconds(ref.best)}", _ratio(size.speedup(c.key, REFERENCE)), _mib(ref.peak_bytes),
                f"{c.max_diff:.1e}" if c.max_diff is not None else ""])
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths,
                                                                                                        strict=True))))
    lines.append(_generation_line(size, compare))
    lines += _route_lines(size)
    spread = _spread(size)
    if spread:
        lines.append(spread)
    lines += [f"  [{'ok' if ok else 'MISSED'}] {name}" for name, ok in checks(size)]
    return lines


def _steps_cell(c: ConfigResult, steps: int) -> str:
    if c.route == IDLE:
        return "-"
    if c.route == HIRES:
        return "first pass"
    cell = "all" if len(c.steps) == steps else step_ranges(c.steps)
    return f"{cell} (as {c.step})" if c.route in (HYPERTILE, BOTH) else cell


def _route_lines(size: SizeResult) -> list[str]:
    """The whole generation of each route besides HiDiffusion's, and how Hypertile ran."""
    lines = []
    vanilla = size.route_total(VANILLA)
    for route in size.routes():
        if route == HIDIFFUSION:
            continue
        seconds, flops = size.route_total(route), size.route_total(route, what="flops")
        name = size.hires.describe((size.width, size.height)) if route == HIRES else ROUTE_LABELS[route]
        lines.append(f"  {name}: {_seconds(seconds)}, {vanilla / seconds:.2f}x vanilla's speed"
                     f" (FLOP ratio {size.route_total(VANILLA, what='flops') / flops:.2f}x)")
    if size.hires is not None:
        h = size.hires
        lines.append(f"  hires fix: x{h.scale:g} from {h.first[0]}x{h.first[1]}; its second pass runs {h.second_steps}"
                     f" steps (steps {h.start}-{h.schedule - 1} of a {h.schedule}-step schedule at denoising"
                     f" {h.denoising}); upscaler and VAE not counted")
    run = size.hypertile
    if run is not None:
        lines += [f"  Hypertile: {run.path}, the webui's defaults (max depth {run.max_depth}, max tile"
                  f" {run.tile_size_max}, swap size {run.swap_size}), seeded {run.seed};",
                  "    it draws its tiles afresh on every forward: a Hypertile row times the step (as N) nearest its"
                  " state's mean FLOPs;", "    the pass's other steps are counted and interpolated (see results.py)"]
    return lines


def _spread(size: SizeResult) -> str:
    """How far repeated forwards of one configuration lie apart: the noise of this run."""
    timings = [t for c in size.configs for t in (c.engine, c.reference) if t is not None and len(t.seconds) > 1]
    if not timings:
        return ""
    worst = max(max(t.seconds) / min(t.seconds) - 1 for t in timings)
    count = max(len(t.seconds) for t in timings)
    return f"{count} timed forwards per configuration, the best shown; they lie up to {worst:.1%} apart"


def _generation_line(size: SizeResult, compare: bool) -> str:
    ours = size.generation(ENGINE)
    if ours is None:
        return ""
    flops = size.generation(ENGINE, "flops")
    vanilla, hidiffusion = ours
    line = (f"whole generation, {size.steps} steps (U-Net only): vanilla {_seconds(vanilla)}, HiDiffusion "
            f"{_seconds(hidiffusion)}: {vanilla / hidiffusion:.2f}x faster (FLOP ratio {flops[0] / flops[1]:.2f}x)")
    theirs = size.generation(REFERENCE) if compare else None
    if theirs is not None:
        line += f"; authors' package {theirs[0] / theirs[1]:.2f}x"
    return line


def text(result: BenchResult) -> str:
    from .summary import summary

    compare = result.meta["options"]["compare_reference"]
    lines = header(result)
    for size in result.sizes:
        lines += size_table(size, compare)
    if not result.meta["options"].get("hypertile_dir"):
        why = result.meta.get("hypertile_skipped") or "no webui: pass --hypertile WEBUI_DIR to add its rows"
        lines += ["", f"Hypertile: not run ({why})"]
    lines += summary(result)
    lines.append("")
    lines.append(f"command: {result.meta['command']}")
    return "\n".join(lines)


def to_json(result: BenchResult) -> dict:
    """Everything measured, plus the derived speed-ups and whole-generation estimates."""
    data = dataclasses.asdict(result)
    for size, out in zip(result.sizes, data["sizes"], strict=True):
        for c, row in zip(size.configs, out["configs"], strict=True):
            row["speedup"] = {side: size.speedup(c.key, side) for side in (ENGINE, REFERENCE)}
            row["flop_ratio"] = {side: size.flop_ratio(c.key, side) for side in (ENGINE, REFERENCE)}
        out["generation"] = {side: size.generation(side) for side in (ENGINE, REFERENCE)}
        out["routes"] = {route: {"seconds": size.route_total(route), "flops": size.route_total(route, what="flops")}
                         for route in (VANILLA, *size.routes())}
        out["generation_flops"] = {side: size.generation(side, "flops") for side in (ENGINE, REFERENCE)}
        out["checks"] = [{"check": name, "holds": ok} for name, ok in checks(size)]
    return data


def write_json(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(result), indent=2) + "\n")


def csv_rows(result: BenchResult) -> list[dict]:
    """One row per architecture, size, configuration and implementation."""
    rows = []
    for size in result.sizes:
        for c in size.configs:
            for side in (ENGINE, REFERENCE):
                timing: Timing | None = c.timing(side)
                if timing is None:
                    continue
                speedup, flop_ratio = size.speedup(c.key, side), size.flop_ratio(c.key, side)
                rows.append({
                    "arch": size.arch, "width": size.width, "height": size.height, "batch": size.batch,
                    "config": c.key, "label": c.label, "steps": step_ranges(c.steps), "implementation": side,
                    "seconds_best": f"{timing.best:.4f}", "seconds_all": " ".join(f"{s:.4f}" for s in timing.seconds),
                    "speedup": "" if speedup is None else f"{speedup:.4f}", "gflops": f"{timing.flops / 1e9:.3f}",
                    "flop_ratio": "" if flop_ratio is None else f"{flop_ratio:.4f}",
                    "peak_mib": "" if timing.peak_bytes is None else f"{timing.peak_bytes / 2**20:.1f}",
                    "max_diff": "" if c.max_diff is None else f"{c.max_diff:.3e}", "route": c.route,
                    "forward_px": "x".join(map(str, c.pixels or (size.width, size.height))),
                    "timed_step": c.step if c.route in (HYPERTILE, BOTH) else "",
                })
    return rows


def write_csv(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(result))


def checks(size: SizeResult) -> list[tuple[str, bool]]:
    """The project's speed targets at this size, each with whether it holds: every RAU-Net state
    at least as fast (relative to vanilla) as the authors' package and within 10% of its FLOP
    ratio; MSW-MSA only at least as fast as theirs; the idle patch's fixed cost under 1% of
    vanilla; no state above vanilla's peak memory."""
    found = []
    vanilla = size.config(VANILLA).engine
    for c in size.configs:
        if c.route not in (IDLE, HIDIFFUSION):
            continue  # not this project's targets
        ours, theirs, flop = size.speedup(c.key), size.speedup(c.key, REFERENCE), size.flop_ratio(c.key)
        if c.key == IDLE:
            if size.idle_cost is not None:
                share = size.idle_cost / vanilla.best
                found.append((f"{c.label}: {size.idle_cost * 1e3:+.2f} ms per forward (on a small map, within its"
                              f" timing noise) = {share:+.3%} of vanilla here (target < 1%)", share < 0.01))
            continue
        if c.key == VANILLA:
            continue
        if theirs is not None:
            found.append((f"{c.label}: {ours:.2f}x vs the authors' {theirs:.2f}x (target >=)", ours >= theirs))
        if any(c.switches):
            found.append((f"{c.label}: {ours:.2f}x vs FLOP ratio {flop:.2f}x (target within 10%)",
                          abs(ours / flop - 1) <= 0.10))
        if c.engine.peak_bytes is not None and vanilla.peak_bytes is not None:
            found.append((f"{c.label}: peak memory {_mib(c.engine.peak_bytes)} vs vanilla {_mib(vanilla.peak_bytes)}"
                          " (target <=)", c.engine.peak_bytes <= vanilla.peak_bytes))
    return found
