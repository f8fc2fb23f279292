"""Models HiDiffusion does not fit as the authors' presets do, loaded in a real AUTOMATIC1111
webui (v1.10.x), skipped unless WEBUI_DIR is set (see conftest.py): SD 2.x 768-v and the SDXL
refiner as the main model, tiny random-weight checkpoints (tests/e2e/tiny_checkpoint.py ``sd2-v``
and ``sdxl-refiner``, side by side; the webui starts with the first and each request names its
checkpoint, so the HiDiffusion checkbox stays ticked across model switches, as a user's would).

SD 2.x 768-v (ldm's ``parameterization: "v"``, which the A1111 host reads) was trained at
768 px: at 768x768 the native gate skips the pass with the note naming its training size, the
image bit for bit the one made without HiDiffusion; above it (896x768, 3 steps) the SD 2.x
block map runs with the authors' SD 1.5/2.1 preset, and the engine's trace (HIDIFFUSION_TRACE)
shows RAU-Net's main switch on at step 0 only (int(3 * 0.4) = 1), the stride-4 downsample
halving input block 3's output again.

The SDXL refiner's U-Net has no block map: with Model preset Auto the pass runs unchanged with
a note naming "the SDXL refiner" (in the infotext and the console), the image that of HiDiffusion
off; an explicit preset is refused with HTTP 422 in the UI's words, and nothing stays patched.
Images are compared by pixels (the PNG carries the infotext). About 2 minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Webui, infotexts, needs_webui, no_traceback, pixels, running_webui, same, write_checkpoint

from hidiffusion_lib import schedule
from hidiffusion_lib import script_args as sa

pytestmark = needs_webui
BASE = dict(prompt="a red cube", negative_prompt="", sampler_name="Euler", seed=1, cfg_scale=7)
SD2V, REFINER = "tiny-sd2-v", "tiny-sdxl-refiner"
ON = sa.to_positional({"enabled": True})
ABOVE_768 = dict(width=896, height=768, steps=3)  # latent 112x96: 1.17x 768-v's area, even at every level
ABOVE_1024 = dict(width=1088, height=1024, steps=2)  # above SDXL's training area, so no gate could explain a skip


class Families(Webui):
    def __init__(self, client: Webui, ckpt_dir: Path, trace: Path):
        super().__init__(client.url, client.log, client.process)
        self.ckpt_dir, self.trace = ckpt_dir, trace
        self.made: dict[str, dict] = {}

    def txt2img(self, checkpoint: str, args: list | None = None, **overrides) -> dict:
        return self.generate("/sdapi/v1/txt2img", self.payload(checkpoint, **overrides), args)

    def payload(self, checkpoint: str, **overrides) -> dict:
        settings = {"sd_model_checkpoint": checkpoint}
        return {**BASE, "override_settings": settings, "override_settings_restore_afterwards": False, **overrides}

    def once(self, key: str, checkpoint: str, args: list | None = None, **overrides) -> dict:
        """txt2img made once per module: tests that need the same image share it."""
        if key not in self.made:
            self.made[key] = self.txt2img(checkpoint, args, **overrides)
        return self.made[key]

    def traced(self, checkpoint: str, args: list, **overrides) -> tuple[dict, list[dict]]:
        """txt2img and the trace records (one per patched pass) it appended."""
        start = self.trace.stat().st_size if self.trace.exists() else 0
        body = self.txt2img(checkpoint, args, **overrides)
        if not self.trace.exists():
            return body, []
        with open(self.trace, encoding="utf-8") as file:
            file.seek(start)
            return body, [json.loads(line) for line in file if line.strip()]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui-families")
    # no live previews: for SDXL-type models the webui would fetch its preview decoder (VAEApprox)
    (workdir / "config.json").write_text(json.dumps({"live_previews_enable": False}))
    write_checkpoint(workdir / "ckpt", "sdxl-refiner")
    trace = workdir / "trace.jsonl"
    with running_webui(workdir, write_checkpoint(workdir / "ckpt", "sd2-v"),
                       env={"HIDIFFUSION_TRACE": str(trace)}) as client:
        print(f"webui log: {client.log}")
        yield Families(client, workdir / "ckpt", trace)


def note_in(body: dict, key: str, note: str) -> bool:
    """Whether the infotext has ``key: note`` (the webui quotes a value with a colon or comma as JSON)."""
    return f"{key}: {json.dumps(note, ensure_ascii=False)}" in infotexts(body)[0]


def test_sd2_768v_at_its_training_size_is_skipped_and_identical(webui):
    # the YAML beside the checkpoint (parameterization "v") is the config, not the webui's guess;
    # ldm's "Running in v-prediction mode" is hidden by the webui's hide_ldm_prints setting
    assert f"Creating model from config: {webui.ckpt_dir / SD2V}.yaml" in webui.log_text()
    size = dict(width=768, height=768, steps=2)
    off = webui.txt2img(SD2V, **size)
    start = webui.trace.stat().st_size if webui.trace.exists() else 0
    on = webui.txt2img(SD2V, ON, **size)
    note = sa.skipped_note("first pass", 768, 768, "sd2_768v")
    assert "SD 2.x 768-v's training size (768x768 in area)" in note
    assert note_in(on, sa.SKIPPED_KEY, note), infotexts(on)[0]
    assert f"HiDiffusion: {note}" in webui.log_text()
    assert same(pixels(on), pixels(off)), "HiDiffusion changed the image at 768-v's training size"
    assert (webui.trace.stat().st_size if webui.trace.exists() else 0) == start, "a pass was patched"
    no_traceback(webui)


def test_sd2_768v_above_768_runs_the_sd2_preset(webui):
    off = webui.txt2img(SD2V, **ABOVE_768)
    on, records = webui.traced(SD2V, ON, **ABOVE_768)
    text = infotexts(on)[0]
    assert sa.SKIPPED_KEY not in text and "HiDiffusion: True" in text, text
    # what FAMILIES and the presets say for SD 2.x at this size: sd15_1024, T1 0.4, T2 0
    h, w, steps = ABOVE_768["height"] // 8, ABOVE_768["width"] // 8, ABOVE_768["steps"]
    arch = sa.FAMILIES["sd2_768v"][2]
    preset = schedule.preset_for(arch, h, w)
    t1, t2 = schedule.PRESETS[preset]
    assert (arch, preset, t1, t2) == ("sd2", "sd15_1024", 0.4, 0.0)  # the authors' SD 1.5/2.1 values, pinned
    assert f'HiDiffusion schedule: "{preset}: T1 {t1:g}, T2 {t2:g}"' in text, text
    (record,) = records
    forwards = record["forwards"]
    for forward in forwards:  # shown with -s: what the trace says
        print(f"step {forward['step']} main {forward['main']} extra {forward['extra']} windows {forward['windows']}"
              f" skips {forward['skips']}")
    assert [(f["step"], f["main"], f["extra"]) for f in forwards] == [
        (step, step < int(steps * t1), step < int(steps * t2)) for step in range(steps)]
    assert all(f["windows"] is not None for f in forwards), "MSW-MSA did not window every step"
    # input block 3 (the SD 2.x map's RAD): stride 4 while the main switch is on, else 2
    assert [tuple(f["skips"][3]) for f in forwards] == [(h // 4, w // 4), (h // 2, w // 2), (h // 2, w // 2)]
    assert not same(pixels(on), pixels(off)), "HiDiffusion changed nothing above 768-v's training size"
    no_traceback(webui)


def checkpoint_keys(path: Path) -> set[str]:
    """The tensor names of a safetensors file (its header: a length, then JSON)."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        return set(json.loads(file.read(size))) - {"__metadata__"}


