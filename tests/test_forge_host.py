"""The webui script on Forge's model objects (tests/forge_stub.py, over a real ldm U-Net):
the host adapter finds the U-Net and the ControlNets, steps aside for the built-ins that would
clash, and leaves nothing behind. The real Forge runs in tests/e2e/test_forge_e2e.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from controlnet_host import TinyControlNet
from forge_stub import ControlNet, Patcher, T2IAdapter, sd_model
from test_webui_script import args, hint, marks, set_up_pass
from unets import TinyMMDiT, make_inputs, make_unet
from webui_host import Host, Processing, load_script
from webui_host import sd_model as a1111_sd_model

from hidiffusion_lib import hosts
from hidiffusion_lib import script_args as sa
from hidiffusion_lib.hosts import forge


@pytest.fixture
def host():
    module, stubs = load_script()
    unet = make_unet("sd1")
    _, _, context = make_inputs("sd1", 2, 8, 8)
    host = Host(module, stubs, unet, context)
    host.forge = Patcher(unet)
    return host


def test_each_model_gets_its_back_end(host):
    forge_model, a1111_model = sd_model(host.forge), a1111_sd_model(host.unet)
    assert hosts.host_of(forge_model).name == "Forge" and hosts.host_of(a1111_model).name == "A1111"
    assert hosts.host_of(forge_model).unet(forge_model) is host.unet
    assert hosts.host_of(a1111_model).unet(a1111_model) is host.unet


def test_families_from_the_flags_and_the_predictor(host):
    """Forge keeps A1111's flags ("WebUI Legacy") and says v-prediction on the KModel's predictor."""
    family = hosts.Forge().family
    assert family(sd_model(host.forge)) == "sd1" and family(sd_model(host.forge, "sdxl")) == "sdxl"
    assert family(sd_model(host.forge, "sd2")) == "sd2"
    assert family(sd_model(Patcher(host.unet, "v_prediction"), "sd2")) == "sd2_768v"
    assert family(sd_model(Patcher(host.unet, "v_prediction"), "sdxl")) == "sdxl"  # SDXL v-pred: 1024 px
    assert family(sd_model(Patcher(host.unet), "sd3")) == "sd3"
    assert family(sd_model(Patcher(host.unet), "flux")) is None  # Flux sets no flag: the tree decides


def test_sd2_768v_gate_and_sd3_skip_on_forge(host, capsys):
    host.forge = Patcher(host.unet, "v_prediction")
    p = Processing(sd_model(host.forge, "sd2"), 768, 768)
    assert not set_up_pass(host, p, args(native_gate=True), 96, 96)
    assert "SD 2.x 768-v's training size (768x768 in area)" in p.extra_generation_params[sa.SKIPPED_KEY]
    mmdit = TinyMMDiT()
    flux = Host(host.module, host.stubs, mmdit, host.context)
    flux.forge = Patcher(mmdit)
    vanilla, _ = flux.generate(args(enabled=False), 24, 40)
    on, p = flux.generate(args(), 24, 40, p=Processing(sd_model(flux.forge, "flux"), 320, 192))
    assert torch.equal(on, vanilla) and marks(mmdit) == 0
    assert p.extra_generation_params[sa.SKIPPED_KEY] == ("first pass: this TinyMMDiT is not a U-Net HiDiffusion has"
                                                         " a block map for; it ran unchanged")


def test_off_is_vanilla_and_on_leaves_no_trace(host):
    vanilla, _ = host.generate(args(enabled=False), 24, 40, steps=3)
    on, p = host.generate(args(), 24, 40, steps=3)
    assert not torch.allclose(on, vanilla, atol=1e-3) and marks(host.unet) == 0
    assert p.extra_generation_params["HiDiffusion schedule"].startswith("sd15_1024")
    assert torch.equal(host.generate(args(enabled=False), 24, 40, steps=3)[0], vanilla)
    with pytest.raises(RuntimeError):
        host.generate(args(), 24, 40, steps=3, fail_after=1)  # postprocess skipped
    for callback in host.stubs.callbacks.callbacks["model_loaded"]:
        callback(sd_model(host.forge))  # Forge's model reload clears it as A1111's does
    assert marks(host.unet) == 0
    assert torch.equal(host.generate(args(), 24, 40, steps=3)[0], on)


def kohya(patcher):  # sd_forge_kohya_hrfix: Deep Shrink
    patcher.set_model_input_block_patch_after_skip(lambda h, to: h)
    patcher.set_model_output_block_patch(lambda h, hsp, to: (h, hsp))


def multidiffusion(patcher):  # sd_forge_multidiffusion: tiles through a U-Net wrapper
    patcher.set_model_unet_function_wrapper(lambda apply, params: apply(**params))


def stylealign(patcher):  # sd_forge_stylealign: every attn1 replaced
    patcher.set_model_replace_all(lambda q, k, v, extra: q, "attn1")


def sag_and_freeu(patcher):  # sd_forge_sag (middle attn1) and sd_forge_freeu (output block patch)
    patcher.set_model_attn1_replace(lambda q, k, v, extra: q, "middle", 0, 0)
    patcher.set_model_output_block_patch(lambda h, hsp, to: (h, hsp))


@pytest.mark.parametrize(("builtin", "same_as", "key", "note"), [
    (kohya, {"raunet": False}, "HiDiffusion RAU-Net", forge.FEATURES_RESIZED),
    (multidiffusion, {"enabled": False}, sa.SKIPPED_KEY, "first pass: " + forge.U_NET_WRAPPED),
    (stylealign, {"mswmsa": False}, "HiDiffusion MSW-MSA", forge.ATTENTION_REPLACED),
    (sag_and_freeu, {}, None, None),
], ids=["kohya-hrfix", "multidiffusion", "stylealign", "sag-freeu"])
def test_builtins_that_clash_are_stepped_aside_with_a_note(host, capsys, builtin, same_as, key, note):
    expected, _ = host.generate(args(**same_as), 24, 40, steps=3)
    builtin(host.forge)
    got, p = host.generate(args(), 24, 40, steps=3)
    assert torch.equal(got, expected)
    notes = {key: value for key, value in p.extra_generation_params.items()
             if isinstance(value, str) and value.startswith(("off", "first"))}
    assert notes == ({key: note} if key else {})
    if note:
        assert note in capsys.readouterr().out


def test_controlnets_land_on_every_level_and_are_unwrapped(host, capsys, tmp_path, monkeypatch):
    """Forge's apply_control drops a residual of another size; on RAU-Net steps the skips are
    smaller, so every residual must come fitted."""
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("HIDIFFUSION_TRACE", str(trace))
    own, default, adapter = TinyControlNet("sd1"), TinyControlNet("sd1", seed=8), T2IAdapter(TinyControlNet("sd1"))
    for cnet in (ControlNet(own, hint(72, 80), end=0.5), adapter, ControlNet(default, hint(72, 80))):
        host.forge.add_patched_controlnet(cnet)
    _, p = host.generate(args(t1=0.5), 72, 80, steps=5)
    assert "could not be applied" not in capsys.readouterr().out
    forwards = json.loads(trace.read_text().splitlines()[-1])["forwards"]
    assert [f["main"] for f in forwards] == [True, True, False, False, False]
    for forward in forwards:
        assert forward["residuals"] == [*forward["skips"], forward["skips"][-1]]
    # the recipe: the unit left at Ending Control Step 1.0 runs at the native size for 60%
    assert default.calls == [((56, 64), (448, 512))] * 3 and own.calls == [((56, 64), (448, 512))] * 5
    assert p.extra_generation_params[sa.CONTROLNET_KEY].startswith("first pass: 2 unit(s): recipe")
    assert all("forward" not in vars(model) for model in (own, default)) and marks(host.unet) == 0


def test_without_fitting_forge_drops_the_residuals(host, capsys, monkeypatch):
    """The stand-in's apply_control drops what does not fit, as Forge's does: so the test above can fail."""
    host.forge.add_patched_controlnet(ControlNet(TinyControlNet("sd1"), hint(40, 48)))
    monkeypatch.setattr(host.module.control, "install_control", lambda *a, **k: None)  # the wrapper, taken away
    host.generate(args(t1=0.5, controlnet_recipe=False), 40, 48, steps=2)
    assert "could not be applied" in capsys.readouterr().out


def test_heunpp2_calls_of_a_step_get_that_step(host):
    """Forge's HeunPP2 is not marked second order (modules/sd_samplers_kdiffusion.py): its
    total_steps says one call a step, it makes 3, 3, 2, 1 for 4 steps."""
    p = Processing(sd_model(host.forge), 320, 192)
    p.sampler = SimpleNamespace(funcname="sample_heunpp2")
    noise = torch.randn(2, 4, 24, 40, generator=torch.Generator().manual_seed(1))
    host.script.process(p, *args())
    host.script.process_before_every_sampling(p, *args(), x=noise, noise=noise, c=None, uc=None)
    host.sample(noise, 4, calls=9)
    host.script.postprocess(p, None, *args())
    assert host.steps_seen == [(s, 4) for s in (0, 0, 0, 1, 1, 1, 2, 2, 3)]
