"""HiDiffusion beside an IP-Adapter unit of the real sd-webui-controlnet in a real webui (v1.10.x),
skipped unless WEBUI_DIR and CONTROLNET_DIR are set (see conftest.py): the tiny random SD 1.x
checkpoint, a tiny random IP-Adapter for it and a random CLIP ViT-H image encoder in place of the
one the extension downloads (tiny_controlnet.py ``ip-sd1``, ``clip-h``), the extension's own
"ip-adapter_clip_sd15" preprocessor on a synthetic reference image.

An IP-Adapter adds its image tokens to every cross-attention (scripts/ipadapter/
plugable_ipadapter.py replaces each ``attn2.forward``), not to the skips, and MSW-MSA windows
only the self-attention: the two meet on RAU-Net's shrunk levels, where the cross-attentions see
fewer tokens. The engine's trace (HIDIFFUSION_TRACE) says what each U-Net forward's blocks
output; the IP-Adapter's calls are traced too (TINY_IPADAPTER_TRACE, tiny_controlnet.py): on
every forward, each of its 16 cross-attentions ran on the tokens of its block at that step,
RAU-Net steps included, and added to them. 1024x1024 (2x the native side), 4 steps, T1 0.5:
RAU-Net runs at steps 0 and 1. The region mask (the unit's ``effective_region_mask``) is resized
to each attention's own token grid on those steps (hidiffusion_lib.controlnet.install_region_mask),
at a size whose shrunk levels the extension's own grid rule misses too. About 5 minutes on a
2-core CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import (
    cached_model,
    control_image,
    infotexts,
    needs_controlnet,
    needs_webui,
    no_traceback,
    pixels,
    png_base64,
    same,
    webui_models,
    webui_python,
)
from test_controlnet_e2e import Controlled, controlled_webui

from hidiffusion_lib import script_args as sa

pytestmark = [needs_webui, needs_controlnet]
SIZE, STEPS = 1024, 4
ON = sa.to_positional({"enabled": True, "t1": 0.5})
RUN = dict(steps=STEPS, width=SIZE, height=SIZE)
LAYERS = 16  # SD 1.x's cross-attentions: input blocks 1, 2, 4, 5, 7, 8, the middle, output blocks 3-11


class IPControlled(Controlled):
    ip_trace: Path

    def run_ip(self, hidiffusion: list | None, units: list[dict], **overrides) -> tuple[dict, list[dict], list[dict]]:
        """One txt2img; returns its body, the engine's trace records and the IP-Adapter's calls."""
        start = self.ip_trace.stat().st_size if self.ip_trace.exists() else 0
        body, records = self.run("/sdapi/v1/txt2img", hidiffusion, units, **{**RUN, **overrides})
        calls = []
        if self.ip_trace.exists():
            with open(self.ip_trace, encoding="utf-8") as file:
                file.seek(start)
                calls = [json.loads(line) for line in file]
        return body, records, calls


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui-ip-adapter")
    # 1.3 GB, kept across runs (WEBUI_MODELS); linked where the extension looks for it: running_webui gives it
    # workdir/controlnet-annotators as its preprocessor folder, clip_vision/ under it
    clip = cached_model(webui_models(), "clip_h.pth", webui_python(), "tiny_controlnet.py", "clip-h")
    (workdir / "controlnet-annotators" / "clip_vision").mkdir(parents=True)
    (workdir / "controlnet-annotators" / "clip_vision" / "clip_h.pth").symlink_to(clip)
    ip_trace = workdir / "ip-trace.jsonl"
    with controlled_webui(workdir, "sd1", [("ip-sd1", 0)], env={"TINY_IPADAPTER_TRACE": str(ip_trace)},
                          cls=IPControlled) as webui:
        webui.ip_trace = ip_trace
        yield webui


def ip_unit(model: str, **overrides) -> dict:
    return {"enabled": True, "module": "ip-adapter_clip_sd15", "model": model, "image": control_image(512, 512),
            "weight": 1.0, "save_detected_map": False, **overrides}


def region_mask(width: int, height: int) -> str:
    """The left half white: the IP-Adapter acts there only."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    ImageDraw.Draw(image).rectangle([0, 0, width // 2 - 1, height], fill="white")
    return png_base64(image)


