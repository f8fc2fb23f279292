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
    switch_table,
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


def _steps_on(table: list[tuple[bool, bool]]) -> tuple[list[int], list[int]]:
    return [s for s, (main, _) in enumerate(table) if main], [s for s, (_, extra) in enumerate(table) if extra]


# Few-step models (Turbo, Lightning, LCM, Hyper, DMD2): the steps each switch is on, (main, extra),
# from the authors' rule: step < int(steps * ratio); aggressive: extra while step < int(8/50 * steps),
# then main until int(T1 * steps).
FEW_STEPS = {
    # preset (arch, latent side, aggressive): {steps: (main steps, extra steps)}
    ("sd1", 128, None): {1: ([], []), 2: ([], []), 3: ([0], []), 4: ([0], []), 8: ([0, 1, 2], [])},
    ("sd1", 256, None): {1: ([], []), 2: ([0], []), 3: ([0, 1], []), 4: ([0, 1], [0]),
                         8: ([0, 1, 2, 3, 4], [0, 1])},
    ("sdxl", 256, None): {1: ([], []), 2: ([], []), 3: ([0], []), 4: ([0], []), 7: ([1], [0]), 8: ([1, 2], [0])},
    ("sdxl", 256, False): {1: ([], []), 2: ([], []), 3: ([0], []), 4: ([0], []), 8: ([0, 1, 2], [])},
    ("sdxl", 512, None): {1: ([], []), 2: ([0], []), 3: ([0, 1], []), 4: ([0, 1], [0]),
                          8: ([0, 1, 2, 3, 4], [0, 1])},
    ("sdxl_turbo", 128, None): {1: ([], []), 2: ([0], []), 3: ([0], []), 4: ([0, 1], []), 8: ([0, 1, 2, 3], [])},
}


@pytest.mark.parametrize(("arch", "side", "aggressive"), list(FEW_STEPS), ids=[
    "sd15_1024", "sd15_2048", "sdxl_2048-aggressive", "sdxl_2048-plain", "sdxl_4096", "sdxl_turbo_1024"])
def test_few_step_switch_table(arch, side, aggressive):
    """E.g. sdxl_2048 aggressive at 4 steps: the hand-over int(0.64) = 0, so the extra switch never
    runs and the main one runs at step 0 only (int(1.6) = 1); at 1 step no preset switches at all."""
    schedule = resolve(Settings(aggressive=aggressive), arch, side, side)
    for steps, expected in FEW_STEPS[arch, side, aggressive].items():
        table = switch_table(schedule, steps)
        assert len(table) == steps and _steps_on(table) == expected, (schedule.preset, steps)
        assert table == [active_switches(schedule, step, steps) for step in range(steps)]


def test_turbo_has_no_extra_switch_and_no_split():
    """The authors' sdxl_turbo keys have no extra switch and their Turbo model never reads the
    aggressive flag: a T2 or "Aggressive On" asked for changes nothing, and the schedule says so."""
    schedule = resolve(Settings(t2=0.5, aggressive=True), "sdxl_turbo", 128, 128)
    assert (schedule.t2, schedule.aggressive) == (0.0, False)
    assert _steps_on(switch_table(schedule, 4)) == ([0, 1], [])
    assert resolve(Settings(t2=0.5), "sdxl", 128, 128).t2 == 0.5


def test_pasted_ratio_off_the_list_is_kept_exactly():
    """An infotext ratio the dropdown does not list (0.45) pastes as itself, never rounded to a
    listed choice; the control's value parses back to the number; a bad one names the control."""
    t1 = sa.ARGS[sa.ARG_NAMES.index("t1")]
    assert sa.from_infotext(t1, {"HiDiffusion": "True", "HiDiffusion T1": "0.45"}) == "0.45"
    assert "0.45" not in sa.RATIO_CHOICES
    for number, shown in ((0.45, "0.45"), (0.5, "0.5"), (1.0, "1"), (0.0, "0"), (0.123456789, "0.123456789")):
        assert sa.ui_value(t1, number) == shown and sa.parse([True, True, True, "Auto", shown]).t1 == number
    params = {"HiDiffusion": "True", "HiDiffusion T1": "0.45", "HiDiffusion T2": "0.123456789"}
    sa.normalize_pasted(params)
    assert (params["HiDiffusion T1"], params["HiDiffusion T2"]) == ("0.45", "0.123456789")
    named = r"HiDiffusion 'T1 ratio' \(API argument 't1', args\[4\]\) must be a number"
    for typed in ("abc", "1.5", "-0.2", ""):
        with pytest.raises(sa.ArgError, match=named):
            sa.parse([True, True, True, "Auto", typed])


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
