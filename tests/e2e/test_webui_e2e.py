"""End to end through the HTTP API of a real AUTOMATIC1111 webui (v1.10.x), skipped unless
WEBUI_DIR is set (see conftest.py): a tiny random-weight SD 1.x checkpoint, the webui API-only
on a free loopback port, the engine's trace written to a file (HIDIFFUSION_TRACE). A run takes
several minutes on a CPU.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Webui, digest, infotexts, needs_webui, running_webui, write_checkpoint

from hidiffusion_lib import script_args as sa

pytestmark = needs_webui
BASE = dict(prompt="a red cube", negative_prompt="", steps=4, width=768, height=768, sampler_name="Euler", seed=1,
            cfg_scale=7)


class Txt2img(Webui):
    trace: Path

    def txt2img(self, args: list | None = None, **overrides) -> dict:
        return self.generate("/sdapi/v1/txt2img", BASE, args, **overrides)

    def traced(self, args: list, **overrides) -> list[dict]:
        """The engine's trace (one record per sampling pass) of one txt2img."""
        start = self.trace.stat().st_size if self.trace.exists() else 0
        self.txt2img(args, **overrides)
        with open(self.trace, encoding="utf-8") as file:
            file.seek(start)
            return [json.loads(line) for line in file]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui")
    ckpt = write_checkpoint(workdir / "ckpt")
    trace = workdir / "trace.jsonl"
    with running_webui(workdir, ckpt, env={"HIDIFFUSION_TRACE": str(trace)}) as client:
        webui = Txt2img(client.url, client.log)
        webui.trace = trace
        yield webui


def test_script_info_lists_every_argument(webui):
    status, scripts = webui.call("/sdapi/v1/script-info")
    assert status == 200
    entries = [s for s in scripts if s["name"] == "hidiffusion"]
    assert {s["is_img2img"] for s in entries} == {False, True}
    for entry in entries:
        assert [a["label"] for a in entry["args"]] == [a.label for a in sa.ARGS]


def test_off_is_untouched_and_on_is_reproducible(webui):
    off = webui.txt2img()
    on = webui.txt2img([True])
    assert (pixels(on, 0) != pixels(off, 0)).any()  # the image itself, not only its infotext
    assert "HiDiffusion: True" in infotexts(on)[0] and "HiDiffusion" not in infotexts(off)[0]
    assert digest(webui.txt2img()) == digest(off)
    assert digest(webui.txt2img([True])) == digest(on)


def test_bad_argument_is_a_422_naming_it(webui):
    bad = {"HiDiffusion": {"args": [True, True, True, "Auto", 1.5]}}
    status, body = webui.call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": bad})
    assert status == 422 and "'t1'" in body["errors"] and "[0, 1]" in body["errors"]


def test_xyz_modes_by_size(webui):
    _, scripts = webui.call("/sdapi/v1/script-info")
    choices = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])["args"][0]["choices"]
    args = [choices.index("[HiDiffusion] Mode"), "", ["off", "RAU-Net", "full"], choices.index("Size"),
            "640x640, 768x640", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    body = webui.txt2img(steps=2, width=640, height=640, script_name="x/y/z plot", script_args=args)
    cells = infotexts(body)[1:]
    assert len(cells) == 6
    for index, text in enumerate(cells):
        mode = ("off", "RAU-Net", "full")[index % 3]
        assert ("HiDiffusion: True" in text) == (mode != "off")
        assert ("HiDiffusion MSW-MSA: False" in text) == (mode == "RAU-Net")


def test_hires_heun_and_img2img(webui):
    hires = webui.txt2img([True], width=384, height=384, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                          hr_second_pass_steps=3, denoising_strength=0.5)
    assert "HiDiffusion: True" in infotexts(hires)[0]
    assert "HiDiffusion: True" in infotexts(webui.txt2img([True], sampler_name="Heun"))[0]
    status, body = webui.call("/sdapi/v1/img2img", {**BASE, "init_images": [hires["images"][0]],
                                                     "denoising_strength": 0.5,
                                                     "alwayson_scripts": {"HiDiffusion": {"args": [True]}}})
    assert status == 200 and "HiDiffusion: True" in infotexts(body)[0]


def test_interrupted_generation_then_a_clean_one(webui):
    off, on = digest(webui.txt2img()), digest(webui.txt2img([True]))
    thread = threading.Thread(target=webui.txt2img, args=([True],), kwargs={"steps": 30})
    thread.start()
    time.sleep(3)
    webui.call("/sdapi/v1/interrupt", {})
    thread.join()
    assert digest(webui.txt2img()) == off
    assert digest(webui.txt2img([True])) == on


def test_batch_job_file_runs_and_resumes(webui, tmp_path):
    from PIL import Image

    from hidiffusion_lib.batch.__main__ import main

    job = tmp_path / "jobs.yaml"
    job.write_text("jobs:\n  - prompt: a red cube\n    steps: 2\n    seed: 3\n    grid:\n"
                   "      hidiffusion: [off, full]\n      size: [640x640, 768x768]\n")
    out = tmp_path / "out"
    assert main(["run", str(job), "--url", webui.url, "--out", str(out)]) == 0
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 4
    assert any("HiDiffusion: True" in Image.open(io.BytesIO(p.read_bytes())).info.get("parameters", "") for p in pngs)
    mtimes = [p.stat().st_mtime for p in pngs]
    assert main(["run", str(job), "--url", webui.url, "--out", str(out)]) == 0
    assert [p.stat().st_mtime for p in pngs] == mtimes
    assert main(["report", str(out)]) == 0


def pixels(body: dict, index: int):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][index]))).convert("RGB"), dtype=int)


