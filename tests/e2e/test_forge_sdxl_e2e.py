"""SDXL end to end through the HTTP API of a real Forge (lllyasviel/stable-diffusion-webui-forge
main, the Forge 2 ``backend/``), skipped unless FORGE_DIR is set (see conftest.py).

The checkpoint is tiny_checkpoint.py's ``forge-sdxl``: SDXL base's key names and detected U-Net
features with SSD-1B's transformer depths, which huggingface_guess matches to its SSD1B (a
subclass of SDXL), so Forge runs it as ``StableDiffusionXL`` (``is_sdxl``: its TAESD decoder is
write_taesd's ``taesdxl_decoder.pth``) with both text encoders at full size. 3.4 GiB, written
once into FORGE_MODELS (about a minute and 8.5 GB of memory). One Forge API-only with this
extension serves the module, the engine's trace written to a file (HIDIFFUSION_TRACE).

Images are 1024x1088 (latent 136x128: just above SDXL's native 1024x1024 area, so the native-size
gate lets HiDiffusion run), Euler, CFG 1 (Forge then skips the negative prompt: one U-Net call a
step), live previews off (Forge would download the SDXL preview approximation). Four images:
off; HiDiffusion with nothing but the switch on at 3 steps, where the sdxl_2048 preset's
aggressive rule runs the main switch (the CA pool after input block 4) on step 0; the extra switch
(RAD at input block 6, SDXL's block map) alone at 2 steps; off again, bit for bit the first.
On 2 CPU cores (shared with another test run) 20-36 s a step, 50-130 s an image (the first
loads the model); about 6 minutes in all, the checkpoint written beforehand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import Webui, forge_checkpoint, infotexts, needs_forge, pixels, running_forge, same

from hidiffusion_lib import script_args as sa

pytestmark = needs_forge
BASE = dict(prompt="a red cube", negative_prompt="", steps=3, width=1024, height=1088, sampler_name="Euler", seed=1,
            cfg_scale=1)
LATENT = (136, 128)  # (height, width)
OFF = [False]
PRESET = [True]  # everything else Auto: the sdxl_2048 preset, T1 0.4, T2 0, aggressive
# The extra switch alone: aggressive off, T1 0.4 gives int(2 * 0.4) = 0 steps, T2 0.5 step 0
EXTRA = sa.to_positional({"enabled": True, "t2": 0.5, "aggressive": "Off"})


class Forge(Webui):
    trace: Path
    made: dict

    def image(self, key: str, args: list, **overrides):
        """(pixels, infotext, trace records) of a txt2img made once per module."""
        if key not in self.made:
            start = self.trace.stat().st_size if self.trace.exists() else 0
            body = self.generate("/sdapi/v1/txt2img", BASE, args, **overrides)
            records = []
            if self.trace.exists():
                with open(self.trace, encoding="utf-8") as file:
                    file.seek(start)
                    records = [json.loads(line) for line in file]
            self.made[key] = (pixels(body), infotexts(body)[0], records)
        return self.made[key]


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("forge-sdxl")
    trace = data_dir / "trace.jsonl"
    with running_forge(data_dir, forge_checkpoint(kind="forge-sdxl"), env={"HIDIFFUSION_TRACE": str(trace)}) as client:
        status, body = client.call("/sdapi/v1/options", {"live_previews_enable": False})
        assert status == 200, body
        forge = Forge(client.url, client.log)
        forge.trace, forge.made = trace, {}
        start = len(forge.log_text())  # the start-up prints one traceback: the linked checkout has no git remote
        yield forge
        new = forge.log_text()[start:]
    assert "Traceback" not in new, new[-3000:]


def test_forge_loads_it_as_sdxl_and_off_has_no_trace(forge):
    pixels_off, text, records = forge.image("off", OFF)
    assert pixels_off.shape == (BASE["height"], BASE["width"], 3)
    assert "HiDiffusion" not in text and "Model: tiny-forge-sdxl" in text, text
    assert records == []
    log = forge.log_text()
    # the SDXL pipeline's components (huggingface_guess's SDXL family: clip_l and clip_g), all keys used
    assert "StateDict Keys: {'unet': 720, 'vae': 248, 'text_encoder': 196, 'text_encoder_2': 518, 'ignore': 0}" in log
    assert "Failed to recognize model type" not in log and "missing" not in log.lower(), log[-3000:]


def test_preset_runs_the_main_switch_on_step_0(forge):
    on, text, records = forge.image("preset", PRESET)
    assert "HiDiffusion: True" in text and 'HiDiffusion schedule: "sdxl_2048: T1 0.4, T2 0, aggressive"' in text, text
    assert len(records) == 1 and records[0]["sampler"] == "Euler", records
    forwards = records[0]["forwards"]
    assert [f["step"] for f in forwards] == [0, 1, 2], forwards  # CFG 1: one call a step
    assert all((f["height"], f["width"], f["steps"]) == (*LATENT, 3) for f in forwards), forwards
    # aggressive: the extra switch while step < int(8 / 50 * 3) = 0, the main one while 0 <= step < int(0.4 * 3) = 1
    assert [(f["main"], f["extra"]) for f in forwards] == [(True, False), (False, False), (False, False)], forwards
    assert all(f["windows"] for f in forwards), forwards  # MSW-MSA on every step
    h, w = LATENT
    plain = [(h, w)] * 3 + [(h // 2, w // 2)] * 3 + [(h // 4, w // 4)] * 3
    # the pool halves input block 4's output: level 1's second half and level 2 run at half size
    pooled = [(h, w)] * 3 + [(h // 2, w // 2)] + [(h // 4, w // 4)] * 2 + [(h // 8, w // 8)] * 3
    assert [[tuple(s) for s in f["skips"]] for f in forwards] == [pooled, plain, plain], forwards
    assert not same(on, forge.image("off", OFF)[0])  # the image itself, not only its infotext


def test_extra_switch_is_rad_at_input_block_6(forge):
    on, text, records = forge.image("extra", EXTRA, steps=2)
    assert 'HiDiffusion schedule: "sdxl_2048: T1 0.4, T2 0.5"' in text, text
    assert on.std() > 0  # not flat (a NaN latent decodes to one colour)
    (record,) = records
    forwards = record["forwards"]
    assert [(f["step"], f["main"], f["extra"]) for f in forwards] == [(0, False, True), (1, False, False)], forwards
    h, w = LATENT
    # stride 4 instead of 2 in input block 6's Downsample: level 2 runs at a quarter of level 1
    assert [tuple(s) for s in forwards[0]["skips"]][5:] == [(h // 2, w // 2)] + [(h // 8, w // 8)] * 3, forwards
    assert [tuple(s) for s in forwards[1]["skips"]][5:] == [(h // 2, w // 2)] + [(h // 4, w // 4)] * 3, forwards


def test_off_after_on_is_bit_identical_to_off_before(forge):
    before = forge.image("off", OFF)[0]
    forge.image("preset", PRESET)
    after, text, records = forge.image("off-after", OFF)
    assert "HiDiffusion" not in text and records == [], text
    assert same(after, before)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
