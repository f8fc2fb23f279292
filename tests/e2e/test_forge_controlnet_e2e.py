"""HiDiffusion beside Forge's built-in ControlNet (sd_forge_controlnet) in a real Forge
(lllyasviel/stable-diffusion-webui-forge main, the Forge 2 ``backend/``), skipped unless
FORGE_DIR is set (see conftest.py): the tiny random-weight SD 1.5 checkpoint for Forge, a tiny
random-weight ControlNet for it (tiny_controlnet.py's ``forge-sd1``, loaded by Forge's own
loader), the "None" preprocessor on a synthetic control image, the engine's per-forward trace
(HIDIFFUSION_TRACE) as the test hook.

Forge's U-Net adds a ControlNet residual only when its size is the skip's (``apply_control``
in backend/nn/unet.py prints "warning control could not be applied" and drops it otherwise).
576x576 (just above SD 1.5's 512x512, so the native-size gate lets HiDiffusion run, latent
72x72), 3 steps of Euler, the preset's T1 0.4: RAU-Net runs on step 0 (int(3 * 0.4) = 1), the
recipe runs the control model at 512x512 (latent 64x64) on steps 0 and 1 (step < 0.6 * 3).
One Forge for the module; about 3 minutes on 2 idle CPU cores (9 beside another busy webui).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import (
    FORGE_DIR,
    ROOT,
    Webui,
    control_image,
    forge_checkpoint,
    forge_python,
    infotexts,
    needs_forge,
    pixels,
    running_forge,
)

from hidiffusion_lib import script_args as sa

pytestmark = needs_forge
STEPS = 3
SIDE = 576
LATENT = SIDE // 8
BASE = dict(prompt="a red cube", negative_prompt="", steps=STEPS, width=SIDE, height=SIDE, sampler_name="Euler",
            seed=1, cfg_scale=7)
ON = sa.to_positional({"enabled": True})
RECIPE_OFF = sa.to_positional({"enabled": True, "controlnet_recipe": False})
# the skips of Forge's tiny SD 1.5 U-Net at the full latent (what its ControlNet's residuals have):
# input blocks 0-2 at the latent, 3-5 at half, 6-8 at a quarter, 9-11 at an eighth (72 -> 9)
FULL_SKIPS = [(LATENT >> level, LATENT >> level) for level in range(4) for _ in range(3)]


def sizes(forward: dict, key: str) -> list[tuple[int, int]]:
    return [tuple(s) for s in forward[key]]


def assert_residuals_fit(forwards: list[dict]) -> None:
    """Every forward's residuals have its skips' sizes (the middle one the last skip's)."""
    assert forwards, "no forward was traced"
    for forward in forwards:
        assert forward["residuals"] is not None, f"no control residuals at step {forward['step']}: {forward}"
        skips = sizes(forward, "skips")
        assert sizes(forward, "residuals") == [*skips, skips[-1]], forward


class Forge(Webui):
    trace: Path
    model: str
    made: dict

    def run(self, hidiffusion: list | None, **overrides) -> tuple[dict, list[dict], str]:
        """One txt2img with one ControlNet unit; returns its body, the engine's trace records
        (one per pass) and Forge's console output during it."""
        unit = {"enabled": True, "module": "None", "model": self.model, "image": control_image(SIDE, SIDE),
                "weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0, "save_detected_map": False}
        payload = {**BASE, **overrides, "alwayson_scripts": {"ControlNet": {"args": [unit]}}}
        if hidiffusion is not None:
            payload["alwayson_scripts"]["HiDiffusion"] = {"args": hidiffusion}
        log_start = len(self.log_text())
        trace_start = self.trace.stat().st_size if self.trace.exists() else 0
        status, body = self.call("/sdapi/v1/txt2img", payload)
        log = self.log_text()[log_start:]
        assert status == 200, (body, log[-3000:])
        records = []
        if self.trace.exists():
            with open(self.trace, encoding="utf-8") as file:
                file.seek(trace_start)
                records = [json.loads(line) for line in file]
        # the unit ran with the tiny model, no residual was dropped, nothing failed
        assert "Current ControlNet ControlNetPatcher" in log, log[-3000:]
        assert "could not be applied" not in log, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
        return body, records, log


# Forge's own apply_control (backend/nn/unet.py) on zero features of each skip's size and a
# residual of ones of the given size: whether it added the residual (it prints "warning control
# could not be applied" and leaves the features when it cannot)
APPLY_CONTROL = """
import contextlib, io, json, sys
sys.argv[1:] = ["--always-cpu", "--attention-pytorch"]  # backend/args.py parses them at import
sys.path[:0] = [FORGE_DIR, FORGE_DIR + "/packages_3rdparty"]
import torch
from backend.nn.unet import apply_control
applied = []
for skip, residual in json.loads(sys.stdin.read()):
    h, printed = torch.zeros(1, 320, *skip), io.StringIO()
    with contextlib.redirect_stdout(printed):
        h = apply_control(h, {"output": [torch.ones(1, 320, *residual)]}, "output")
    applied.append(bool(h.abs().sum() > 0) and "could not be applied" not in printed.getvalue())
print(json.dumps(applied))
"""


def forge_applies(pairs: list[tuple[tuple[int, int], tuple[int, int]]]) -> list[bool]:
    """For each (skip size, residual size): whether Forge's apply_control adds that residual."""
    out = subprocess.run([forge_python(), "-c", f"FORGE_DIR = {FORGE_DIR!r}\n{APPLY_CONTROL}"], cwd=FORGE_DIR,
                         input=json.dumps(pairs), check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_forge_controlnet(folder: Path) -> Path:
    out = subprocess.run([forge_python(), str(ROOT / "tests" / "e2e" / "tiny_controlnet.py"), str(folder),
                          "forge-sd1"], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("forge-controlnet")
    models = data_dir / "controlnet"
    model = write_forge_controlnet(models)
    trace = data_dir / "trace.jsonl"
    # unbuffered: the loader's and apply_control's print()s reach the log before the request returns
    with running_forge(data_dir, forge_checkpoint(), env={"HIDIFFUSION_TRACE": str(trace), "PYTHONUNBUFFERED": "1"},
                       extra_args=("--controlnet-dir", str(models))) as client:
        status, listed = client.call("/controlnet/model_list")
        assert status == 200, listed
        # Forge names a model "stem [short hash]"; a unit must name it so
        names = [name for name in listed["model_list"] if name.startswith(f"{model.stem} [")]
        assert len(names) == 1, listed
        forge = Forge(client.url, client.log)
        forge.trace, forge.model, forge.made = trace, names[0], {}
        yield forge


def test_forge_loads_the_tiny_controlnet_and_the_recipe_fits_every_residual(forge):
    off, records, log = forge.run(None)
    assert records == []  # HiDiffusion off: nothing patched, nothing traced
    forge.made["off"] = pixels(off)
    # Forge's loader prints the missing and unexpected keys of the ControlNet it builds: none
    assert re.search(r"^\[\] \[\]$", log, re.MULTILINE), log[-3000:]
    assert not re.search(r"^\[\S.*\] \[", log, re.MULTILINE), log[-3000:]

    on, records, log = forge.run(ON)
    (record,) = records
    forwards = record["forwards"]
    forge.made["on"], forge.made["on_forwards"] = pixels(on), forwards
    assert sorted({f["step"] for f in forwards}) == list(range(STEPS)), forwards
    assert {(f["height"], f["width"]) for f in forwards} == {(LATENT, LATENT)}
    # RAU-Net on step 0 (preset sd15_1024, T1 0.4), and every residual lands on its skip there too
    assert [f["main"] for f in forwards] == [f["step"] < int(STEPS * 0.4) for f in forwards]
    assert any(f["main"] for f in forwards)
    assert_residuals_fit(forwards)
    # the recipe: the control model at 512x512 (latent 64) while step < 0.6 * steps, then zeros
    assert [f["control"] for f in forwards] == [[64, 64] if f["step"] < 0.6 * STEPS else None for f in forwards]
    assert [f["control"] is not None for f in forwards] == [f["step"] in (0, 1) for f in forwards]
    info = infotexts(on)[0]
    assert 'HiDiffusion ControlNet: "first pass: 1 unit(s): recipe, control at 512x512 (first 60% of steps)' in info, \
        info
    assert "HiDiffusion: True" in info
    assert not (forge.made["on"] == forge.made["off"]).all()


def test_recipe_off_runs_the_control_at_full_size_with_fitted_residuals(forge):
    body, records, _ = forge.run(RECIPE_OFF)
    (record,) = records
    forwards = record["forwards"]
    forge.made["recipe_off_forwards"] = forwards
    assert [f["control"] for f in forwards] == [[LATENT, LATENT]] * len(forwards)
    assert sorted({f["step"] for f in forwards}) == list(range(STEPS))
    assert any(f["main"] for f in forwards)
    assert_residuals_fit(forwards)
    info = infotexts(body)[0]
    assert "HiDiffusion ControlNet recipe: False" in info, info
    assert "1 unit(s): recipe off, control at full size" in info, info
    if "on" in forge.made:
        assert not (pixels(body) == forge.made["on"]).all()


def test_without_the_fitting_forge_would_drop_the_residuals_on_rau_net_steps(forge):
    """What the extension fixes, shown from the trace (the extension unchanged): on a RAU-Net
    step the U-Net's skips are smaller than at the same latent on a plain step, which are the
    sizes the ControlNet's residuals have when it runs at the full latent (recipe off: control
    at 72x72, the control model itself is not patched). Forge's own ``apply_control`` (run here
    on those sizes) drops every such residual on the shrunk levels with "could not be applied",
    and adds the fitted ones; in the generation Forge printed nothing (checked by ``run``)."""
    forwards = forge.made.get("recipe_off_forwards")
    if forwards is None:
        pytest.skip("needs test_recipe_off_runs_the_control_at_full_size_with_fitted_residuals")
    rau = [f for f in forwards if f["main"]]
    plain = [f for f in forwards if not f["main"] and not f["extra"]]
    assert rau and plain
    for forward in plain:  # a plain step's skips: the full-size ControlNet's residual sizes
        assert sizes(forward, "skips") == FULL_SKIPS, forward
    for forward in rau:
        skips = sizes(forward, "skips")
        dropped = [i for i, (skip, full) in enumerate(zip(skips, FULL_SKIPS, strict=True)) if skip != full]
        # the RAD downsampler (input block 3) and every level below it: 9 of the 12 skips + the middle
        assert dropped == list(range(3, 12)), (skips, FULL_SKIPS)
        assert all(s[0] < f[0] and s[0] != 1 for s, f in zip(skips[3:], FULL_SKIPS[3:], strict=True))
        assert forward["control"] == [LATENT, LATENT] and sizes(forward, "residuals") == [*skips, skips[-1]]
        applied = forge_applies([*zip(skips, FULL_SKIPS, strict=True), *((skip, skip) for skip in skips)])
        unfitted, fitted = applied[:len(skips)], applied[len(skips):]
        assert [i for i, added in enumerate(unfitted) if not added] == dropped, unfitted
        assert all(fitted), fitted


def test_hidiffusion_off_is_identical_after_the_on_runs(forge):
    before = forge.made.get("off")
    if before is None:
        pytest.skip("needs test_forge_loads_the_tiny_controlnet_and_the_recipe_fits_every_residual")
    after, records, _ = forge.run(None)
    assert records == []
    assert "HiDiffusion" not in infotexts(after)[0]
    assert pixels(after).shape == before.shape == (SIDE, SIDE, 3)
    assert (pixels(after) == before).all(), "HiDiffusion off gave another image after the on runs"
