"""The sweep report of an output directory: a self-contained HTML page and a PNG contact sheet.

Jobs whose fields differ only in size, HiDiffusion setting and hires fix form one sweep, shown as
a table: a row per output size, a column per setting. Each cell has its images, the generation
time (the webui's X-Process-Time when sent, else the client's round trip) and the speed-up
against the "off" cell of its row (plain generation at the same output size).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .jobfile import SWEEP_AXES, output_size, setting_label
from .manifest import Manifest

HTML_NAME = "report.html"
SHEET_NAME = "contact-sheet.png"
BASELINE = "off"


@dataclass
class Cell:
    """One job in a sweep; ``speedup`` is the off cell's time over this one's."""

    record: dict
    speedup: float | None = None

    @property
    def done(self) -> bool:
        return self.record.get("status") == "done"

    @property
    def files(self) -> list[dict]:
        return (self.record.get("files") or []) if self.done else []

    @property
    def seconds(self) -> float | None:
        return (self.record.get("server_seconds") or self.record.get("seconds")) if self.done else None


@dataclass
class Sweep:
    """Jobs that differ only in SWEEP_AXES; ``cells`` is keyed by (setting, output size)."""

    title: str
    prompt: str
    settings: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    cells: dict[tuple[str, tuple[int, int]], Cell] = field(default_factory=dict)


def sweeps(manifest: Manifest) -> list[Sweep]:
    """The sweeps of the latest record of every job, in job-file order when every record has its
    ``index`` (runs on several webuis record jobs as they finish), else in manifest order."""
    found: dict[str, Sweep] = {}
    records = list(manifest.latest().values())
    if all(isinstance(record.get("index"), int) for record in records):
        records.sort(key=lambda record: record["index"])
    for record in records:
        spec = record["spec"]
        key = json.dumps({k: v for k, v in spec.items() if k not in SWEEP_AXES}, sort_keys=True)
        if key not in found:
            sampler = spec.get("sampler") or "default sampler"
            title = f"{spec['name']} · {spec['mode']} · seed {spec['seed']} · {spec['steps']} steps · {sampler}"
            prompt = spec["prompt"] + (f"  —  negative: {spec['negative_prompt']}" if spec["negative_prompt"] else "")
            found[key] = Sweep(title, prompt)
        sweep = found[key]
        setting, size = setting_label(spec), tuple(output_size(spec))
        if (setting, size) in sweep.cells:  # two custom settings under one label: keep both apart
            setting = f"{setting} ({record['id'][:6]})"
        sweep.cells[setting, size] = Cell(record)
        if setting not in sweep.settings:
            sweep.settings.append(setting)
        if size not in sweep.sizes:
            sweep.sizes.append(size)
    for sweep in found.values():
        sweep.settings.sort(key=lambda s: s != BASELINE)
        sweep.sizes.sort(key=lambda wh: (wh[0] * wh[1], wh))
        for (_, size), cell in sweep.cells.items():
            base = sweep.cells.get((BASELINE, size))
            if base and base.seconds and cell.seconds:
                cell.speedup = base.seconds / cell.seconds
    return list(found.values())


def _caption(cell: Cell, setting: str) -> str:
    if not cell.done:
        return "failed"
    text = f"{cell.seconds:.1f} s" if cell.seconds else "time unknown"
    if setting == BASELINE:
        return text + " · baseline"
    return text + (f" · x{cell.speedup:.2f}" if cell.speedup else "")


def _thumbnail(path: Path, box: int) -> Image.Image | None:
    try:
        with Image.open(path) as image:
            image.thumbnail((box, box))
            return image.convert("RGB")
    except OSError:
        return None


_CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
table{border-collapse:collapse;margin:8px 0 32px}
th,td{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:center;background:#fff}
th{background:#eee}
img{display:block;margin:0 auto 4px;max-width:100%}
.prompt{color:#555;max-width:1000px}
.t{font-variant-numeric:tabular-nums}
.failed{color:#b00;max-width:260px;text-align:left;white-space:pre-wrap}
"""


