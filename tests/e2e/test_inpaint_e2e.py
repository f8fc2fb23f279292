"""Inpainting models with HiDiffusion in a real AUTOMATIC1111 webui (v1.10.x), skipped unless
WEBUI_DIR is set (see conftest.py): tiny random-weight checkpoints with the SD 1.5-inpainting
and SDXL inpainting layouts (9 input channels), in txt2img and in img2img inpainting.

The authors' pipelines treat an inpainting U-Net as its family (the same block map and ratios)
except that SDXL's aggressive split is off for it. The infotext's ``HiDiffusion schedule`` says
what ran; the SDXL base checkpoint beside them shows the split on at the same size.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import infotexts, needs_webui, no_traceback, pixels, png_base64, running_webui, same, write_checkpoint

pytestmark = needs_webui
BASE = dict(prompt="a red cube", negative_prompt="", steps=2, sampler_name="Euler", seed=1, cfg_scale=7)
SD1 = dict(width=768, height=768)
SDXL = dict(width=1280, height=1280)  # above 1024 and below 2048: the sdxl_2048 preset, where the split applies


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui")
    folder = workdir / "ckpt"
    # no live previews: for SDXL the webui would fetch its preview decoder (VAEApprox) from the web
    (workdir / "config.json").write_text(json.dumps({"live_previews_enable": False}))
    for kind in ("sdxl", "sdxl-inpaint"):
        write_checkpoint(folder, kind)
    with running_webui(workdir, write_checkpoint(folder, "sd1-inpaint")) as client:
        yield client


def _png(size: tuple[int, int], color: tuple[int, int, int], box: tuple[int, int, int, int] | None = None) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    if box:
        ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
    return png_base64(image)


def _schedule(body: dict) -> str:
    text = infotexts(body)[0]
    assert "HiDiffusion: True" in text and "HiDiffusion skipped" not in text, text
    found = re.search(r'HiDiffusion schedule: ("[^"]*"|[^,]*)', text)
    assert found, text
    return found.group(1).strip('"')


def _both(webui, checkpoint: str, size: dict, route: str = "txt2img", **extra) -> tuple[dict, dict]:
    """(off, on) for one checkpoint."""
    settings = {"sd_model_checkpoint": checkpoint}
    bodies = []
    for on in (False, True):
        bodies.append(webui.generate(f"/sdapi/v1/{route}", BASE, [on], override_settings=settings,
                                     override_settings_restore_afterwards=False, **size, **extra))
    return bodies[0], bodies[1]


def _inpaint(size: dict) -> dict:
    w, h = size["width"], size["height"]
    mask = _png((w, h), (0, 0, 0), (w // 4, h // 4, w // 2, h // 2))
    return dict(init_images=[_png((w, h), (40, 90, 160))], mask=mask, denoising_strength=0.9, inpainting_fill=1,
                inpaint_full_res=False, mask_blur=4)


@pytest.mark.parametrize("route", ["txt2img", "img2img"])
def test_sd15_inpainting_model_gets_its_family_schedule(webui, route):
    extra = _inpaint(SD1) if route == "img2img" else {}
    off, on = _both(webui, "tiny-sd1-inpaint", SD1, route, **extra)
    assert _schedule(on) == "sd15_1024: T1 0.4, T2 0"
    assert not same(pixels(off), pixels(on)), "HiDiffusion changed nothing on the inpainting model"
    no_traceback(webui)


@pytest.mark.parametrize("route", ["txt2img", "img2img"])
def test_sdxl_inpainting_model_runs_without_the_aggressive_split(webui, route):
    extra = _inpaint(SDXL) if route == "img2img" else {}
    base = webui.generate(f"/sdapi/v1/{route}", BASE, [True], override_settings={"sd_model_checkpoint": "tiny-sdxl"},
                          override_settings_restore_afterwards=False, **SDXL, **extra)
    assert _schedule(base) == "sdxl_2048: T1 0.4, T2 0, aggressive"
    off, on = _both(webui, "tiny-sdxl-inpaint", SDXL, route, **extra)
    assert _schedule(on) == "sdxl_2048: T1 0.4, T2 0"
    assert not same(pixels(off), pixels(on)), "HiDiffusion changed nothing on the inpainting model"
    no_traceback(webui)
