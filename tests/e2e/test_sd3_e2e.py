"""SD3 end to end against a real AUTOMATIC1111 webui (v1.10.x), skipped unless WEBUI_DIR is set:
HiDiffusion has no block map for SD3's MMDiT, so with the Model preset on Auto a generation
runs unchanged and says so (infotext and console, in the UI's words), and an explicit preset
is refused naming the Model preset, leaving nothing patched; the checkbox left ticked across
a switch from SD 1.x to SD3 and back does not get in the way.

The module writes a tiny random-weight SD3 checkpoint (tests/e2e/tiny_checkpoint.py ``sd3``:
a 2-block MMDiT with the full-size CLIP-L/G text encoders and VAE the webui insists on, 1.7
GiB, cached in the temp directory by conftest's ``webui_checkpoint``) and its HF home with the
two tokenizers the webui takes from the hub (HF_HOME points there; the webui runs offline),
and a tiny SD 1.x checkpoint beside it; it starts one webui API-only on SD3 and switches with
``override_settings`` (not restored afterwards: each switch loads once).

Cost: the MMDiT's steps take seconds, but the full-size SD3 VAE takes 2.5 minutes to decode
1088x1024 on a 2-core CPU; the webui decodes with TAESD instead (its "VAE type for decode"
setting; conftest's hand-set ``taesd3_decoder.pth`` and ``taesd_decoder.pth`` in the test's own
``--models-dir``, so the webui downloads nothing). Every image is compared by its pixels: the PNG
carries the infotext. About 3 minutes, most of it loading models.
"""

from __future__ import annotations

import json

import pytest
from conftest import (
    Webui,
    infotexts,
    needs_webui,
    pixels,
    running_webui,
    same,
    webui_checkpoint,
    write_checkpoint,
    write_taesd,
)

from hidiffusion_lib import script_args as sa

pytestmark = needs_webui

SD3, SD1 = "tiny-sd3", "tiny-sd1"
SETTINGS = {"live_previews_enable": False, "sd_vae_decode_method": "TAESD"}
# 1088x1024: larger than SD3's 1024x1024 in area, so no native-size gate answers first
BASE = dict(prompt="a red cube", negative_prompt="", steps=2, width=1088, height=1024, sampler_name="Euler",
            seed=1, cfg_scale=5, override_settings_restore_afterwards=False)
SD1_SIZE = dict(width=768, height=768)  # above SD 1.x's 512x512: HiDiffusion applies
MODEL_PRESET = sa.ARGS[sa.ARG_NAMES.index("model")].label
SD3_NAME = sa.FAMILIES["sd3"][0]
NOTE = sa.unsupported_note("first pass", SD3_NAME)


class Sd3(Webui):
    def __init__(self, url: str, log=None):
        super().__init__(url, log)
        self.made: dict[str, dict] = {}

    def txt2img(self, model: str, args: list | None = None, **overrides) -> dict:
        """txt2img on ``model`` (switched to first unless loaded)."""
        return self.generate("/sdapi/v1/txt2img", {**BASE, "override_settings": {"sd_model_checkpoint": model}},
                             args, **overrides)

    def baseline(self) -> dict:
        """SD3 without HiDiffusion (its args not sent), made once per module."""
        if "baseline" not in self.made:
            self.made["baseline"] = self.txt2img(SD3)
        return self.made["baseline"]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui-sd3")
    (workdir / "config.json").write_text(json.dumps(SETTINGS))
    write_taesd(workdir / "models" / "VAE-taesd")
    sd3 = webui_checkpoint("sd3")
    ckpt_dir = workdir / "ckpt"
    write_checkpoint(ckpt_dir, "sd1")
    (ckpt_dir / sd3.name).symlink_to(sd3)  # both in the one --ckpt-dir the webui lists
    # unbuffered: the console note must be in the log when the request returns
    env = {"HF_HOME": str(sd3.parent / f"{SD3}-hf"), "PYTHONUNBUFFERED": "1"}
    with running_webui(workdir, ckpt_dir / sd3.name, env=env,
                       extra_args=("--models-dir", str(workdir / "models"))) as client:
        print(f"webui log: {client.log}")
        yield Sd3(client.url, client.log)


def test_auto_runs_unchanged_with_a_note(webui):
    baseline = webui.baseline()  # first: a patch left behind would change it too
    assert pixels(baseline).std() > 10  # not a flat image: comparing pixels can see a change
    body = webui.txt2img(SD3, [True])
    info = infotexts(body)[0]
    assert f"Model: {SD3}," in info and f"Size: {BASE['width']}x{BASE['height']}" in info
    assert f"{sa.SKIPPED_KEY}: " in info and NOTE in info, info
    assert f"HiDiffusion: {NOTE}" in webui.log_text()
    assert same(pixels(body), pixels(baseline))


def test_explicit_preset_is_refused_naming_it_and_leaves_nothing(webui):
    baseline = webui.baseline()
    preset = sa.to_positional({"enabled": True, "model": "SD 1.x"})
    status, body = webui.call("/sdapi/v1/txt2img", {**BASE, "override_settings": {"sd_model_checkpoint": SD3},
                                                     "alwayson_scripts": {"HiDiffusion": {"args": preset}}})
    assert status == 422, body.get("info", body)  # (an image's infotext, not its base64)
    assert body["errors"].startswith(f'HiDiffusion: {MODEL_PRESET} "SD 1.x" does not fit the loaded model: '
                                     f"{SD3_NAME} is not a U-Net"), body
    assert same(pixels(webui.txt2img(SD3, [False])), pixels(baseline))
    assert same(pixels(webui.txt2img(SD3)), pixels(baseline))


def test_checkbox_left_ticked_across_model_switches(webui):
    baseline = webui.baseline()
    on_sd1 = webui.txt2img(SD1, [True], **SD1_SIZE)
    info = infotexts(on_sd1)[0]
    assert f"Model: {SD1}," in info and "HiDiffusion schedule" in info and sa.SKIPPED_KEY not in info, info
    switched = webui.txt2img(SD3, [True])
    assert f"Model: {SD3}," in infotexts(switched)[0] and NOTE in infotexts(switched)[0]
    assert same(pixels(switched), pixels(baseline))
    back = webui.txt2img(SD1, [True], **SD1_SIZE)
    assert sa.SKIPPED_KEY not in infotexts(back)[0]
    assert same(pixels(back), pixels(on_sd1))  # HiDiffusion applies again, as it did before the switch
    assert not same(pixels(back), pixels(webui.txt2img(SD1, **SD1_SIZE)))  # (and it changes the image)

