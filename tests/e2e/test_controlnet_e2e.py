"""HiDiffusion beside the real sd-webui-controlnet in a real webui (v1.10.x), skipped unless
WEBUI_DIR and CONTROLNET_DIR are set (see conftest.py): tiny random SD 1.x / SDXL checkpoints and
tiny random ControlNets (tiny_controlnet.py), the "none" preprocessor on a synthetic control
image, the engine's per-forward trace (HIDIFFUSION_TRACE) as the test hook.

On every forward HiDiffusion patches, the trace says the residuals the control model handed to
sd-webui-controlnet have the sizes of the skips they are added to (RAU-Net steps included), and
the size the control model ran at. SD 1.x runs 1024x1024 (2x its native side) for 4 steps with
T1 0.5, so RAU-Net runs at steps 0 and 1 and the recipe's 60% ends after step 2 (steps 0-2 run
the ControlNet); SDXL runs 2048x2048 for 2 steps. About 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import (
    Webui,
    control_image,
    digest,
    infotexts,
    needs_controlnet,
    needs_webui,
    no_traceback,
    running_webui,
    write_checkpoint,
    write_controlnet,
)

from hidiffusion_lib import script_args as sa

pytestmark = [needs_webui, needs_controlnet]
STEPS = 4
BASE = dict(prompt="a red cube", negative_prompt="", steps=STEPS, width=1024, height=1024, sampler_name="Euler",
            seed=1, cfg_scale=7)
ON = sa.to_positional({"enabled": True, "t1": 0.5})


def unit(model: str, width: int, height: int, shift: int = 0, **overrides) -> dict:
    return {"enabled": True, "module": "none", "model": model, "image": control_image(width, height, shift),
            "weight": 1.0, "save_detected_map": False, **overrides}


class Controlled(Webui):
    trace: Path
    models: list[str]
    model: str

    def run(self, route: str, hidiffusion: list | None, units: list[dict], **overrides) -> tuple[dict, list[dict]]:
        """One generation; returns its body and the engine's trace records (one per pass)."""
        payload = {**BASE, **overrides}
        scripts = {"controlnet": {"args": units}}
        if hidiffusion is not None:
            scripts["HiDiffusion"] = {"args": hidiffusion}
        payload["alwayson_scripts"] = scripts
        start = self.trace.stat().st_size if self.trace.exists() else 0
        status, body = self.call(route, payload)
        assert status == 200, body
        records = []
        if self.trace.exists():
            with open(self.trace, encoding="utf-8") as file:
                file.seek(start)
                records = [json.loads(line) for line in file]
        return body, records


def assert_residuals_fit(forwards: list[dict]) -> None:
    """Every forward's residuals have its skips' sizes (the middle one the last skip's)."""
    assert forwards, "no forward was traced"
    for forward in forwards:
        skips = [tuple(s) for s in forward["skips"]]
        assert forward["residuals"] is not None, f"no control residuals at step {forward['step']}"
        assert [tuple(r) for r in forward["residuals"]] == [*skips, skips[-1]], forward


@contextlib.contextmanager
def controlled_webui(workdir: Path, checkpoint: str, models: Sequence[tuple[str, int]], settings: dict | None = None,
                     env: dict[str, str] | None = None, cls: type[Controlled] = Controlled) -> Iterator[Controlled]:
    """A webui with sd-webui-controlnet and the engine's trace on: the tiny ``checkpoint`` (a
    tiny_checkpoint.py kind) loaded, the tiny control models ``models`` ((tiny_controlnet.py kind,
    seed) each) in its ControlNet folder, their names in ``webui.models`` (the first also
    ``webui.model``); ``settings``: the webui's config.json (SDXL-type models need live previews
    off, or the webui fetches a preview decoder); ``env``: more for its environment."""
    if settings is not None:
        (workdir / "config.json").write_text(json.dumps(settings))
    ckpt = write_checkpoint(workdir / "ckpt", checkpoint)
    folder = workdir / "controlnet"
    stems = [write_controlnet(folder, kind, seed).stem for kind, seed in models]
    trace = workdir / "trace.jsonl"
    env = {"HIDIFFUSION_TRACE": str(trace), **(env or {})}
    with running_webui(workdir, ckpt, env=env, controlnet_models=folder) as client:
        webui = cls(client.url, client.log)
        webui.trace, webui.models, webui.model = trace, stems, stems[0]
        yield webui


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    with controlled_webui(tmp_path_factory.mktemp("webui-controlnet"), "sd1", [("sd1", 0), ("sd1", 1)]) as webui:
        yield webui


