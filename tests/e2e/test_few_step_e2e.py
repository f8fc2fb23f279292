"""Few-step generation (1, 2, 4, 8 steps, as Turbo, Lightning, LCM, Hyper and DMD2 models run) with
HiDiffusion in a real AUTOMATIC1111 webui (v1.10.x), skipped unless WEBUI_DIR is set (see
conftest.py): the engine's trace says which RAU-Net switch ran at every step, and it must be the
authors' rule, a switch on while ``step < int(steps * ratio)`` and the aggressive split handing
over at ``int(8 / 50 * steps)``, computed here from the presets' published ratios.
"""

from __future__ import annotations

import json

import pytest
from conftest import needs_webui, no_traceback, running_webui, write_checkpoint

from hidiffusion_lib import script_args as sa

pytestmark = needs_webui
BASE = dict(prompt="a red cube", negative_prompt="", seed=1, cfg_scale=1.5)
STEPS = (1, 2, 4, 8)


def authors(steps: int, t1: float, t2: float = 0.0, aggressive: bool = False) -> list[tuple[bool, bool]]:
    """(main, extra) at each step by the authors' rule (hidiffusion 0.1.10)."""
    if aggressive:
        handover = int(8 / 50 * steps)
        return [(handover <= step < int(steps * t1), step < handover) for step in range(steps)]
    return [(step < int(steps * t1), step < int(steps * t2)) for step in range(steps)]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui")
    trace = workdir / "trace.jsonl"
    # no live previews: for SDXL the webui would fetch its preview decoder (VAEApprox) from the web
    (workdir / "config.json").write_text(json.dumps({"live_previews_enable": False}))
    write_checkpoint(workdir / "ckpt", "sdxl")
    with running_webui(workdir, write_checkpoint(workdir / "ckpt"), env={"HIDIFFUSION_TRACE": str(trace)}) as client:
        client.trace = trace
        yield client


def switches(webui, checkpoint: str, model: str, steps: int, sampler: str, size: int) -> list[tuple[bool, bool]]:
    """(main, extra) of every model call of one txt2img, from the trace."""
    start = webui.trace.stat().st_size if webui.trace.exists() else 0
    webui.generate("/sdapi/v1/txt2img", BASE, sa.to_positional({"enabled": True, "model": model}),
                   steps=steps, sampler_name=sampler, width=size, height=size,
                   override_settings={"sd_model_checkpoint": checkpoint}, override_settings_restore_afterwards=False)
    with open(webui.trace, encoding="utf-8") as file:
        file.seek(start)
        records = [json.loads(line) for line in file if line.strip()]
    assert len(records) == 1, records
    forwards = records[0]["forwards"]
    assert [f["step"] for f in forwards] == list(range(steps)), forwards  # one call a step (Euler, LCM)
    return [(f["main"], f["extra"]) for f in forwards]


@pytest.mark.parametrize("sampler", ["Euler", "LCM"])
def test_sd15_preset_at_few_steps(webui, sampler):
    for steps in STEPS:  # sd15_1024 at 768x768: T1 0.4, no extra switch
        assert switches(webui, "tiny-sd1", "Auto", steps, sampler, 768) == authors(steps, 0.4), steps
    no_traceback(webui)


def test_sdxl_presets_at_few_steps(webui):
    for steps in STEPS:  # 1280x1280: sdxl_2048 (T1 0.4, aggressive), and the Turbo preset (T1 0.5, no extra)
        assert switches(webui, "tiny-sdxl", "Auto", steps, "Euler", 1280) == authors(steps, 0.4, aggressive=True), steps
        turbo = switches(webui, "tiny-sdxl", "SDXL-Turbo/Lightning", steps, "Euler", 1280)
        assert turbo == authors(steps, 0.5), steps
    # the facts the README states: nothing at 1 step; Turbo's main switch from 2 steps on
    assert authors(1, 0.5) == [(False, False)] and authors(2, 0.5)[0] == (True, False)
    no_traceback(webui)
