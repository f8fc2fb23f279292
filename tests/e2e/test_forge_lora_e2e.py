"""Forge's built-in Lora (sd_forge_lora, backend/patcher/lora.py) beside HiDiffusion, in a real
Forge (lllyasviel/stable-diffusion-webui-forge main), skipped unless FORGE_DIR is set (see
conftest.py): a random Lora made here that touches only the RAD downsampler's conv of the tiny
Forge SD 1.5 U-Net (``diffusion_model.input_blocks.3.0.op``, 320 -> 320 channels), in both of
Forge's Lora modes: weights patched into the model (the default, Diffusion in Low Bits
"Automatic") and online ("float8-e4m3fn (fp16 LoRA)": fp8 weights, and the op's forward casts
the weight and adds the Lora's delta through its ``weight_function`` at every call; Forge uses
the online mode only for low-bit weights, networks.py).

With T1 = 1 every step is a RAD step, and that conv runs only as RAD (HiDiffusion calls the op
itself, with stride 4), so any difference the Lora makes is made on RAD steps. 576x576, 2 steps
of Euler; one Forge for the module, about 2 minutes on 2 idle CPU cores (5 beside another busy webui).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from conftest import Webui, forge_checkpoint, infotexts, needs_forge, running_forge

from hidiffusion_lib import script_args as sa

pytestmark = needs_forge
LORA = "tiny-forge-rad-lora"
BASE = dict(prompt="a red cube", negative_prompt="", steps=2, width=576, height=576, sampler_name="Euler", seed=3,
            cfg_scale=7)
ARGS = sa.to_positional({"enabled": True, "t1": 1.0, "mswmsa": False})
CHANNELS = 320  # tiny_checkpoint.FORGE_SD1_CHANNELS: the conv of input block 3 maps 320 -> 320 channels
# Forge's Diffusion in Low Bits: the Lora patched into the weights, or applied online in the op's forward
MODES = {False: "Automatic", True: "float8-e4m3fn (fp16 LoRA)"}


def write_lora(folder: Path) -> Path:
    """A rank-4 Lora in the kohya layout on SD 1.x's first downsampler conv (Forge maps
    ``lora_unet_down_blocks_0_downsamplers_0_conv`` to ``diffusion_model.input_blocks.3.0.op``
    through huggingface_guess's diffusers names, packages_3rdparty/comfyui_lora_collection)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(7)
    key = "lora_unet_down_blocks_0_downsamplers_0_conv"
    rank = 4
    folder.mkdir(parents=True, exist_ok=True)
    save_file({
        f"{key}.lora_down.weight": torch.randn(rank, CHANNELS, 3, 3, generator=generator) * 0.1,
        f"{key}.lora_up.weight": torch.randn(CHANNELS, rank, 1, 1, generator=generator) * 0.3,
        f"{key}.alpha": torch.tensor(float(rank)),
    }, str(folder / f"{LORA}.safetensors"))
    return folder / f"{LORA}.safetensors"


def pixels(body: dict):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB"), dtype=int)


class Forge(Webui):
    trace: Path
    lora: Path

    def traced(self, prompt: str) -> tuple[dict, list[dict], str]:
        """One txt2img with HiDiffusion (T1 1); its body, trace records and Forge's console output."""
        log_start = len(self.log_text())
        trace_start = self.trace.stat().st_size if self.trace.exists() else 0
        body = self.generate("/sdapi/v1/txt2img", BASE, ARGS, prompt=prompt)
        with open(self.trace, encoding="utf-8") as file:
            file.seek(trace_start)
            records = [json.loads(line) for line in file]
        return body, records, self.log_text()[log_start:]


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("forge-lora")
    loras = data_dir / "lora"
    lora = write_lora(loras)
    trace = data_dir / "trace.jsonl"
    # unbuffered: Forge's "[LORA] Loaded ..." print() reaches the log before the request returns
    with running_forge(data_dir, forge_checkpoint(), env={"HIDIFFUSION_TRACE": str(trace), "PYTHONUNBUFFERED": "1"},
                       extra_args=("--lora-dir", str(loras))) as client:
        forge = Forge(client.url, client.log)
        forge.trace, forge.lora = trace, lora
        yield forge


def set_lora_mode(forge: Forge, online: bool) -> None:
    """Forge reads Diffusion in Low Bits when it refreshes its model loading parameters, which its
    options API does only when a checkpoint, module or memory option changes: nudge the inference
    memory by 1 MB with it (the model reloads at the next generation)."""
    status, options = forge.call("/sdapi/v1/options")
    assert status == 200, options
    if options.get("forge_unet_storage_dtype") == MODES[online]:
        return
    memory = options["forge_inference_memory"]
    nudged = memory + 1 if memory < 4096 else memory - 1
    status, body = forge.call("/sdapi/v1/options", {"forge_unet_storage_dtype": MODES[online],
                                                    "forge_inference_memory": nudged})
    assert status == 200, body


@pytest.mark.parametrize("online", [False, True], ids=["patched", "online"])
def test_lora_on_the_rad_conv_applies_on_rad_steps(forge, online):
    set_lora_mode(forge, online)
    with_lora, records, log = forge.traced(f"{BASE['prompt']} <lora:{LORA}:1>")
    # Forge matched the Lora's one key to the U-Net (no unmatched key, none skipped)
    assert f"[LORA] Loaded {forge.lora}" in log, log[-3000:]
    assert "with 1 keys at weight 1.0 (skipped 0 keys)" in log, log[-3000:]
    assert f"with on_the_fly = {online}" in log, log[-3000:]
    assert "unmatched keys" not in log and "Traceback" not in log, log[-3000:]
    (record,) = records
    assert record["forwards"] and all(f["main"] for f in record["forwards"]), record  # every step a RAD step
    plain, _, log = forge.traced(BASE["prompt"])
    assert "Traceback" not in log, log[-3000:]
    info = infotexts(with_lora)[0]
    assert f"Lora hashes: \"{LORA}: " in info and "HiDiffusion: True" in info, info
    difference = abs(pixels(with_lora) - pixels(plain)).max()
    assert difference > 8, f"the Lora changed the image by at most {difference}/255: its delta did not apply"
