"""HiDiffusion beside multidiffusion-upscaler-for-automatic1111 (Tiled VAE, Tiled Diffusion) in a real
AUTOMATIC1111 webui (v1.10.x), skipped unless WEBUI_DIR and MULTIDIFFUSION_DIR are set (see
conftest.py). A tiny random-weight SD 1.x checkpoint, the engine's trace in a file.

- Tiled VAE only changes the VAE: the U-Net forwards (the trace) are those without it, the image
  is made at full size, and its log shows the tiled decode.
- Tiled Diffusion calls the U-Net on tiles near the training size, which is what RAU-Net is
  there to avoid needing: HiDiffusion steps aside for the pass, with a note, and the image is
  Tiled Diffusion's alone, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    MULTIDIFFUSION_DIR,
    infotexts,
    needs_multidiffusion,
    needs_webui,
    no_traceback,
    pixels,
    running_webui,
    same,
    write_checkpoint,
)

pytestmark = [needs_webui, needs_multidiffusion]
BASE = dict(prompt="a red cube", negative_prompt="", steps=2, sampler_name="Euler", seed=1, cfg_scale=7)
# scripts/tilevae.py ui(): enabled, encoder tile, decoder tile (latent px), to GPU, fast decoder,
# fast encoder, color fix
TILED_VAE = [True, 256, 48, False, True, True, False]
# scripts/tilediffusion.py ui(): enabled, method, overwrite size, keep input size, width, height,
# tile width, tile height, overlap (latent px), tile batch size
TILED_DIFFUSION = [True, "MultiDiffusion", False, True, 768, 768, 64, 64, 32, 1]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui")
    trace = workdir / "trace.jsonl"
    ckpt = write_checkpoint(workdir / "ckpt")
    extensions = {"multidiffusion-upscaler-e2e": Path(MULTIDIFFUSION_DIR)}
    with running_webui(workdir, ckpt, env={"HIDIFFUSION_TRACE": str(trace)}, extensions=extensions) as client:
        client.trace = trace
        yield client


def _run(webui, scripts: dict, **size) -> tuple[dict, list[dict]]:
    """One txt2img and the trace records it wrote."""
    start = webui.trace.stat().st_size if webui.trace.exists() else 0
    body = webui.generate("/sdapi/v1/txt2img", BASE, None,
                          alwayson_scripts={name: {"args": args} for name, args in scripts.items()}, **size)
    if not webui.trace.exists():
        return body, []
    with open(webui.trace, encoding="utf-8") as file:
        file.seek(start)
        return body, [json.loads(line) for line in file if line.strip()]


def test_tiled_vae_decodes_the_hidiffusion_image(webui):
    size = dict(width=1024, height=1024)
    _, plain_trace = _run(webui, {"HiDiffusion": [True]}, **size)
    before = webui.log_text().count("[Tiled VAE]")
    tiled, tiled_trace = _run(webui, {"HiDiffusion": [True], "Tiled VAE": TILED_VAE}, **size)
    assert webui.log_text().count("[Tiled VAE]") > before, "Tiled VAE did not run"
    assert plain_trace and tiled_trace == plain_trace, "Tiled VAE changed what the U-Net did"
    assert "HiDiffusion: True" in infotexts(tiled)[0]
    assert json.loads(tiled["info"])["width"] == 1024
    no_traceback(webui)


@pytest.mark.parametrize("method", ["MultiDiffusion", "Mixture of Diffusers"])
def test_tiled_diffusion_makes_hidiffusion_step_aside(webui, method):
    size = dict(width=768, height=768)
    tiles = [TILED_DIFFUSION[0], method, *TILED_DIFFUSION[2:]]
    alone, _ = _run(webui, {"HiDiffusion": [False], "Tiled Diffusion": tiles}, **size)
    both, trace = _run(webui, {"HiDiffusion": [True], "Tiled Diffusion": tiles}, **size)
    assert trace == [], "HiDiffusion patched a Tiled Diffusion pass"
    text = infotexts(both)[0]
    assert "HiDiffusion skipped" in text and "Tiled Diffusion" in text, text
    assert same(pixels(both), pixels(alone)), "the image is not Tiled Diffusion's alone"
    assert "HiDiffusion: first pass: off: Tiled Diffusion is on" in webui.log_text()
    # and HiDiffusion runs again once Tiled Diffusion is off
    _, after = _run(webui, {"HiDiffusion": [True]}, **size)
    assert after and after[0]["forwards"], "HiDiffusion did not run after Tiled Diffusion"
    no_traceback(webui)
