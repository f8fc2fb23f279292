"""The choice a webui user makes, side by side: every route at every size of one architecture.

One table per architecture and batch: a column group per size (time, speed-up over vanilla at
that size, FLOP ratio), a row per U-Net state (one forward: one step) and per route's whole
generation (U-Net time only). As text for the terminal and as Markdown (bench.md, the README).
"""

from __future__ import annotations

from pathlib import Path

from .plan import BOTH, HIDIFFUSION, HIRES, HYPERTILE, NAMES, ROUTE_LABELS, VANILLA
from .results import BenchResult, SizeResult

ROUTES = (VANILLA, HIDIFFUSION, HYPERTILE, BOTH, HIRES)
# The per-forward rows, in order; a size without the state leaves its cells empty.
STATES = ("vanilla", "mswmsa", "raunet", "raunet_t2", "raunet_extra", "hypertile", "raunet_hypertile",
          "raunet_t2_hypertile", "raunet_extra_hypertile")


def _time(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:,.1f} s"


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def groups(result: BenchResult) -> list[tuple[str, list[SizeResult]]]:
    """(title, sizes) per architecture and batch, in run order."""
    found: dict[tuple[str, int], list[SizeResult]] = {}
    for size in result.sizes:
        found.setdefault((size.arch, size.batch), []).append(size)
    return [(f"{NAMES.get(arch, arch)} architecture, batch {batch}", sizes) for (arch, batch), sizes in found.items()]


def rows(sizes: list[SizeResult]) -> list[list[str]]:
    """The table of one group: a header row, then one row per state and per route."""
    table = [["", *(cell for s in sizes for cell in (f"{s.width}x{s.height}", "speed-up", "FLOP ratio"))]]
    present = [k for k in STATES if any(s.find(k) for s in sizes)]
    for key in present:
        label = next(s.find(key) for s in sizes if s.find(key)).label
        if key not in (VANILLA, HYPERTILE) and not key.endswith("_hypertile"):
            label = f"HiDiffusion: {label}"
        cells = []
        for s in sizes:
            c = s.find(key)
            cells += ["", "", ""] if c is None else [_time(c.engine.best), _x(s.speedup(key)), _x(s.flop_ratio(key))]
        table.append([f"one step: {label}", *cells])
    steps = sorted({s.steps for s in sizes})
    for route in ROUTES:
        if route != VANILLA and not any(route in s.routes() for s in sizes):
            continue
        cells = []
        for s in sizes:
            seconds = s.route_total(route)
            if seconds is None:
                cells += ["", "", ""]
                continue
            vanilla, flops = s.route_total(VANILLA), s.route_total(route, what="flops")
            cells += [_time(seconds), _x(vanilla / seconds), _x(s.route_total(VANILLA, what="flops") / flops)]
        table.append([f"whole generation: {_route_name(route, sizes)}", *cells])
    if len(steps) == 1:
        table[0][0] = f"U-Net time (whole generation: {steps[0]} steps)"
    return table


def _route_name(route: str, sizes: list[SizeResult]) -> str:
    if route != HIRES:
        return ROUTE_LABELS[route]
    plans = {(s.hires.first, s.hires.first_steps, s.hires.second_steps) for s in sizes if s.hires is not None}
    if len(plans) == 1:
        first, one, two = plans.pop()
        return f"hires fix from {first[0]}x{first[1]} ({one} + {two} steps)"
    return "hires fix (first + second pass)"


def summary(result: BenchResult) -> list[str]:
    """The side-by-side tables as text lines."""
    lines = []
    for title, sizes in groups(result):
        table = rows(sizes)
        lines += ["", f"{title}: the choices side by side (U-Net time; speed-up and FLOP ratio against vanilla "
                      "at the same size)"]
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r in table:
            lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    return lines


def markdown(result: BenchResult) -> str:
    """The side-by-side tables in Markdown."""
    out = []
    for title, sizes in groups(result):
        table = rows(sizes)
        out += [f"**{title}**", "", "| " + " | ".join(table[0]) + " |",
                "|---|" + "---:|" * (len(table[0]) - 1)]
        out += ["| " + " | ".join(r) + " |" for r in table[1:]]
        out.append("")
    return "\n".join(out)


def write_markdown(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(result))
