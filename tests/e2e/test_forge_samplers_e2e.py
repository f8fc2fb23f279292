"""Every sampler Forge lists, with HiDiffusion on, in the real Forge (FORGE_DIR; see conftest.py):
an image and no traceback for each, and the engine's trace (HIDIFFUSION_TRACE) says which step
every model call got: one call a step for most, Heun's two, HeunPP2's 3, 2, 1 (Forge counts it
as one a step), so RAU-Net runs while step < int(steps * T1) whatever the sampler."""

from __future__ import annotations

import json

from conftest import forge_checkpoint, needs_forge, no_traceback, running_forge

from hidiffusion_lib import script_args as sa

pytestmark = needs_forge
STEPS, T1 = 3, 0.5  # RAU-Net on step 0 only
ON = sa.to_positional({"enabled": True, "t1": T1})
BASE = dict(prompt="a red cube", negative_prompt="", steps=STEPS, width=576, height=576, seed=1, cfg_scale=7)


def test_every_sampler_gets_the_schedule(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("forge-samplers")
    trace = data_dir / "trace.jsonl"
    with running_forge(data_dir, forge_checkpoint(), env={"HIDIFFUSION_TRACE": str(trace)}) as forge:
        status, samplers = forge.call("/sdapi/v1/samplers")
        names = [s["name"] for s in samplers if s["name"] != "DPM adaptive"]  # its calls: test_webui_e2e
        assert status == 200 and "HeunPP2" in names, names
        seen = {}
        for name in names:
            start = trace.stat().st_size if trace.exists() else 0
            forge.generate("/sdapi/v1/txt2img", BASE, ON, sampler_name=name)
            with open(trace, encoding="utf-8") as file:
                file.seek(start)
                passes = [json.loads(line) for line in file if line.strip()]
            assert len(passes) == 1 and passes[0]["sampler"] == name, (name, passes)
            forwards = passes[0]["forwards"]
            seen[name] = [f["step"] for f in forwards]
            assert all(f["main"] == (f["step"] < int(STEPS * T1)) for f in forwards), (name, forwards)
        no_traceback(forge)
    one = list(range(STEPS))
    expected = {name: one for name in ("Euler", "Euler a", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "IPNDM", "IPNDM_V",
                                       "DEIS", "DDPM")}
    expected |= {name: [0, 0, 1, 1, 2] for name in ("Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE")}
    expected["HeunPP2"] = [0, 0, 0, 1, 1, 2]
    # Forge's PLMS and UniPC make one call more than their steps: past T1, RAU-Net stays off
    expected |= {name: [0, 1, 2, 3] for name in ("PLMS", "UniPC")}
    wrong = {name: seen.get(name) for name in expected if seen.get(name) != expected[name]}
    assert not wrong, f"steps seen {seen}"
    for name, steps in ((n, s) for n, s in seen.items() if n not in expected):  # the rest: in order, to the end
        assert steps == sorted(steps) and steps[0] == 0 and STEPS - 2 <= steps[-1] <= STEPS - 1, (name, steps)
