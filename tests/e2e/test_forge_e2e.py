"""End to end through the HTTP API of a real Forge (lllyasviel/stable-diffusion-webui-forge
main, the Forge 2 ``backend/``), skipped unless FORGE_DIR is set (see conftest.py): the tiny
random-weight SD 1.5 checkpoint for Forge, Forge API-only on a free loopback port, the engine's
trace written to a file (HIDIFFUSION_TRACE).

First a Forge without this extension makes the baseline images and stops; then one Forge with
it serves the whole module. Images are small (576x576, just above SD 1.5's 512x512 so that the
native-size gate lets HiDiffusion run), 2 steps of Euler, T1 0.5 so that RAU-Net runs on step 0
(the preset's 0.4 gives int(2 * 0.4) = 0 steps). About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Webui, forge_checkpoint, infotexts, needs_forge, pixels, running_forge, same

from hidiffusion_lib import script_args as sa

pytestmark = needs_forge
BASE = dict(prompt="a red cube", negative_prompt="", steps=2, width=576, height=576, sampler_name="Euler", seed=1,
            cfg_scale=7)
OFF = [False]
ON = sa.to_positional({"enabled": True, "t1": 0.5})
LATENT = 576 // 8
# Tests whose request is meant to fail: the webui's API prints the exception's traceback
EXPECTED_TRACEBACK = {"test_bad_argument_is_a_422_naming_it": "ArgError"}


class Forge(Webui):
    trace: Path
    made: dict

    def txt2img(self, args: list | None = None, **overrides) -> dict:
        return self.generate("/sdapi/v1/txt2img", BASE, args, **overrides)

    def image(self, key: str, args: list, **overrides):
        """The pixels of a txt2img made once per module (by whichever test needs it first)."""
        if key not in self.made:
            self.made[key] = pixels(self.txt2img(args, **overrides))
        return self.made[key]

    def trace_size(self) -> int:
        return self.trace.stat().st_size if self.trace.exists() else 0

    def trace_since(self, start: int) -> list[dict]:
        """The engine's trace records (one per sampling pass) written since ``start``."""
        if not self.trace.exists():
            return []
        with open(self.trace, encoding="utf-8") as file:
            file.seek(start)
            return [json.loads(line) for line in file]

    def traced(self, route: str, args: list, **overrides) -> tuple[dict, list[dict]]:
        start = self.trace_size()
        body = self.generate(route, BASE, args, **overrides)
        return body, self.trace_since(start)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """Off images from a Forge without this extension (stopped before the module's Forge starts)."""
    with running_forge(tmp_path_factory.mktemp("forge-baseline"), forge_checkpoint(), extension=False) as forge:
        _, scripts = forge.call("/sdapi/v1/script-info")
        assert "hidiffusion" not in {s["name"] for s in scripts}
        bodies = {seed: forge.generate("/sdapi/v1/txt2img", BASE, seed=seed) for seed in (1, 2)}
        log = forge.log_text()
    assert "Traceback" not in log, log[-3000:]
    return {seed: pixels(body) for seed, body in bodies.items()} | {"init": bodies[1]["images"][0]}