def test_sdxl_refiner_as_the_model_runs_unchanged_with_a_note(webui):
    # the webui's own rule for the refiner (modules/sd_models_config.py): OpenCLIP at index 0
    keys = checkpoint_keys(webui.ckpt_dir / f"{REFINER}.safetensors")
    assert "conditioner.embedders.0.model.ln_final.weight" in keys
    assert "conditioner.embedders.1.model.ln_final.weight" not in keys
    off = webui.once("refiner-off", REFINER, **ABOVE_1024)
    on = webui.txt2img(REFINER, ON, **ABOVE_1024)
    note = sa.unsupported_note("first pass", "the SDXL refiner")
    assert note_in(on, sa.SKIPPED_KEY, note), infotexts(on)[0]
    assert f"HiDiffusion: {note}" in webui.log_text()
    assert same(pixels(on), pixels(off)), "HiDiffusion changed the refiner's image"
    no_traceback(webui)


def test_sdxl_refiner_with_an_explicit_preset_is_refused(webui):
    from hidiffusion_lib.detection import RefinerUNet

    off = webui.once("refiner-off", REFINER, **ABOVE_1024)
    payload = webui.payload(REFINER, **ABOVE_1024)
    payload["alwayson_scripts"] = {"HiDiffusion": {"args": sa.to_positional({"enabled": True, "model": "SDXL"})}}
    status, body = webui.call("/sdapi/v1/txt2img", payload)
    message = sa.unsupported_message(RefinerUNet(""), "SDXL", "the SDXL refiner")
    assert status == 422 and body.get("errors") == message, (status, body)
    # the refusal leaves nothing patched: the next request without HiDiffusion is the baseline
    assert same(pixels(webui.txt2img(REFINER, **ABOVE_1024)), pixels(off))
