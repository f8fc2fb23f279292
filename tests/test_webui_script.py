"""scripts/hidiffusion.py driven as the webui drives it (tests/webui_host.py), over a real
ldm U-Net: enable/disable, lifecycle after an exception, step maps, infotext, X/Y/Z, API args."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from unets import make_inputs, make_unet
from webui_host import Host, Processing, load_script, sd_model

import hidiffusion_lib as hd
from hidiffusion_lib import script_args as sa
from hidiffusion_lib.wrapping import is_ours


def args(**named) -> list:
    """Positional script args in ui() order; the native gate is off for small test latents."""
    return sa.to_positional({"enabled": True, "native_gate": False, **named})


@pytest.fixture
def host():
    module, stubs = load_script()
    unet = make_unet("sd1")
    _, _, context = make_inputs("sd1", 2, 8, 8)
    return Host(module, stubs, unet, context)


def marks(unet) -> int:
    return sum(
        is_ours(m.__dict__.get("forward")) + sum(map(is_ours, m._forward_hooks.values()))
        + sum(map(is_ours, m._forward_pre_hooks.values()))
        for m in unet.modules()
    )


def test_off_is_identical_to_no_extension_and_on_leaves_no_trace(host):
    vanilla, _ = host.generate(args(enabled=False), 24, 40)
    on, p = host.generate(args(), 24, 40)
    assert not torch.allclose(on, vanilla, atol=1e-3)
    assert marks(host.unet) == 0
    assert p.extra_generation_params["HiDiffusion"] is True
    off_again, p_off = host.generate(args(enabled=False), 24, 40)
    assert torch.equal(off_again, vanilla)
    assert not any(k.startswith("HiDiffusion") for k in p_off.extra_generation_params)
    again, _ = host.generate(args(), 24, 40)
    assert torch.equal(again, on)


def test_failed_generation_is_cleaned_at_the_next_one(host):
    fresh_on, _ = host.generate(args(), 24, 40)
    fresh_off, _ = host.generate(args(enabled=False), 24, 40)
    with pytest.raises(RuntimeError, match="sampling failed"):
        host.generate(args(), 24, 40, fail_after=2)  # postprocess never runs
    assert marks(host.unet) > 0
    assert torch.equal(host.generate(args(enabled=False), 24, 40)[0], fresh_off)
    with pytest.raises(RuntimeError):
        host.generate(args(), 24, 40, fail_after=1)
    assert torch.equal(host.generate(args(), 24, 40)[0], fresh_on)


def test_model_load_removes_a_stale_patch(host):
    with pytest.raises(RuntimeError):
        host.generate(args(), 24, 40, fail_after=0)
    for callback in host.stubs.callbacks.callbacks["model_loaded"]:
        callback(sd_model(host.unet))
    assert marks(host.unet) == 0 and host.module._Run.handle is None


@pytest.mark.parametrize(
    ("second_order", "steps", "expected"),
    [(False, 5, [0, 1, 2, 3, 4]), (True, 4, [0, 0, 1, 1, 2, 2, 3])],
    ids=["euler", "heun"],
)
def test_step_map(host, second_order, steps, expected):
    host.generate(args(), 24, 40, steps=steps, second_order=second_order)
    assert host.steps_seen == [(s, steps) for s in expected]


def test_hires_pass_restarts_the_schedule_and_can_be_left_out(host):
    host.generate(args(), 24, 40, steps=3, hires=(48, 80, 2))
    assert host.steps_seen == [(0, 3), (1, 3), (2, 3), (0, 2), (1, 2)]
    host.steps_seen.clear()
    host.generate(args(hires=False), 24, 40, steps=3, hires=(48, 80, 2))
    assert host.steps_seen == [(0, 3), (1, 3), (2, 3)]
    assert marks(host.unet) == 0


def test_native_gate_skips_the_first_pass_and_applies_to_hires(host):
    vanilla, _ = host.generate(args(enabled=False), 48, 48, steps=2)
    gated, p = host.generate(args(native_gate=True), 48, 48, steps=2)
    assert torch.equal(gated, vanilla) and "HiDiffusion" not in p.extra_generation_params
    host.generate(args(native_gate=True), 40, 40, steps=2, hires=(80, 80, 2))
    assert host.steps_seen == [(0, 2), (1, 2)]


def test_infotext_round_trip_restores_every_control(host):
    chosen = dict(raunet=False, model="SD 2.x", t1=0.55, t2=-1, aggressive="Off", shift="fixed", shift_index=2,
                  rau_mode="bicubic", hires=False)
    parsed = sa.parse(args(**chosen))
    written = sa.infotext(parsed, hd.resolve(parsed.settings(), "sd2", 80, 80))
    text = ", ".join(f"{k}: {v}" for k, v in written.items())
    params = dict(re.findall(r"([^:,]+): ([^,]+)", text))  # infotext values arrive as strings
    params = {k.strip(): v.strip() for k, v in params.items()}
    pasted = [sa.from_infotext(arg, params) for arg in sa.ARGS]
    assert sa.parse(pasted) == parsed


def test_old_and_partial_infotexts_paste(host):
    host.script.ui(False)
    fields = dict(zip(sa.ARG_NAMES, host.script.infotext_fields, strict=True))
    without = {"Steps": "20", "Sampler": "Euler"}
    assert fields["enabled"][1](without) is False
    assert fields["t1"][1](without) is None  # left as it is
    partial = {"HiDiffusion": "True", "HiDiffusion T1": "banana"}
    assert fields["enabled"][1](partial) is True
    assert fields["t1"][1](partial) == sa.AUTO_RATIO
    assert fields["shift"][1](partial) == "random"
    assert host.script.paste_field_names == [a.infotext for a in sa.ARGS]


def test_ui_components_follow_args_and_settings(host):
    host.stubs.shared.opts.data["hidiffusion_default_rau_mode"] = "bicubic"
    components = host.script.ui(True)
    assert [c.label for c in components] == [a.label for a in sa.ARGS]
    assert components[sa.ARG_NAMES.index("rau_mode")].value == "bicubic"
    t1 = components[sa.ARG_NAMES.index("t1")]
    assert (t1.minimum, t1.maximum, t1.value) == (-1, 1, -1.0)
    for callback in host.stubs.callbacks.callbacks["ui_settings"]:
        callback()
    keys = {k for k in host.stubs.shared.opts.data_labels if k.startswith("hidiffusion_default_")}
    assert keys == {f"hidiffusion_default_{a.name}" for a in sa.ARGS if a.in_settings}


def test_xyz_axes_registered_once_and_applied_per_cell(host):
    labels = [o.label for o in host.stubs.xyz.axis_options]
    assert [a.label for a in sa.AXES] == [label for label in labels if label.startswith("[HiDiffusion]")]
    assert host.module.add_xyz_axes()
    assert [o.label for o in host.stubs.xyz.axis_options] == labels
    option = next(o for o in host.stubs.xyz.axis_options if o.label == "[HiDiffusion] Mode")
    assert option.choices() == ["off", "RAU-Net", "MSW-MSA", "full"]
    base = Processing(sd_model(host.unet), 320, 192)
    results = {}
    for pc in host.stubs.xyz.cells(base, option, ["off", "RAU-Net", "full"]):
        latent, _ = host.generate(args(enabled=False), 24, 40, p=pc)
        results[pc.hidiffusion_xyz.get("raunet", "off"), pc.hidiffusion_xyz.get("mswmsa")] = latent
    assert not hasattr(base, "hidiffusion_xyz")
    assert torch.equal(results["off", None], host.generate(args(enabled=False), 24, 40)[0])
    assert torch.equal(results[True, True], host.generate(args(), 24, 40)[0])
    assert torch.equal(results[True, False], host.generate(args(mswmsa=False), 24, 40)[0])


def test_xyz_value_axis_turns_hidiffusion_on_and_confirm_refuses_bad_values(host):
    t1 = next(o for o in host.stubs.xyz.axis_options if o.label == "[HiDiffusion] T1 ratio")
    with pytest.raises(sa.ArgError, match=r"'t1'.*got 1.5"):
        list(host.stubs.xyz.cells(Processing(None, 8, 8), t1, ["0.5", "1.5"]))
    (cell,) = host.stubs.xyz.cells(Processing(sd_model(host.unet), 320, 192), t1, ["0.5"])
    _, p = host.generate(args(enabled=False, native_gate=False), 24, 40, p=cell)
    assert p.hidiffusion_args.enabled and p.hidiffusion_args.t1 == 0.5


def test_axes_wait_for_the_xyz_script():
    module, stubs = load_script(with_xyz=False)
    assert stubs.callbacks.callbacks["before_ui"] == [module.add_xyz_axes]


def test_short_api_args_take_defaults(host):
    full, _ = host.generate(args(), 24, 40)
    short = [True, True, True, "Auto", -1, -1, "Auto", "random", 0, "nearest", True, False]
    assert torch.equal(host.generate(short, 24, 40)[0], full)
    host.generate([True], 80, 72, steps=1)
    assert host.steps_seen[-1] == (0, 1)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (dict(t1=1.5), r"'t1' \(args\[4\]\) must be a number in \[0, 1\].*got 1.5"),
        (dict(raunet="yes"), r"'raunet' \(args\[1\]\) must be true or false, got 'yes'"),
        (dict(shift="spiral"), r"'shift' \(args\[7\]\) must be one of 'random', 'cycle', 'fixed'"),
        (dict(shift_index=7), r"'shift_index' \(args\[8\]\) must be an integer in \[0, 3\]"),
    ],
)
def test_bad_api_args_fail_the_generation_with_422(host, bad, message):
    values = sa.defaults()
    values[0] = True
    for name, value in bad.items():
        values[sa.ARG_NAMES.index(name)] = value
    with pytest.raises(sa.ArgError, match=message) as caught:
        host.generate(values, 24, 40)
    assert vars(caught.value)["status_code"] == 422  # modules/api/api.py reads vars(e)
    assert marks(host.unet) == 0
    host.generate(args(enabled=False), 24, 40)


def test_model_mismatch_is_refused_clearly(host):
    with pytest.raises(sa.ArgError, match=r"cannot run on this model.*'sdxl' does not fit"):
        host.generate(args(model="SDXL"), 24, 40)


def test_hypertile_makes_mswmsa_step_aside(host):
    host.stubs.shared.opts.data["hypertile_enable_unet"] = True
    raunet_only, _ = host.generate(args(mswmsa=False), 24, 40)
    both, p = host.generate(args(), 24, 40)
    assert torch.equal(both, raunet_only)
    assert "Hypertile" in p.extra_generation_params["HiDiffusion MSW-MSA"]


def test_sdxl_flag_picks_the_sdxl_map(host):
    unet = make_unet("sdxl")
    _, _, context = make_inputs("sdxl", 2, 8, 8)
    xl = Host(host.module, host.stubs, unet, context)
    _, p = xl.generate(args(), 24, 40, p=Processing(sd_model(unet, "sdxl"), 320, 192))
    assert p.extra_generation_params["HiDiffusion schedule"].startswith("sdxl_2048")


def test_hints_file_matches_the_controls():
    text = (Path(__file__).parents[1] / "javascript" / "hidiffusion-hints.js").read_text()
    hints = dict(re.findall(r'titles\["(.+?)"\] = "(.+?)";', text))
    assert hints == {a.label: a.hint for a in sa.ARGS}