@pytest.fixture(scope="module")
def forge(baseline, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("forge")
    trace = data_dir / "trace.jsonl"
    with running_forge(data_dir, forge_checkpoint(), env={"HIDIFFUSION_TRACE": str(trace)}) as client:
        forge = Forge(client.url, client.log)
        forge.trace, forge.made = trace, {}
        yield forge


@pytest.fixture(autouse=True)
def clean_log(request, forge):
    """After every test: no traceback (but the one a failing request is meant to print) and no
    ControlNet residual dropped ("could not be applied") in Forge's console."""
    start = len(forge.log_text())
    yield
    new = forge.log_text()[start:]
    expected = EXPECTED_TRACEBACK.get(request.node.name)
    assert "could not be applied" not in new, new[-3000:]
    if expected is None:
        assert "Traceback" not in new, new[-3000:]
    else:
        assert new.count("Traceback") == new.count(expected) or expected in new, new[-3000:]


def test_off_is_bit_identical_to_forge_without_the_extension(forge, baseline):
    for seed in (1, 2):
        body = forge.txt2img(OFF, seed=seed)
        assert "HiDiffusion" not in infotexts(body)[0]
        forge.made[f"off{seed}"] = pixels(body)
        assert same(forge.made[f"off{seed}"], baseline[seed]), f"seed {seed}"


def test_script_info_lists_every_argument_and_the_xyz_axes(forge):
    status, scripts = forge.call("/sdapi/v1/script-info")
    assert status == 200
    entries = [s for s in scripts if s["name"] == "hidiffusion"]
    assert {s["is_img2img"] for s in entries} == {False, True}
    for entry in entries:
        assert [a["label"] for a in entry["args"]] == [a.label for a in sa.ARGS]
        assert len(entry["args"]) == 13
    for is_img2img in (False, True):
        xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and s["is_img2img"] == is_img2img)
        assert {axis.label for axis in sa.AXES} <= set(xyz["args"][0]["choices"])


def test_on_differs_is_reproducible_and_traced(forge, baseline):
    body, records = forge.traced("/sdapi/v1/txt2img", ON)
    on = forge.made["on1"] = pixels(body)
    assert not same(on, baseline[1])  # the image itself, not only its infotext
    text = infotexts(body)[0]
    assert "HiDiffusion: True" in text and "HiDiffusion T1: 0.5" in text and "HiDiffusion schedule" in text, text
    assert len(records) == 1 and not records[0]["hires"] and records[0]["sampler"] == "Euler", records
    forwards = records[0]["forwards"]
    assert [f["step"] for f in forwards] == [0, 1], forwards  # one call a step (cond and uncond batched)
    assert all((f["height"], f["width"], f["steps"]) == (LATENT, LATENT, 2) for f in forwards), forwards
    assert forwards[0]["main"] and not forwards[1]["main"], forwards  # step < int(2 * 0.5)
    assert all(f["windows"] for f in forwards), forwards  # MSW-MSA on every step
    # RAU-Net halves the first level on step 0 only: block 3's output is then a quarter of the latent
    assert forwards[0]["skips"] != forwards[1]["skips"], forwards
    assert same(pixels(forge.txt2img(ON)), on)


def test_bad_argument_is_a_422_naming_it(forge, baseline):
    status, body = forge.call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": {"HiDiffusion": {"args": [
        True, True, True, "Auto", 1.5]}}})
    assert status == 422 and body["error"] == "ArgError", body
    # Forge API-only answers through webui.py's handler: the text is under "message", not "errors"
    message = body.get("errors") or body.get("message")
    assert "T1 ratio" in message and "'t1'" in message, body
    assert same(pixels(forge.txt2img(OFF)), baseline[1])


