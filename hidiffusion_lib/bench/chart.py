"""A PNG bar chart of a benchmark: time per step of every configuration, drawn with Pillow."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .plan import HIDIFFUSION, HIRES, NAMES, ROUTE_LABELS, VANILLA
from .results import ENGINE, REFERENCE, BenchResult, SizeResult

WIDTH, LABEL_WIDTH, VALUE_WIDTH, MARGIN = 1200, 340, 190, 16
BAR, GAP, TITLE = 20, 6, 34
COLORS = {ENGINE: (46, 110, 200), REFERENCE: (230, 140, 40)}
WHOLE_COLORS = {ENGINE: (30, 150, 110), REFERENCE: (200, 110, 30)}  # whole generations
SIDE_NAMES = {ENGINE: "this project (ldm)", REFERENCE: "authors' package (diffusers)"}
WHOLE_NAME = "whole generation / steps"
TEXT, GRID = (30, 30, 30), (225, 225, 225)


def _rows(size: SizeResult, sides: tuple[str, ...]) -> list[tuple[str, dict[str, tuple[float, float | None]], bool]]:
    """(label, side -> (seconds per step, speed-up), whole) per configuration, then (whole True)
    each route's whole generation per step of the final image."""
    rows = []
    for c in size.configs:
        bars = {side: (c.timing(side).best, size.speedup(c.key, side)) for side in sides if c.timing(side)}
        rows.append((c.label, bars, False))
    passes = {side: size.generation(side) for side in sides}
    rows.append((f"HiDiffusion pass, {size.steps} steps (mean)", {
        side: (total[1] / size.steps, total[0] / total[1]) for side, total in passes.items() if total}, True))
    vanilla = size.route_total(VANILLA)
    for route in size.routes():
        if route == HIDIFFUSION:
            continue
        name = "hires fix, both passes" if route == HIRES else ROUTE_LABELS[route].split(" (")[0] + " pass"
        total = size.route_total(route)
        rows.append((f"{name} (per step)", {ENGINE: (total / size.steps, vanilla / total)}, True))
    return rows


def draw(result: BenchResult) -> Image.Image:
    """Bars of seconds per U-Net step, grouped by architecture and size; labelled with the time
    and the speed-up over vanilla on the same implementation. The last bars of a group are the
    whole generations per step: HiDiffusion's mean step, then the other routes'."""
    compare = result.meta["options"]["compare_reference"]
    sides = (ENGINE, REFERENCE) if compare else (ENGINE,)
    font = ImageFont.load_default(size=14)
    bold = ImageFont.load_default(size=16)
    groups = [(size, _rows(size, sides)) for size in result.sizes]
    rows = sum(len(r) for _, r in groups)
    bars = sum(len(b) for _, r in groups for _, b, _ in r)
    height = MARGIN * 2 + 60 + 24 + len(groups) * (TITLE + GAP) + bars * BAR + rows * GAP
    image = Image.new("RGB", (WIDTH, height), "white")
    pen = ImageDraw.Draw(image)
    meta = result.meta
    where = meta["accelerator"] or f"{meta['cpu']}, {meta['threads']} threads"
    pen.text((MARGIN, MARGIN), f"HiDiffusion benchmark: seconds per U-Net step ({meta['device']}: {where}, "
             f"{meta['options']['dtype']}, {meta['date'][:10]})", fill=TEXT, font=bold)
    x = MARGIN
    for color, name in [(COLORS[side], SIDE_NAMES[side]) for side in sides] + [(WHOLE_COLORS[ENGINE], WHOLE_NAME)]:
        pen.rectangle((x, MARGIN + 28, x + 14, MARGIN + 42), fill=color)
        pen.text((x + 20, MARGIN + 27), name, fill=TEXT, font=font)
        x += 40 + int(pen.textlength(name, font=font))
    y = MARGIN + 60
    bar_width = WIDTH - LABEL_WIDTH - VALUE_WIDTH - 2 * MARGIN
    for size, group in groups:
        pen.text((MARGIN, y + 8), f"{NAMES.get(size.arch, size.arch)}, {size.width}x{size.height}, batch {size.batch}",
                 fill=TEXT, font=bold)
        y += TITLE
        longest = max(seconds for _, bars, _ in group for seconds, _ in bars.values())
        left = MARGIN + LABEL_WIDTH
        pen.line((left, y, left, y + len(group) * GAP + sum(len(b) for _, b, _ in group) * BAR), fill=GRID)
        for label, bars, whole in group:
            pen.text((MARGIN, y + 2), label, fill=TEXT, font=font)
            for side, (seconds, speedup) in bars.items():
                length = max(1, round(bar_width * seconds / longest))
                color = (WHOLE_COLORS if whole else COLORS)[side]
                pen.rectangle((left, y + 2, left + length, y + BAR - 2), fill=color)
                value = f"{seconds:.2f} s" + ("" if speedup is None else f"  {speedup:.2f}x")
                pen.text((left + length + 6, y + 2), value, fill=TEXT, font=font)
                y += BAR
            y += GAP
        y += GAP
    load = meta["load_average_start"][0], meta.get("load_average_end", [0.0])[0]
    pen.text((MARGIN, y + 4), f"{meta['command']}   (load average {load[0]:.2f} at start, {load[1]:.2f} at end)",
             fill=TEXT, font=font)
    return image


def write_chart(result: BenchResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(result).save(path)