def test_txt2img_one_unit_recipe_off_identical_and_reproducible(sd1):
    one = [unit(sd1.model, 1024, 1024)]
    off, _ = sd1.run("/sdapi/v1/txt2img", None, one)
    on, records = sd1.run("/sdapi/v1/txt2img", ON, one)
    (record,) = records
    forwards = record["forwards"]
    assert [f["main"] for f in forwards] == [True, True, False, False]
    assert_residuals_fit(forwards)
    # the recipe: the control model at 512x512 (latent 64) on steps 0-2, zeros after
    assert [f["control"] for f in forwards] == [[64, 64]] * 3 + [None]
    info = infotexts(on)[0]
    assert 'HiDiffusion ControlNet: "first pass: 1 unit(s): recipe, control at 512x512' in info
    assert digest(sd1.run("/sdapi/v1/txt2img", ON, one)[0]) == digest(on)
    assert digest(sd1.run("/sdapi/v1/txt2img", None, one)[0]) == digest(off)
    assert digest(on) != digest(off)
    # recipe off: the control model at full size on every step, residuals still fitted
    plain, records = sd1.run("/sdapi/v1/txt2img", [*ON[:-1], False], one)
    assert [f["control"] for f in records[0]["forwards"]] == [[128, 128]] * STEPS
    assert_residuals_fit(records[0]["forwards"])
    assert "HiDiffusion ControlNet recipe: False" in infotexts(plain)[0] and digest(plain) != digest(on)
    no_traceback(sd1)


def test_two_units_and_a_unit_with_its_own_ending_step(sd1):
    units = [unit(sd1.model, 1024, 1024), unit(sd1.models[1], 1024, 1024, shift=40, weight=0.5, guidance_end=0.3)]
    body, records = sd1.run("/sdapi/v1/txt2img", ON, units)
    forwards = records[0]["forwards"]
    assert_residuals_fit(forwards)
    # the second unit stops at its own end, by the extension's schedule (which reads the webui's
    # state.sampling_step, the last finished step: step 3 counts as 2/4 > 0.3); the first unit at
    # the recipe's 60% (3 >= 0.6 * 4): at step 3 neither runs
    assert [f["control"] is not None for f in forwards] == [True, True, True, False]
    assert "2 unit(s): recipe, control at 512x512 (first 60% of steps, unit's own steps)" in infotexts(body)[0]
    assert digest(sd1.run("/sdapi/v1/txt2img", ON, units)[0]) == digest(body)
    no_traceback(sd1)


def test_img2img_with_a_unit(sd1):
    init = control_image(1024, 1024, shift=20)
    body, records = sd1.run("/sdapi/v1/img2img", ON, [unit(sd1.model, 1024, 1024)], init_images=[init],
                            denoising_strength=1.0)
    forwards = records[0]["forwards"]
    assert forwards[0]["main"] and [f["control"] is not None for f in forwards][:1] == [True]
    assert_residuals_fit(forwards)
    assert "HiDiffusion ControlNet" in infotexts(body)[0]
    no_traceback(sd1)


def test_hires_fix_with_a_unit(sd1):
    body, records = sd1.run("/sdapi/v1/txt2img", ON, [unit(sd1.model, 512, 512)], width=512, height=512,
                            enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=STEPS,
                            denoising_strength=0.7)
    # the first pass at 512x512 is skipped at the native size (no trace); the hires pass at 1024 is patched
    (hires,) = records
    assert {(f["height"], f["width"]) for f in hires["forwards"]} == {(128, 128)}
    assert_residuals_fit(hires["forwards"])
    assert [f["control"] for f in hires["forwards"]][:1] == [[64, 64]]
    info = infotexts(body)[0]
    assert "HiDiffusion skipped" in info and 'HiDiffusion ControlNet: "hires fix pass: 1 unit(s): recipe' in info
    no_traceback(sd1)


def test_reference_only_unit_runs(sd1):
    """A reference unit adds no residuals (the extension runs an extra U-Net call per step and
    swaps attention): it must run, and HiDiffusion leaves its control alone."""
    body, records = sd1.run("/sdapi/v1/txt2img", ON, [{**unit("None", 1024, 1024), "module": "reference_only"}],
                            steps=2)
    assert records and "HiDiffusion ControlNet" not in infotexts(body)[0]
    no_traceback(sd1)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    with controlled_webui(tmp_path_factory.mktemp("webui-controlnet-sdxl"), "sdxl", [("sdxl", 0)],
                          settings={"live_previews_enable": False, "skip_early_cond": 1.0}) as webui:
        yield webui


def test_sdxl_2048_takes_the_authors_controlnet_t1(sdxl):
    body, records = sdxl.run("/sdapi/v1/txt2img", [True], [unit(sdxl.model, 2048, 2048)], width=2048, height=2048,
                             steps=2)
    forwards = records[0]["forwards"]
    assert_residuals_fit(forwards)
    assert [f["control"] for f in forwards] == [[128, 128]] * 2  # 1024x1024; 1 < 0.6 * 2
    assert "HiDiffusion schedule: \"sdxl_2048: T1 0.5, T2 0, aggressive\"" in infotexts(body)[0]
    no_traceback(sdxl)
