"""HiDiffusion beside a T2I-Adapter unit of the real sd-webui-controlnet in a real webui (v1.10.x),
skipped unless WEBUI_DIR and CONTROLNET_DIR are set (see conftest.py): the tiny random SD 1.x
checkpoint, a tiny random T2I-Adapter (tiny_controlnet.py ``t2i-sd1``, loaded by the extension's
own loader, strictly), the "none" preprocessor on a synthetic control image, the engine's
per-forward trace (HIDIFFUSION_TRACE) as the test hook.

The extension computes the adapter's four features once from the control image and adds a copy
of them at every step to the outputs of input blocks 2, 5, 8 and 11 (scripts/adapter.py
PlugableAdapter, scripts/hook.py). On every forward HiDiffusion patches, the trace says each
feature the adapter handed over has the size of the block it lands on, RAU-Net steps (where
blocks 5, 8 and 11 are shrunk) included. 768x768 (1.5x the native side), 4 steps, T1 0.5:
RAU-Net runs at steps 0 and 1, not at steps 2 and 3. SDXL (``t2i-sdxl`` on the tiny SDXL
checkpoint: features added to input blocks 3, 5, 8 and the middle block) runs 1536x1536 for 3
steps: RAU-Net at step 0. A few minutes on a 2-core CPU.
"""

from __future__ import annotations

import pytest
from conftest import digest, infotexts, needs_controlnet, needs_webui, no_traceback
from test_controlnet_e2e import controlled_webui, unit

from hidiffusion_lib import script_args as sa

pytestmark = [needs_webui, needs_controlnet]
SIZE, STEPS = 768, 4
ON = sa.to_positional({"enabled": True, "t1": 0.5})
LANDS = (2, 5, 8, 11)  # scripts/hook.py t2i_injection for SD 1.x
LANDS_SDXL = (3, 5, 8, -1)  # ... and for SDXL (-1: the middle block, which keeps the last skip's size)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    with controlled_webui(tmp_path_factory.mktemp("webui-t2i-adapter"), "sd1", [("t2i-sd1", 0)]) as webui:
        yield webui


def sizes(forward: dict, key: str) -> list[tuple[int, int]]:
    return [tuple(size) for size in forward[key]]


def test_adapter_features_land_on_the_levels_of_every_step(sd1):
    one = [unit(sd1.model, SIZE, SIZE)]
    run = dict(steps=STEPS, width=SIZE, height=SIZE)
    on, records = sd1.run("/sdapi/v1/txt2img", ON, one, **run)
    (record,) = records
    forwards = record["forwards"]
    for forward in forwards:  # shown with -s: what the trace says
        print(f"step {forward['step']} main {forward['main']} skips {forward['skips']} features {forward['features']}")
    assert [f["main"] for f in forwards] == [True, True, False, False]
    latent = SIZE // 8
    full = [(latent, latent), (latent // 2,) * 2, (latent // 4,) * 2, (latent // 8,) * 2]  # the adapter's own
    for forward in forwards:
        skips = sizes(forward, "skips")
        assert forward["features"] is not None, f"no adapter features at step {forward['step']}: {forward}"
        assert sizes(forward, "features") == [skips[i] for i in LANDS], forward
        # on RAU-Net steps blocks 5, 8, 11 are shrunk, and the features with them
        assert (sizes(forward, "features") != full) == forward["main"], forward
        assert forward["residuals"] is None and forward["control"] is None  # no ControlNet ran
    info = infotexts(on)[0]
    assert ('HiDiffusion ControlNet: "first pass: 1 T2I-Adapter unit(s): features resized bicubic to the '
            "U-Net's levels (no recipe: it is for ControlNets)\"") in info
    assert digest(sd1.run("/sdapi/v1/txt2img", ON, one, **run)[0]) == digest(on)
    log = sd1.log_text()
    assert "tiny T2I-Adapter: loaded strictly" in log
    for bad in ("could not be applied", "size mismatch", "Error running"):
        assert bad not in log, bad
    no_traceback(sd1)


def test_off_is_unchanged_and_the_adapter_moves_the_image(sd1):
    one = [unit(sd1.model, SIZE, SIZE)]
    run = dict(steps=STEPS, width=SIZE, height=SIZE)
    without, records = sd1.run("/sdapi/v1/txt2img", None, one, **run)
    assert records == []
    off, records = sd1.run("/sdapi/v1/txt2img", [False], one, **run)
    assert records == [] and digest(off) == digest(without)
    assert "HiDiffusion ControlNet" not in infotexts(off)[0]
    no_unit, _ = sd1.run("/sdapi/v1/txt2img", None, [{**one[0], "enabled": False}], **run)
    assert digest(no_unit) != digest(without)  # the tiny adapter's features do reach the U-Net
    on, _ = sd1.run("/sdapi/v1/txt2img", ON, one, **run)
    assert digest(on) != digest(without)
    no_traceback(sd1)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    with controlled_webui(tmp_path_factory.mktemp("webui-t2i-adapter-sdxl"), "sdxl", [("t2i-sdxl", 0)],
                          settings={"live_previews_enable": False}) as webui:
        yield webui


def test_sdxl_adapter_features_land_on_the_levels_of_every_step(sdxl):
    size, steps = 1536, 3
    one = [unit(sdxl.model, size, size)]
    on, records = sdxl.run("/sdapi/v1/txt2img", [True], one, steps=steps, width=size, height=size)
    forwards = records[0]["forwards"]
    latent = size // 8
    full = [(latent // 2,) * 2, (latent // 2,) * 2, (latent // 4,) * 2, (latent // 4,) * 2]  # the adapter's own
    # sdxl_2048's T1 0.4 (an adapter is not a ControlNet: not its ratios): RAU-Net at step 0 of 3
    assert [f["main"] for f in forwards] == [True, False, False]
    assert 'HiDiffusion schedule: "sdxl_2048: T1 0.4, T2 0, aggressive"' in infotexts(on)[0]
    for forward in forwards:
        print(f"step {forward['step']} main {forward['main']} skips {forward['skips']} features {forward['features']}")
        skips = sizes(forward, "skips")
        assert forward["features"] is not None, f"no adapter features at step {forward['step']}: {forward}"
        assert sizes(forward, "features") == [skips[i] for i in LANDS_SDXL], forward
        assert (sizes(forward, "features") != full) == forward["main"], forward
    assert "T2I-Adapter unit(s): features resized bicubic" in infotexts(on)[0]
    log = sdxl.log_text()
    assert "tiny T2I-Adapter: loaded strictly" in log
    for bad in ("could not be applied", "size mismatch", "Error running"):
        assert bad not in log, bad
    no_traceback(sdxl)