def _html(out: Path, found: list[Sweep], thumbs: dict[str, Image.Image | None]) -> str:
    cells = [cell for sweep in found for cell in sweep.cells.values()]
    failed = sum(not cell.done for cell in cells)
    images = sum(len(cell.files) for cell in cells)
    esc = html.escape
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f"<title>HiDiffusion batch report: {esc(out.name)}</title><style>{_CSS}</style></head><body>",
        "<h1>HiDiffusion batch report</h1>",
        f"<p>{esc(str(out))} · {datetime.now():%Y-%m-%d %H:%M} · {len(cells)} jobs, {images} images, "
        f"{failed} failed. Time: generation time of the job; x: speed-up versus the “off” cell of the row.</p>",
    ]
    for sweep in found:
        parts.append(f"<section><h2>{esc(sweep.title)}</h2><p class=prompt>{esc(sweep.prompt)}</p><table><tr><th></th>")
        parts += [f"<th>{esc(setting)}</th>" for setting in sweep.settings]
        parts.append("</tr>")
        for size in sweep.sizes:
            parts.append(f"<tr><th>{size[0]}x{size[1]}</th>")
            for setting in sweep.settings:
                cell = sweep.cells.get((setting, size))
                if cell is None:
                    parts.append("<td></td>")
                    continue
                parts.append("<td>")
                for file in cell.files:
                    thumb = thumbs.get(file["path"])
                    if thumb is None:
                        parts.append(f"<div>missing: {esc(file['path'])}</div>")
                        continue
                    data = io.BytesIO()
                    thumb.save(data, format="JPEG", quality=85)
                    uri = "data:image/jpeg;base64," + base64.b64encode(data.getvalue()).decode("ascii")
                    parts.append(
                        f'<a href="{esc(file["path"])}"><img src="{uri}" width={thumb.width} height={thumb.height} '
                        f'alt="{esc(setting)} {size[0]}x{size[1]}" title="{esc(file.get("infotext") or "")}"></a>'
                    )
                parts.append(f"<div class=t>{esc(_caption(cell, setting))}</div>")
                if not cell.done:
                    parts.append(f"<div class=failed>{esc(cell.record.get('error', ''))}</div>")
                parts.append("</td>")
            parts.append("</tr>")
        parts.append("</table></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _sheet(found: list[Sweep], thumbs: dict[str, Image.Image | None], box: int) -> Image.Image:
    pad, label_w, title_h, header_h, caption_h = 8, 96, 44, 22, 22
    font = ImageFont.load_default(13)
    cell_w, row_h = box + pad, box + caption_h + pad
    columns = max(len(sweep.settings) for sweep in found)
    width = label_w + columns * cell_w + pad
    height = sum(title_h + header_h + len(sweep.sizes) * row_h for sweep in found) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = pad
    for sweep in found:
        draw.text((pad, y), _fit(draw, sweep.title, font, width - 2 * pad), fill="black", font=font)
        draw.text((pad, y + 18), _fit(draw, sweep.prompt, font, width - 2 * pad), fill="#555", font=font)
        y += title_h
        for i, setting in enumerate(sweep.settings):
            draw.text((label_w + i * cell_w, y), _fit(draw, setting, font, box), fill="black", font=font)
        y += header_h
        for size in sweep.sizes:
            draw.text((pad, y + box // 2), f"{size[0]}x{size[1]}", fill="black", font=font)
            for i, setting in enumerate(sweep.settings):
                cell = sweep.cells.get((setting, size))
                if cell is None:
                    continue
                x = label_w + i * cell_w
                thumb = thumbs.get(cell.files[0]["path"]) if cell.files else None
                if thumb is None:
                    draw.rectangle((x, y, x + box - 1, y + box - 1), fill="#eee", outline="#ccc")
                else:
                    sheet.paste(thumb, (x + (box - thumb.width) // 2, y + (box - thumb.height) // 2))
                colour = "black" if cell.done else "#b00"
                draw.text((x, y + box + 3), _fit(draw, _caption(cell, setting), font, box), fill=colour, font=font)
            y += row_h
    return sheet


def write_report(out: Path, thumb: int = 256) -> tuple[Path, Path]:
    """Write ``report.html`` and ``contact-sheet.png`` into ``out``; returns their paths."""
    manifest = Manifest(out)
    found = sweeps(manifest)
    if not found:
        raise FileNotFoundError(f"no jobs recorded in {manifest.path}: run a job file with --out {out} first")
    thumbs = {
        file["path"]: _thumbnail(out / file["path"], thumb)
        for sweep in found
        for cell in sweep.cells.values()
        for file in cell.files
    }
    html_path, sheet_path = out / HTML_NAME, out / SHEET_NAME
    html_path.write_text(_html(out, found, thumbs), encoding="utf-8")
    _sheet(found, thumbs, thumb).save(sheet_path)
    return html_path, sheet_path