def per_forward(calls: list[dict]) -> list[dict[int, dict]]:
    """The IP-Adapter's calls grouped by U-Net forward (each forward calls all 16 once)."""
    assert len(calls) % LAYERS == 0, f"{len(calls)} calls are not whole forwards of {LAYERS}"
    forwards = [{c["number"]: c for c in calls[i:i + LAYERS]} for i in range(0, len(calls), LAYERS)]
    assert all(sorted(f) == list(range(LAYERS)) for f in forwards), "a forward missed a cross-attention"
    return forwards


def assert_ip_attends_each_block(forwards: list[dict], calls: list[dict]) -> None:
    """Each traced forward's IP calls ran on the tokens its blocks had at that step (an input
    block's transformer on the previous block's output, the middle block's on the last
    skip), and each added to them."""
    ip = per_forward(calls)
    assert len(ip) == len(forwards), (len(ip), len(forwards))
    for forward, layers in zip(forwards, ip, strict=True):
        skips = forward["skips"]
        for call in layers.values():
            block = call["block"]
            if block.startswith("input_blocks."):
                assert call["tokens"] == math.prod(skips[int(block.split(".")[1]) - 1]), (forward["step"], block, call)
            elif block == "middle_block":
                assert call["tokens"] == math.prod(skips[-1]), (forward["step"], call)
            assert call["moved"], f"the IP-Adapter added nothing at {block}, step {forward['step']}"


def test_ip_adapter_attends_on_the_levels_of_every_step(sd1):
    one = [ip_unit(sd1.model)]
    on, records, calls = sd1.run_ip(ON, one)
    (record,) = records
    forwards = record["forwards"]
    for forward, layers in zip(forwards, per_forward(calls), strict=True):  # shown with -s
        tokens = {c["block"]: c["tokens"] for _, c in sorted(layers.items())}
        print(f"step {forward['step']} main {forward['main']} skips {forward['skips']} ip tokens {tokens}")
    assert [f["main"] for f in forwards] == [True, True, False, False]
    assert_ip_attends_each_block(forwards, calls)
    level1 = (SIZE // 16) ** 2  # input block 4's tokens at full size: RAU-Net shrinks them
    fourth = [layers[3]["tokens"] for layers in per_forward(calls)]
    assert [t < level1 for t in fourth] == [True, True, False, False], fourth
    info = infotexts(on)[0]
    assert "HiDiffusion: True" in info and "HiDiffusion ControlNet" not in info, info
    again, _, _ = sd1.run_ip(ON, one)
    assert same(pixels(again), pixels(on))
    log = sd1.log_text()
    assert "ip-adapter_clip_sd15" in log or "ip-adapter_clip_h" in log, "the preprocessor did not run"
    for bad in ("could not be applied", "size mismatch", "Error running"):
        assert bad not in log, bad
    no_traceback(sd1)


def test_off_is_unchanged_and_the_ip_adapter_moves_the_image(sd1):
    one = [ip_unit(sd1.model)]
    without, records, calls = sd1.run_ip(None, one)
    assert records == [] and len(calls) == STEPS * LAYERS
    off, records, _ = sd1.run_ip([False], one)
    assert records == [] and same(pixels(off), pixels(without))
    on, _, _ = sd1.run_ip(ON, one)
    no_ip, _, calls = sd1.run_ip(ON, [{**one[0], "enabled": False}])
    assert calls == []
    assert not same(pixels(on), pixels(no_ip)), "the IP-Adapter did not move the HiDiffusion image"
    assert not same(pixels(on), pixels(without)), "HiDiffusion did not move the IP-Adapter image"
    no_traceback(sd1)


@pytest.mark.parametrize("width, height", [(1024, 1024), (1088, 832)])
def test_region_mask_fits_every_level(sd1, width, height):
    """The extension resizes the mask to a grid it infers from each cross-attention's token
    count and the latent's aspect (``apply_effective_region_mask``), which RAU-Net's shrunk
    levels need not keep: at 1088x832 the middle block has 9x7 tokens where it infers 9x6, and
    the generation failed (HTTP 500, "The size of tensor a (63) must match the size of tensor b
    (54)") before HiDiffusion resized the mask to the tokens' own grid."""
    masked = [ip_unit(sd1.model, effective_region_mask=region_mask(width, height))]
    body, records, calls = sd1.run_ip(ON, masked, width=width, height=height)
    assert_ip_attends_each_block(records[0]["forwards"], calls)
    assert "1 IP-Adapter region mask(s): resized to each level's tokens" in infotexts(body)[0]
    whole, _, _ = sd1.run_ip(ON, [ip_unit(sd1.model)], width=width, height=height)
    assert not same(pixels(body), pixels(whole)), "the region mask changed nothing"
    no_traceback(sd1)
