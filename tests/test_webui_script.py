"""scripts/hidiffusion.py driven as the webui drives it (tests/webui_host.py), over a real
ldm U-Net: enable/disable, lifecycle after an exception, step maps, infotext, X/Y/Z, API args."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from controlnet_host import TinyControlNet
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from unets import TinyMMDiT, make_inputs, make_unet, unet_config
from webui_host import Host, Processing, controlnet_units, load_script, paste, sd_model, send_to

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


def test_dpm_adaptive_steps_follow_the_noise_level(host):
    """DPM adaptive makes as many calls as it likes: the step comes from the noise level, as
    the webui's refiner switch reads it (the nearest of the model's sigmas, out of 1000)."""
    from types import SimpleNamespace

    p = Processing(sd_model(host.unet), 320, 192)
    p.sampler = SimpleNamespace(funcname="sample_dpm_adaptive")
    noise = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(1))
    host.script.process(p, *args())
    host.script.process_before_every_sampling(p, *args(), x=noise, noise=noise, c=None, uc=None)
    sigmas = torch.linspace(0.03, 14.6, 1000)
    denoiser = SimpleNamespace(step=0, steps=10, total_steps=10, inner_model=SimpleNamespace(sigmas=sigmas))
    seen = []
    for timestep in (999, 990, 900, 700, 600, 598, 300, 0):
        sigma = sigmas[timestep].repeat(2)
        params = host.stubs.callbacks.CFGDenoiserParams(noise, None, sigma, 0, 10, None, None, denoiser)
        for callback in host.stubs.callbacks.callbacks["cfg_denoiser"]:
            callback(params)
        seen.append(host.module._Run.handle.state.step)
        denoiser.step += 1
    assert seen == [0, 0, 0, 2, 3, 4, 6, 9]
    host.script.postprocess(p, None, *args())


def test_hires_pass_restarts_the_schedule_and_can_be_left_out(host):
    host.generate(args(), 24, 40, steps=3, hires=(48, 80, 2))
    assert host.steps_seen == [(0, 3), (1, 3), (2, 3), (0, 2), (1, 2)]
    host.steps_seen.clear()
    host.generate(args(hires=False), 24, 40, steps=3, hires=(48, 80, 2))
    assert host.steps_seen == [(0, 3), (1, 3), (2, 3)]
    assert marks(host.unet) == 0


def test_native_gate_skips_the_first_pass_says_so_and_applies_to_hires(host, capsys):
    vanilla, _ = host.generate(args(enabled=False), 48, 48, steps=2)
    gated, p = host.generate(args(native_gate=True, t1=0.5), 48, 48, steps=2)
    assert torch.equal(gated, vanilla)
    note = p.extra_generation_params[sa.SKIPPED_KEY]
    assert note.startswith("first pass at 384x384") and "SD 1.x's training size (512x512" in note
    assert note in capsys.readouterr().out
    # what was asked stays in the infotext (paste restores it), but no schedule: nothing ran
    assert p.extra_generation_params["HiDiffusion T1"] == 0.5
    assert "HiDiffusion schedule" not in p.extra_generation_params
    _, p = host.generate(args(native_gate=True), 40, 40, steps=2, hires=(80, 80, 2))
    assert host.steps_seen == [(0, 2), (1, 2)]
    assert p.extra_generation_params[sa.SKIPPED_KEY].startswith("first pass at 320x320")
    assert "HiDiffusion schedule" in p.extra_generation_params


def test_native_gate_counts_area():
    """SDXL's buckets are as large as its 1024x1024 training size: the gate skips them."""
    gate = hd.Settings(native_gate=True)
    for width, height in ((1024, 1024), (832, 1216), (896, 1152), (768, 1344), (640, 1536)):
        assert hd.gated(gate, 128, height // 8, width // 8), (width, height)
    for width, height in ((1024, 1536), (2048, 2048), (1088, 1088)):
        assert not hd.gated(gate, 128, height // 8, width // 8), (width, height)
    assert hd.gated(gate, 64, 64, 64) and not hd.gated(gate, 64, 64, 72)  # SD 1.x: 512x512, 576x512
    assert not hd.gated(hd.Settings(native_gate=False), 64, 8, 8)


def test_batch_images_are_their_seeds_alone(host):
    """The window shifts depend on the step alone, so image k of a batch is its seed made alone."""
    settings = [host.module.sa.parse(args(shift=policy)).settings() for policy in ("random", "cycle")]
    assert all(s.seed == 0 for s in settings)
    alone, _ = host.generate(args(), 24, 40, seed=7)
    for seeds in ([6, 7], [3, 7]):  # the batch's first seed used to seed the shifts
        in_batch, _ = host.generate(args(), 24, 40, p=Processing(sd_model(host.unet), 320, 192, seeds, seeds), seed=7)
        assert torch.equal(in_batch, alone)


def test_infotext_round_trip_restores_every_control(host):
    chosen = dict(raunet=False, model="SD 2.x", t1=0.5, t2=-1, aggressive="Off", shift="fixed", shift_index=2,
                  rau_mode="bicubic", hires=False)
    parsed = sa.parse(args(**chosen))
    written = sa.infotext(parsed, hd.resolve(parsed.settings(), "sd2", 80, 80))
    text = ", ".join(f"{k}: {v}" for k, v in written.items())
    params = dict(re.findall(r"([^:,]+): ([^,]+)", text))  # infotext values arrive as strings
    params = {k.strip(): v.strip() for k, v in params.items()}
    host.script.ui(False)
    pasted = paste(host.stubs, host.script, params)
    assert sa.parse(pasted) == parsed
    assert pasted[sa.ARG_NAMES.index("t1")] == "0.5" and pasted[sa.ARG_NAMES.index("shift_index")] == 2


def test_send_to_copies_every_control(host):
    """Send to img2img copies the controls named in paste_field_names, by string name."""
    host.script.ui(False)
    values = args(t1="0.5", shift="fixed", shift_index=2, raunet=False)
    assert send_to(host.script, values) == values


def test_old_and_partial_infotexts_paste(host):
    host.script.ui(False)
    name = sa.ARG_NAMES.index
    without = paste(host.stubs, host.script, {"Steps": "20", "Sampler": "Euler"})
    assert without[name("enabled")] is False
    assert without[name("t1")] is None  # left as it is
    partial = paste(host.stubs, host.script, {"HiDiffusion": "True", "HiDiffusion T1": "banana"})
    assert partial[name("enabled")] is True
    assert partial[name("t1")] == sa.AUTO
    assert partial[name("shift")] == "random"
    assert host.script.paste_field_names == [a.infotext for a in sa.ARGS]
    assert all(isinstance(key, str) for _, key in host.script.infotext_fields)


def test_ratio_dropdowns_take_pasted_and_typed_values(host):
    """gr.Dropdown(allow_custom_value=True) (Gradio 3.41 in the webui, 4.40 in Forge) keeps a pasted
    0.45 that the list lacks; the value reaches the script as text and is parsed like the API's."""
    components = host.script.ui(False)
    for arg, component in zip(sa.ARGS, components, strict=True):
        if type(component).__name__ == "Dropdown":
            assert component.allow_custom_value == (arg.kind == "ratio"), arg.name
    t1 = components[sa.ARG_NAMES.index("t1")]
    assert list(t1.choices) == list(sa.RATIO_CHOICES)  # the listed choices stay
    pasted = paste(host.stubs, host.script, {"HiDiffusion": "True", "HiDiffusion T1": "0.45"})
    assert pasted[sa.ARG_NAMES.index("t1")] == "0.45" and sa.parse(pasted).t1 == 0.45
    typed = args()
    typed[sa.ARG_NAMES.index("t1")] = "abc"  # what the dropdown hands over for a typed value
    with pytest.raises(sa.ArgError, match=r"'T1 ratio' \(API argument 't1', args\[4\]\).*got 'abc'"):
        host.generate(typed, 24, 40)
    assert marks(host.unet) == 0


def test_ui_components_follow_args_and_settings(host):
    host.stubs.shared.opts.data["hidiffusion_default_rau_mode"] = "bicubic"
    components = host.script.ui(True)
    assert [c.label for c in components] == [a.label for a in sa.ARGS]
    assert components[sa.ARG_NAMES.index("rau_mode")].value == "bicubic"
    for arg, component in zip(sa.ARGS, components, strict=True):
        # every value a control offers is one the script accepts
        for value in getattr(component, "choices", None) or [True, False]:
            sa.parse([*sa.defaults()[: sa.ARGS.index(arg)], value])
        # Settings defaults must not be pinned by ui-config.json (modules/ui_loadsave.py)
        assert getattr(component, "do_not_save_to_config", False) == arg.in_settings
    t1 = components[sa.ARG_NAMES.index("t1")]
    assert type(t1).__name__ == "Dropdown" and t1.value == "auto" and "0.4" in t1.choices and "-0.5" not in t1.choices
    shift_index = components[sa.ARG_NAMES.index("shift_index")]
    assert type(shift_index).__name__ == "Radio" and shift_index.choices == [0, 1, 2, 3]
    for callback in host.stubs.callbacks.callbacks["ui_settings"]:
        callback()
    options = {k: v for k, v in host.stubs.shared.opts.data_labels.items() if k.startswith("hidiffusion_default_")}
    assert set(options) == {f"hidiffusion_default_{a.name}" for a in sa.ARGS if a.in_settings}
    assert all("(requires Reload UI)" in option.comment_after for option in options.values())


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
        (dict(t1=1.5), r"'T1 ratio' \(API argument 't1', args\[4\]\) must be a number in \[0, 1\].*got 1.5"),
        (dict(t1=-0.5), r"'T1 ratio' \(API argument 't1', args\[4\]\) must be a number in \[0, 1\].*got -0.5"),
        (dict(raunet="yes"), r"'RAU-Net' \(API argument 'raunet', args\[1\]\) must be true or false, got 'yes'"),
        (dict(shift="spiral"), r"'Window shift' \(API argument 'shift', args\[7\]\) must be one of 'random'"),
        (dict(shift_index=7), r"'Fixed shift index' \(API argument 'shift_index', args\[8\]\) must be an integer"),
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


def test_model_mismatch_is_refused_in_the_ui_words(host):
    with pytest.raises(sa.ArgError) as caught:
        host.generate(args(model="SDXL"), 24, 40)
    assert str(caught.value) == ('HiDiffusion: Model preset "SDXL" does not fit the loaded model, which is SD 1.x/2.x;'
                                 " choose Auto, SD 1.x or SD 2.x")
    with pytest.raises(sa.ArgError, match=r'"SDXL-Turbo/Lightning" does not fit.*choose Auto, SD 1.x or SD 2.x$'):
        host.generate(args(model="SDXL-Turbo/Lightning"), 24, 40)
    assert marks(host.unet) == 0


def fingerprint(module: torch.nn.Module) -> list:
    """Every instance attribute and hook of every submodule: what a patch could leave behind."""
    return [(name, sorted(m.__dict__.keys() - {"_modules", "_parameters", "_buffers"}), len(m._forward_hooks),
             len(m._forward_pre_hooks)) for name, m in module.named_modules()]


def test_sd3_runs_unchanged_with_a_note_and_an_explicit_preset_is_refused(host, capsys):
    """SD3 (the webui v1.10.1 loads it: modules/sd_models.py set_model_type) runs an MMDiT, which
    HiDiffusion has no block map for: with Model preset Auto the ticked checkbox changes nothing
    but the infotext and the console; a preset asked for explicitly is refused."""
    mmdit = TinyMMDiT()
    sd3 = Host(host.module, host.stubs, mmdit, host.context)
    before = fingerprint(mmdit)

    def model():
        return Processing(sd_model(mmdit, "sd3"), 320, 192)

    vanilla, _ = sd3.generate(args(enabled=False), 24, 40, p=model())
    on, p = sd3.generate(args(native_gate=True), 24, 40, hires=(48, 80, 2), p=model())
    assert torch.equal(on, sd3.generate(args(enabled=False), 24, 40, hires=(48, 80, 2), p=model())[0])
    note = "SD3 (MMDiT) is not a U-Net HiDiffusion has a block map for; it ran unchanged"
    assert p.extra_generation_params[sa.SKIPPED_KEY] == f"first pass: {note}; hires fix pass: {note}"
    assert f"HiDiffusion: first pass: {note}" in capsys.readouterr().out
    assert p.extra_generation_params["HiDiffusion"] is True and "HiDiffusion schedule" not in p.extra_generation_params
    assert sd3.steps_seen == [] and fingerprint(mmdit) == before
    assert torch.equal(sd3.generate(args(), 24, 40, p=model())[0], vanilla)
    with pytest.raises(sa.ArgError) as caught:
        sd3.generate(args(model="SDXL"), 24, 40, p=model())
    assert str(caught.value) == ('HiDiffusion: Model preset "SDXL" does not fit the loaded model: SD3 (MMDiT) is not a'
                                 " U-Net HiDiffusion has a block map for; choose Auto (the generation then runs"
                                 " without HiDiffusion) or untick HiDiffusion")
    assert vars(caught.value)["status_code"] == 422 and fingerprint(mmdit) == before
    assert torch.equal(sd3.generate(args(), 24, 40, p=model())[0], vanilla)


def test_a_model_switch_with_the_checkbox_ticked_never_fails(host):
    """SD 1.5 -> SD3 -> SD 1.5 with HiDiffusion ticked throughout (Auto): SD3 runs unchanged and
    SD 1.5 runs with HiDiffusion before and after, the same image."""
    on, _ = host.generate(args(), 24, 40)
    mmdit = TinyMMDiT()
    sd3 = Host(host.module, host.stubs, mmdit, host.context)
    for callback in host.stubs.callbacks.callbacks["model_loaded"]:
        callback(sd_model(mmdit, "sd3"))
    _, p = sd3.generate(args(), 24, 40, p=Processing(sd_model(mmdit, "sd3"), 320, 192))
    assert sa.SKIPPED_KEY in p.extra_generation_params
    for callback in host.stubs.callbacks.callbacks["model_loaded"]:
        callback(sd_model(host.unet))
    assert torch.equal(host.generate(args(), 24, 40)[0], on) and marks(host.unet) == 0


def test_an_sdxl_refiner_loaded_as_the_model_follows_the_same_rule(host, capsys):
    """The refiner's U-Net (12 input blocks, attention at levels 1-2) has no block map: Auto skips
    it with a note, an explicit SDXL preset is refused."""
    unet = UNetModel(**dict(unet_config("sdxl"), channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2])).eval()
    _, _, context = make_inputs("sdxl", 2, 8, 8)
    refiner = Host(host.module, host.stubs, unet, context)
    vanilla, _ = refiner.generate(args(enabled=False), 24, 40, p=Processing(sd_model(unet, "sdxl"), 320, 192))
    on, p = refiner.generate(args(), 24, 40, p=Processing(sd_model(unet, "sdxl"), 320, 192))
    assert torch.equal(on, vanilla)
    note = "first pass: the SDXL refiner is not a U-Net HiDiffusion has a block map for; it ran unchanged"
    assert p.extra_generation_params[sa.SKIPPED_KEY] == note and note in capsys.readouterr().out
    with pytest.raises(sa.ArgError, match=r'^HiDiffusion: Model preset "SDXL" does not fit the loaded model: the SDXL'
                                          " refiner is not a U-Net"):
        refiner.generate(args(model="SDXL"), 24, 40, p=Processing(sd_model(unet, "sdxl"), 320, 192))
    assert marks(unet) == 0


def test_a_unet_whose_blocks_do_not_match_is_skipped_with_auto(host):
    """A U-Net of a known family whose blocks are not where the map wants them (here SD 1.x with
    no attention in the top level, as no real model has): skipped, the reason in the note."""
    unet = UNetModel(**dict(unet_config("sd1"), attention_resolutions=[2, 1])).eval()
    odd = Host(host.module, host.stubs, unet, host.context)
    _, p = odd.generate(args(), 24, 40, p=Processing(sd_model(unet), 320, 192))
    note = p.extra_generation_params[sa.SKIPPED_KEY]
    assert note.startswith("first pass: this UNetModel (unknown U-Net layout: 12 input blocks") and marks(unet) == 0


def set_up_pass(host, p, values: list, h: int, w: int) -> bool:
    """The script's hooks up to the first sampling pass over a (h, w) latent, without sampling;
    returns whether a patch is live for the pass. Ends the generation."""
    noise = torch.zeros(2, 4, h, w)
    host.script.process(p, *values)
    host.script.process_before_every_sampling(p, *values, x=noise, noise=noise, c=None, uc=None)
    live = host.module._Run.handle is not None and marks(host.unet) > 0
    host.script.postprocess(p, None, *values)
    return live


def test_sd2_768v_is_gated_at_its_own_training_size(host, capsys):
    """SD 2.x 768-v (ldm's parameterization "v") was trained at 768x768: the gate skips 768x768
    and applies above it with the SD 2.x presets; an SD 2.x 512 (eps) model applies at 768x768."""
    sd2 = Host(host.module, host.stubs, make_unet("sd2"), host.context)

    def model(arch, size):
        return Processing(sd_model(sd2.unet, arch), size, size)

    p = model("sd2_768v", 768)
    assert not set_up_pass(sd2, p, args(native_gate=True), 96, 96)
    note = ("first pass at 768x768: not larger than SD 2.x 768-v's training size (768x768 in area), so it ran"
            " unchanged")
    assert p.extra_generation_params[sa.SKIPPED_KEY] == note and note in capsys.readouterr().out
    p = model("sd2_768v", 1024)
    assert set_up_pass(sd2, p, args(native_gate=True), 128, 128)
    assert sa.SKIPPED_KEY not in p.extra_generation_params
    assert p.extra_generation_params["HiDiffusion schedule"] == "sd15_1024: T1 0.4, T2 0"
    p = model("sd2_768v", 2048)  # the authors' 2048 px preset at the same latent threshold as SD 2.x 512
    assert set_up_pass(sd2, p, args(native_gate=True), 256, 256)
    assert p.extra_generation_params["HiDiffusion schedule"] == "sd15_2048: T1 0.7, T2 0.3"
    p = model("sd2", 768)
    assert set_up_pass(sd2, p, args(native_gate=True), 96, 96) and sa.SKIPPED_KEY not in p.extra_generation_params
    assert not set_up_pass(sd2, model("sd2", 512), args(native_gate=True), 64, 64)
    assert marks(sd2.unet) == 0


def test_refiner_steps_run_without_hidiffusion_and_say_so(host, capsys):
    """The webui's refiner switch loads another model mid-pass (sd_samplers_common.apply_refiner)."""
    refiner_info = object()
    p = Processing(sd_model(host.unet), 320, 192)
    p.refiner_checkpoint_info = refiner_info
    on, _ = host.generate(args(), 24, 40)
    host.script.process(p, *args())
    noise = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(1))
    host.script.process_before_every_sampling(p, *args(), x=noise, noise=noise, c=None, uc=None)
    assert host.module._Run.handle is not None
    refiner = sd_model(make_unet("sd1"))
    refiner.sd_checkpoint_info = refiner_info
    for callback in host.stubs.callbacks.callbacks["model_loaded"]:
        callback(refiner)
    assert host.module._Run.handle is None and marks(host.unet) == 0
    assert p.extra_generation_params[sa.REFINER_KEY] == sa.REFINER_NOTE
    assert sa.REFINER_NOTE in capsys.readouterr().out
    # a hires pass on the refiner is left alone too, and the next generation is unchanged
    p.sd_model, p.is_hr_pass = refiner, True
    host.script.process_before_every_sampling(p, *args(), x=noise, noise=noise, c=None, uc=None)
    assert host.module._Run.handle is None
    host.script.postprocess(p, None, *args())
    assert torch.equal(host.generate(args(), 24, 40)[0], on)


