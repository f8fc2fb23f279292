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
RAU-Net runs at steps 0 and 1, not at steps 2 and 3. A few minutes on a 2-core CPU.
"""

from __future__ import annotations

import pytest
from conftest import digest, infotexts, needs_controlnet, needs_webui, no_traceback, running_webui, write_checkpoint
from conftest import write_controlnet as write_model
from test_controlnet_e2e import Controlled, unit

from hidiffusion_lib import script_args as sa

pytestmark = [needs_webui, needs_controlnet]
SIZE, STEPS = 768, 4
ON = sa.to_positional({"enabled": True, "t1": 0.5})
LANDS = (2, 5, 8, 11)  # scripts/hook.py t2i_injection for SD 1.x


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui-t2i-adapter")
    ckpt = write_checkpoint(workdir / "ckpt")
    models = workdir / "controlnet"
    adapter = write_model(models, "t2i-sd1")
    trace = workdir / "trace.jsonl"
    with running_webui(workdir, ckpt, env={"HIDIFFUSION_TRACE": str(trace)}, controlnet_models=models) as client:
        webui = Controlled(client.url, client.log)
        webui.trace, webui.model = trace, adapter.stem
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
