"""The batch report: sweeps side by side by setting and size, times, speed-ups, embedded thumbnails."""

import re
from pathlib import Path

import pytest
from fake_webui import FakeWebui, client_for
from PIL import Image

from hidiffusion_lib.batch import __main__ as cli
from hidiffusion_lib.batch.jobfile import load
from hidiffusion_lib.batch.manifest import Manifest
from hidiffusion_lib.batch.report import sweeps, write_report
from hidiffusion_lib.batch.runner import run
from hidiffusion_lib.script_args import parse

JOBS = """\
defaults: {steps: 2, seed: 3}
jobs:
  - name: sweep
    prompt: a lighthouse
    grid:
      size: [64, 96]
      hidiffusion: [full, RAU-Net, "off"]
  - name: sweep
    prompt: a lighthouse
    size: 64
    hidiffusion: "off"
    hires: {scale: 1.5}
  - name: broken
    prompt: bad
    size: 64
"""


def _simulated_seconds(body: dict) -> float:
    """Time by pixels: full HiDiffusion halves it, RAU-Net alone takes 0.8 of it."""
    settings = parse(body["alwayson_scripts"]["HiDiffusion"]["args"])
    factor = 1.0 if not settings.enabled else 0.5 if settings.mswmsa else 0.8
    scale = body.get("hr_scale", 1) if body.get("enable_hr") else 1
    return body["width"] * body["height"] * scale * scale / 1e4 * factor


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    (root / "jobs.yaml").write_text(JOBS)
    with FakeWebui() as fake:
        fake.process_time = _simulated_seconds
        fake.fail_prompts = {"bad"}
        run(load(root / "jobs.yaml"), root / "out", client_for(fake), progress=False)
    return root / "out"


def test_sweeps_put_settings_in_columns_and_output_sizes_in_rows(out):
    sweep, broken = sweeps(Manifest(out))
    assert sweep.settings == ["off", "full", "RAU-Net", "off + hires x1.5"]
    assert sweep.sizes == [(64, 64), (96, 96)]
    assert ("off + hires x1.5", (96, 96)) in sweep.cells  # a 64 px first pass upscaled: the 96 px row
    speedups = {key: round(cell.speedup, 3) for key, cell in sweep.cells.items() if cell.speedup}
    assert speedups == {
        ("off", (64, 64)): 1.0, ("full", (64, 64)): 2.0, ("RAU-Net", (64, 64)): 1.25,
        ("off", (96, 96)): 1.0, ("full", (96, 96)): 2.0, ("RAU-Net", (96, 96)): 1.25,
        ("off + hires x1.5", (96, 96)): 1.0,
    }
    assert [cell.done for cell in broken.cells.values()] == [False]


def test_html_is_self_contained_with_times_and_speedups(out):
    html_path, _ = write_report(out)
    text = html_path.read_text()
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert len(sources) == 7 and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert not re.search(r"<(link|script)\b", text)  # no external stylesheet or script
    assert re.findall(r"<th>([^<]*)</th>", text)[:5] == ["", "off", "full", "RAU-Net", "off + hires x1.5"]
    assert "0.4 s · baseline" in text and "0.2 s · x2.00" in text and "0.3 s · x1.25" in text
    assert "HTTP 500: RuntimeError: CUDA out of memory (fake)" in text
    for link in re.findall(r'<a href="([^"]*)"', text):
        assert (out / link).is_file()


def test_contact_sheet_places_thumbnails_by_setting_and_size(out):
    _, sheet_path = write_report(out, thumb=128)
    with Image.open(sheet_path) as sheet:
        assert sheet.format == "PNG" and sheet.width == 96 + 4 * (128 + 8) + 8
        # The "off" 64x64 image (seed 3, HiDiffusion off) sits centred in the first cell.
        x, y = 96 + 64, 8 + 44 + 22 + 64
        assert sheet.convert("RGB").getpixel((x, y)) == ((3 * 37) % 256, (3 * 91) % 256, 0)


def test_report_command(out, tmp_path, capsys):
    assert cli.main(["report", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "report.html"), str(out / "contact-sheet.png")]
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "no jobs recorded" in capsys.readouterr().err


def test_records_finished_out_of_order_are_shown_in_job_file_order(out, tmp_path):
    """With several webuis the manifest holds the jobs as they finished; their index puts them back."""
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    records = Manifest(out).records()
    assert [r["index"] for r in records] == list(range(len(records)))
    for record in reversed(records):
        Manifest(shuffled).append(record)
    assert [s.settings for s in sweeps(Manifest(shuffled))] == [s.settings for s in sweeps(Manifest(out))]
    for record in reversed([{k: v for k, v in r.items() if k != "index"} for r in records]):
        Manifest(tmp_path / "old").append(record)  # an older manifest without index: manifest order
    assert [s.title.split(" ")[0] for s in sweeps(Manifest(tmp_path / "old"))] == ["broken", "sweep"]
    assert sweeps(Manifest(tmp_path / "old"))[1].settings == ["off", "off + hires x1.5", "RAU-Net", "full"]
