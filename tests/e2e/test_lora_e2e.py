"""The webui's built-in Lora beside HiDiffusion, in a real webui (skipped unless WEBUI_DIR is set):
a random Lora made here that touches only the RAD downsampler's conv
(``diffusion_model.input_blocks.3.0.op``), in both of Lora's modes (weights merged, and
"lora_functional", which adds its own conv built with the module's stride at load time).

With T1 = 1 every step is a RAD step, and that conv runs only as RAD, so any difference the
Lora makes is made on RAD steps. Both modes compute the same delta, so their images agree.
"""

from __future__ import annotations

import base64
import io

import pytest
import torch
from conftest import infotexts, needs_webui, no_traceback, running_webui, write_checkpoint
from safetensors.torch import save_file

from hidiffusion_lib import script_args as sa

pytestmark = needs_webui
LORA = "tiny-rad-lora"
BASE = dict(prompt="a red cube", negative_prompt="", steps=2, width=640, height=640, sampler_name="Euler", seed=3,
            cfg_scale=7)
ARGS = sa.to_positional({"enabled": True, "t1": 1.0, "mswmsa": False})
CHANNELS = 32  # tiny_checkpoint.UNET_CHANNELS: the conv of input block 3 maps 32 -> 32 channels


def write_lora(folder) -> None:
    """A rank-4 Lora in the kohya layout on SD 1.x's first downsampler conv (the webui maps
    ``lora_unet_down_blocks_0_downsamplers_0_conv`` to ``input_blocks_3_0_op``)."""
    generator = torch.Generator().manual_seed(7)
    key = "lora_unet_down_blocks_0_downsamplers_0_conv"
    rank = 4
    save_file({
        f"{key}.lora_down.weight": torch.randn(rank, CHANNELS, 3, 3, generator=generator) * 0.3,
        f"{key}.lora_up.weight": torch.randn(CHANNELS, rank, 1, 1, generator=generator) * 0.3,
        f"{key}.alpha": torch.tensor(float(rank)),
    }, str(folder / f"{LORA}.safetensors"))


def pixels(body: dict):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui-lora")
    ckpt = write_checkpoint(workdir / "ckpt")
    loras = workdir / "lora"
    loras.mkdir()
    write_lora(loras)
    with running_webui(workdir, ckpt, extra_args=("--lora-dir", str(loras))) as client:
        yield client


@pytest.mark.parametrize("functional", [False, True], ids=["merged", "functional"])
def test_lora_on_the_rad_conv_applies_on_rad_steps(webui, functional):
    status, _ = webui.call("/sdapi/v1/options", {"lora_functional": functional})
    assert status == 200
    # with the Lora first: the webui leaves the last merged weights in the model when the mode
    # switches to functional, until a generation with a Lora restores them (networks.py
    # network_forward returns early without loaded networks)
    with_lora = webui.generate("/sdapi/v1/txt2img", BASE, ARGS, prompt=f"{BASE['prompt']} <lora:{LORA}:1>")
    plain = webui.generate("/sdapi/v1/txt2img", BASE, ARGS)
    assert f"Lora hashes: \"{LORA}" in infotexts(with_lora)[0], infotexts(with_lora)[0]
    assert "HiDiffusion: True" in infotexts(with_lora)[0]
    difference = abs(pixels(with_lora) - pixels(plain)).max()
    assert difference > 8, f"the Lora changed the image by at most {difference}/255: its delta did not apply"
    webui.results = getattr(webui, "results", {})
    webui.results[functional] = pixels(with_lora)
    no_traceback(webui)


def test_both_lora_modes_give_the_same_image(webui):
    results = getattr(webui, "results", {})
    if len(results) < 2:
        pytest.skip("needs both modes' images (run the whole module)")
    difference = abs(results[True] - results[False]).max()
    assert difference <= 2, f"merged and functional Lora differ by {difference}/255 on RAD steps"
