"""The script's argument table: parsing, defaults, named conversion, and the schedule helpers
the webui glue relies on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hidiffusion_lib import script_args as sa
from hidiffusion_lib.schedule import (
    PRESETS,
    active_switches,
    heunpp2_calls,
    preset_for,
    resolve,
    step_of_call,
    step_of_calls,
)
from hidiffusion_lib.settings import Settings


def test_defaults_parse_and_map_to_engine_settings():
    parsed = sa.parse([])
    assert parsed.enabled is False and parsed.t1 is None and parsed.model == "Auto"
    settings = parsed.settings(seed=-5)
    assert settings.arch is None and settings.native_gate is True and 0 <= settings.seed < 2**63
    settings.validate()


def test_lenient_but_exact_parsing():
    parsed = sa.parse([True, "false", "TRUE", "sdxl", "auto", "0.3", "on", "Cycle", 3.0, "bicubic"])
    assert (parsed.raunet, parsed.mswmsa, parsed.model, parsed.t1, parsed.t2) == (False, True, "SDXL", None, 0.3)
    assert (parsed.aggressive, parsed.shift, parsed.shift_index, parsed.rau_mode) == ("On", "cycle", 3, "bicubic")
    with pytest.raises(sa.ArgError, match=f"at most {len(sa.ARGS)} arguments"):
        sa.parse([False] * (len(sa.ARGS) + 1))
    for bad in (float("nan"), True, "0.5x", -0.5):
        with pytest.raises(sa.ArgError, match="'t1'"):
            sa.parse([True, True, True, "Auto", bad])
    with pytest.raises(sa.ArgError, match="'shift_index'"):
        sa.parse([True] + [d for d in sa.defaults()[1:8]] + [1.5])


def test_named_args_for_the_batch_client():
    values = sa.to_positional({"enabled": True, "t1": 0.5})
    assert values[sa.ARG_NAMES.index("t1")] == 0.5 and len(values) == len(sa.ARGS)
    with pytest.raises(sa.ArgError, match=r"unknown HiDiffusion setting\(s\) \['t3'\]"):
        sa.to_positional({"t3": 1})


def test_axis_values_override_ui_args():
    ui = sa.defaults()
    assert sa.merge_axis_values(ui, {}) == ui
    merged = sa.merge_axis_values(ui, {"t1": 0.2})
    assert merged[0] is True and merged[sa.ARG_NAMES.index("t1")] == 0.2
    assert sa.merge_axis_values([True], sa.AXES[0].updates("off"))[0] is False


def test_presets_and_thresholds_are_the_authors():
    assert PRESETS == {"sd15_1024": (0.4, 0.0), "sd15_2048": (0.7, 0.3), "sdxl_2048": (0.4, 0.0),
                       "sdxl_4096": (0.7, 0.3), "sdxl_turbo_1024": (0.5, 0.0)}
    assert preset_for("sd1", 255, 512) == "sd15_1024" and preset_for("sd2", 256, 256) == "sd15_2048"
    assert preset_for("sdxl", 511, 600) == "sdxl_2048" and preset_for("sdxl", 512, 512) == "sdxl_4096"
    assert preset_for("sdxl_turbo", 999, 999) == "sdxl_turbo_1024"


def test_switching_threshold_is_computed_in_floating_point():
    schedule = resolve(Settings(), "sd1", 300, 300)
    assert int(90 * 0.7) == 62
    assert active_switches(schedule, 61, 90) == (True, False)
    assert active_switches(schedule, 62, 90)[0] is False
    aggressive = resolve(Settings(), "sdxl", 256, 256)
    assert aggressive.aggressive
    # extra RAD for step < int(8/50*N), then the pool until int(T1*N): never both
    assert [active_switches(aggressive, s, 25) for s in (0, 3, 4, 9, 10)] == [
        (False, True), (False, True), (True, False), (True, False), (False, False)]
    assert not resolve(Settings(), "sdxl", 600, 600).aggressive
    assert not resolve(Settings(), "sdxl", 256, 256, inpaint=True).aggressive


def test_second_order_calls_map_to_steps():
    assert [step_of_call(c, 4, 8) for c in range(7)] == [0, 0, 1, 1, 2, 2, 3]
    assert [step_of_call(c, 3, 3) for c in range(3)] == [0, 1, 2]


def test_heunpp2_calls_follow_its_branches():
    """k-diffusion's sample_heunpp2: 3 calls while sigmas[i + 2] is not the last, 2 before the last step, 1 last."""
    assert [heunpp2_calls(n) for n in range(5)] == [[], [1], [2, 1], [3, 2, 1], [3, 3, 2, 1]]
    assert [step_of_calls(c, heunpp2_calls(4)) for c in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 3]


def test_batch_client_imports_without_torch():
    code = "import sys, hidiffusion_lib.batch.__main__; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