def test_hypertile_makes_mswmsa_step_aside(host):
    host.stubs.shared.opts.data["hypertile_enable_unet"] = True
    raunet_only, _ = host.generate(args(mswmsa=False), 24, 40)
    both, p = host.generate(args(), 24, 40)
    assert torch.equal(both, raunet_only)
    assert "Hypertile" in p.extra_generation_params["HiDiffusion MSW-MSA"]


def tiled_diffusion(enabled: bool) -> SimpleNamespace:
    """``p.scripts`` with multidiffusion-upscaler's Tiled Diffusion among the always-on scripts
    (scripts/tilediffusion.py: title "Tiled Diffusion", its first argument the enable checkbox;
    modules/scripts.py gives each script its slice of ``p.script_args`` from ``args_from``)."""
    other = SimpleNamespace(title=lambda: "Other", args_from=0, args_to=1)
    tiles = SimpleNamespace(title=lambda: "Tiled Diffusion", args_from=1, args_to=3)
    return SimpleNamespace(alwayson_scripts=[other, tiles]), (True, enabled, "MultiDiffusion")


@pytest.mark.parametrize("enabled", [True, False])
def test_tiled_diffusion_takes_the_pass(host, capsys, enabled):
    off, _ = host.generate(args(enabled=False), 24, 40)
    on, _ = host.generate(args(), 24, 40)
    p = Processing(host.new_sd_model(), width=320, height=192, seeds=[1], all_seeds=[1])
    p.scripts, p.script_args = tiled_diffusion(enabled)
    x, p = host.generate(args(), 24, 40, p=p)
    assert torch.equal(x, off if enabled else on)
    note = p.extra_generation_params.get(sa.SKIPPED_KEY, "")
    assert ("Tiled Diffusion is on" in note) == enabled, note
    assert ("Tiled Diffusion is on" in capsys.readouterr().out) == enabled
    assert marks(host.unet) == 0


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