@pytest.mark.parametrize(("batch_size", "n_iter"), [(2, 1), (4, 1), (1, 2)], ids=["size2", "size4", "count2"])
def test_every_image_of_a_batch_is_its_seed_alone(webui, batch_size, n_iter):
    """The webui draws image k's noise from seed + k; with HiDiffusion on, image k must come
    out the same when made alone from that seed (window shifts by step, not by image)."""
    size = dict(steps=3, width=640, height=640)
    batch = webui.txt2img([True], seed=20, batch_size=batch_size, n_iter=n_iter, **size)
    texts = infotexts(batch)
    assert len(batch["images"]) == batch_size * n_iter and all("HiDiffusion: True" in t for t in texts)
    for k in range(batch_size * n_iter):
        alone = webui.txt2img([True], seed=20 + k, **size)
        assert f"Seed: {20 + k}," in texts[k]
        assert abs(pixels(batch, k) - pixels(alone, 0)).max() <= 2, f"image {k}"


ALL_SAMPLERS = 20


def _check_schedule(name: str, forwards: list[dict], steps: int, t1: float, ordered: bool = True) -> list[int]:
    seen = [f["step"] for f in forwards]
    assert seen and seen[0] == 0 and (seen == sorted(seen) or not ordered), (name, seen)
    assert all(f["steps"] == steps and f["main"] == (f["step"] < int(steps * t1)) for f in forwards), (name, forwards)
    return seen


def test_every_sampler_runs_with_hidiffusion_and_gets_the_schedule(webui):
    """All samplers but DPM adaptive (next test) return an image with no traceback; the engine's
    trace says, for each, that RAU-Net ran exactly while step < int(steps * T1) and that the
    steps covered the pass in order."""
    status, samplers = webui.call("/sdapi/v1/samplers")
    names = [s["name"] for s in samplers]
    assert status == 200 and len(names) == ALL_SAMPLERS
    log_start = len(webui.log_text())
    steps, t1 = 5, 0.4
    seen = {}
    for name in names:
        if name == "DPM adaptive":
            continue
        passes = webui.traced([True], sampler_name=name, steps=steps, width=576, height=576)
        assert len(passes) == 1 and passes[0]["sampler"] == name, name
        seen[name] = _check_schedule(name, passes[0]["forwards"], steps, t1)
    # one call a step; the webui's DDIM makes steps - 1 calls (range(len(timesteps) - 1))
    expected = {name: list(range(steps)) for name in ("Euler", "Euler a", "LMS", "DPM++ 2M", "DPM++ 2M SDE",
                                                     "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DPM fast", "LCM")}
    expected |= {name: list(range(steps - 1)) for name in ("DDIM", "DDIM CFG++")}
    # two calls a step, one for the last
    expected |= {name: sorted([*range(steps), *range(steps - 1)]) for name in ("Heun", "DPM2", "DPM2 a", "DPM++ 2S a",
                                                                               "DPM++ SDE", "Restart")}
    wrong = {name: seen[name] for name in expected if seen.get(name) != expected[name]}
    assert not wrong, f"steps seen {seen}"
    assert all(steps - 2 <= s[-1] <= steps - 1 for s in seen.values()), seen  # every pass reached its end
    log = webui.log_text()[log_start:]
    assert "Traceback" not in log, log[-3000:]


def test_dpm_adaptive_takes_its_step_from_the_noise_level(webui):
    """DPM adaptive picks its own number of calls (hundreds on a random-weight model): the step
    is read from the noise level, so RAU-Net stays on while the pass is in its first T1 of the
    noise range, not for the first int(steps * T1) calls. Its steps can go back (it retries a
    rejected step from a higher noise level). Interrupted after a while; the trace of the calls
    made so far is written when the pass ends."""
    steps, t1 = 5, 0.4
    start = webui.trace.stat().st_size if webui.trace.exists() else 0
    thread = threading.Thread(target=webui.txt2img, args=([True],),
                              kwargs=dict(sampler_name="DPM adaptive", steps=steps, width=528, height=528))
    thread.start()
    time.sleep(45)
    webui.call("/sdapi/v1/interrupt", {})
    thread.join()
    with open(webui.trace, encoding="utf-8") as file:
        file.seek(start)
        (record,) = [json.loads(line) for line in file]
    forwards = record["forwards"]
    _check_schedule("DPM adaptive", forwards, steps, t1, ordered=False)
    assert sum(f["main"] for f in forwards) > int(steps * t1), "RAU-Net went off by call count"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