def test_interrupted_generation_then_clean_ones(forge, baseline):
    on = forge.image("on1", ON)
    start = forge.trace_size()
    result = {}
    thread = threading.Thread(target=lambda: result.update(forge.txt2img(ON, steps=6)))
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline:  # interrupt once the first step is done
        status, progress = forge.call("/sdapi/v1/progress?skip_current_image=true", timeout=30)
        if status == 200 and progress["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.3)
    forge.call("/sdapi/v1/interrupt", {})
    thread.join()
    assert result.get("images"), "the interrupted generation returned no image"
    (record,) = forge.trace_since(start)
    assert 1 <= len(record["forwards"]) < 6, record["forwards"]  # it did stop early
    assert same(pixels(forge.txt2img(OFF)), baseline[1])
    assert same(pixels(forge.txt2img(ON)), on)


def test_img2img_gets_the_schedule(forge, baseline):
    body, records = forge.traced("/sdapi/v1/img2img", ON, init_images=[baseline["init"]], denoising_strength=0.6)
    text = infotexts(body)[0]
    assert "HiDiffusion: True" in text and "HiDiffusion schedule" in text, text
    assert len(records) == 1 and records[0]["forwards"], records
    assert all((f["height"], f["width"]) == (LATENT, LATENT) for f in records[0]["forwards"]), records


def test_every_image_of_a_batch_is_its_seed_alone(forge, record_property):
    """Image k of a batch has seed + k's noise; with HiDiffusion on it must come out as that seed
    alone (the window shift depends on the step, not on the image)."""
    batch = forge.txt2img(ON, batch_size=2)
    texts = infotexts(batch)
    assert len(batch["images"]) == 2 and all("HiDiffusion: True" in t for t in texts), texts
    for k in range(2):
        assert f"Seed: {1 + k}," in texts[k]
        alone = forge.image(f"on{1 + k}", ON, seed=1 + k)
        diff = int(abs(pixels(batch, k) - alone).max())
        record_property(f"batch_image_{k}_max_diff", diff)
        print(f"batch image {k}: max difference to seed {1 + k} alone = {diff}/255")
        assert diff <= 2, f"image {k}: {diff}/255"


def test_xyz_mode_axis(forge, baseline):
    _, scripts = forge.call("/sdapi/v1/script-info")
    choices = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])["args"][0]["choices"]
    args = [choices.index("[HiDiffusion] Mode"), "", ["off", "full"], 0, "", [], 0, "", [], True, True, False, False,
            False, False, False, 0, False]
    # the alwayson args give T1 0.5; the axis switches HiDiffusion on and off per cell
    body = forge.txt2img(sa.to_positional({"enabled": False, "t1": 0.5}), script_name="x/y/z plot",
                         script_args=args)
    cells = infotexts(body)[1:]
    assert len(body["images"]) == 3 and len(cells) == 2, cells
    assert "HiDiffusion" not in cells[0] and "HiDiffusion: True" in cells[1], cells
    assert same(pixels(body, 1), baseline[1])
    assert same(pixels(body, 2), forge.image("on1", ON))


def test_model_switch_and_back(forge, baseline):
    on, off = forge.image("on1", ON), baseline[1]
    second = forge_checkpoint(seed=1)
    assert forge.call("/sdapi/v1/refresh-checkpoints", {})[0] == 200
    _, models = forge.call("/sdapi/v1/sd-models")
    titles = {Path(m["filename"]).name: m["title"] for m in models}
    first = titles[forge_checkpoint().name]
    status, body = forge.call("/sdapi/v1/options", {"sd_model_checkpoint": titles[second.name]})
    assert status == 200, body
    other = forge.txt2img(ON)
    assert "Model: tiny-forge-sd1-seed1" in infotexts(other)[0] and not same(pixels(other), on)
    status, body = forge.call("/sdapi/v1/options", {"sd_model_checkpoint": first})
    assert status == 200, body
    assert same(pixels(forge.txt2img(ON)), on)
    assert same(pixels(forge.txt2img(OFF)), off)


def test_hires_fix_pass_runs_at_its_size(forge):
    """512 px first pass (native size: skipped, and the infotext says so), then Latent 1.25x to
    640 px: the hires pass runs with HiDiffusion at an 80x80 latent. Forge's API needs
    hr_additional_modules (None fails in processing.py with a TypeError) and has hr_cfg 1 by default."""
    body, records = forge.traced("/sdapi/v1/txt2img", ON, width=512, height=512, enable_hr=True, hr_scale=1.25,
                                 hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.6, hr_cfg=7,
                                 hr_additional_modules=["Use same choices"])
    text = infotexts(body)[0]
    assert "Hires upscale: 1.25" in text and "HiDiffusion: True" in text, text
    assert "HiDiffusion skipped" in text and "first pass at 512x512" in text, text
    # Forge calls process_before_every_sampling twice for the hires pass and throws the first
    # call's patches away: that patch's record has no forwards. The trace's "hires" flag is read
    # when the record is written, after Forge has set p.is_hr_pass back to False: not asserted.
    ran = [r for r in records if r["forwards"]]
    assert len(ran) == 1 and len(records) <= 2, records
    forwards = ran[0]["forwards"]
    assert forwards and all((f["height"], f["width"]) == (80, 80) for f in forwards), forwards
    assert all(f["windows"] for f in forwards), forwards


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