def hint(h: int, w: int) -> torch.Tensor:
    return torch.rand(1, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(2))


def test_controlnet_unit_runs_the_recipe_and_is_unwrapped_after(host, capsys):
    control = TinyControlNet("sd1")
    host.controlnet = controlnet_units((control, hint(80, 96), 1.0))
    _, p = host.generate(args(), 80, 96, steps=5)
    assert control.calls == [((48, 64), (384, 512))] * 3  # native size, steps 0-2 of 5
    note = p.extra_generation_params[sa.CONTROLNET_KEY]
    assert note == ("first pass: 1 unit(s): recipe, control at 512x384 (first 60% of steps); "
                    "residuals resized bicubic to the U-Net's levels")
    assert note in capsys.readouterr().out
    assert "forward" not in vars(control) and marks(host.unet) == 0
    # recipe off: full size on every step, and the infotext says it was off
    control.calls.clear()
    _, p = host.generate(args(controlnet_recipe=False), 80, 96, steps=5)
    assert control.calls == [((80, 96), (640, 768))] * 5
    assert p.extra_generation_params["HiDiffusion ControlNet recipe"] is False
    assert p.extra_generation_params[sa.CONTROLNET_KEY].startswith("first pass: 1 unit(s): recipe off")


def test_controlnet_units_with_their_own_ending_step_and_hires(host):
    own, default = TinyControlNet("sd1"), TinyControlNet("sd1", seed=8)
    host.controlnet = controlnet_units((own, hint(72, 72), 0.5), (default, hint(72, 72), 1.0))
    _, p = host.generate(args(), 72, 72, steps=5, hires=(96, 96, 5))
    assert own.calls == [((64, 64), (512, 512))] * 10  # every call: the unit's own end is the host's business
    assert default.calls == [((64, 64), (512, 512))] * 6
    note = p.extra_generation_params[sa.CONTROLNET_KEY]
    assert note.count("(unit's own steps, first 60% of steps)") == 2 and "; hires fix pass: " in note


def test_controlnet_is_left_alone_in_a_native_size_pass(host):
    control = TinyControlNet("sd1")
    host.controlnet = controlnet_units((control, hint(64, 64), 1.0))
    _, p = host.generate(args(native_gate=True), 64, 64, steps=3)
    assert control.calls == [((64, 64), (512, 512))] * 3 and sa.CONTROLNET_KEY not in p.extra_generation_params


def test_sdxl_text_to_image_with_controlnet_takes_the_authors_t1(host):
    unet = make_unet("sdxl")
    _, _, context = make_inputs("sdxl", 2, 8, 8)
    xl = Host(host.module, host.stubs, unet, context)
    xl.controlnet = controlnet_units((TinyControlNet("sdxl"), hint(24, 40), 1.0))
    _, p = xl.generate(args(), 24, 40, p=Processing(sd_model(unet, "sdxl"), 320, 192))
    assert p.extra_generation_params["HiDiffusion schedule"] == "sdxl_2048: T1 0.5, T2 0, aggressive"
    _, p = xl.generate(args(controlnet_recipe=False), 24, 40, p=Processing(sd_model(unet, "sdxl"), 320, 192))
    assert p.extra_generation_params["HiDiffusion schedule"] == "sdxl_2048: T1 0.4, T2 0, aggressive"
