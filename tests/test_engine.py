"""The engine on real ldm U-Nets: detection, exact restoration, off = vanilla, any size,
bad input, reproducibility, and coexistence with other instance-forward patches."""

from __future__ import annotations

import pytest
import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from unets import make_inputs, make_unet, unet_config

import hidiffusion_lib as hd
from hidiffusion_lib.detection import transformer_block
from hidiffusion_lib.state import shift_indices

LAYOUTS = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module", params=LAYOUTS)
def layout_unet(request):
    return request.param, make_unet(request.param)


def fingerprint(unet: torch.nn.Module) -> list:
    """Everything a patch could leave behind: instance attributes and hooks of every module."""
    return [
        (name, sorted(m.__dict__.keys() - {"_modules", "_parameters", "_buffers"}),
         len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in unet.named_modules()
    ]


def run(unet, inputs):
    x, t, c = inputs
    with torch.no_grad():
        return unet(x, t, context=c)


def test_detects_layouts_and_block_maps(layout_unet):
    layout, unet = layout_unet
    detected = hd.detect(unet)
    assert detected.arch == layout
    assert len(detected.block_map.windowed) == (10 if layout == "sdxl" else 5)
    for where in detected.block_map.windowed:
        assert hasattr(transformer_block(unet, where), "attn1")


def test_arch_override_must_fit_layout():
    sd = make_unet("sd1")
    assert hd.detect(sd, "sd2").arch == "sd2"
    with pytest.raises(hd.UnsupportedUNet, match=r"'sdxl'.*SD 1\.x/2\.x layout"):
        hd.detect(sd, "sdxl")
    xl = make_unet("sdxl")
    assert hd.detect(xl, "sdxl_turbo").block_map.extra is None


def test_unknown_and_refiner_unets_are_refused_untouched():
    odd = UNetModel(**dict(unet_config("sd1"), channel_mult=[1, 2]))
    before = fingerprint(odd)
    with pytest.raises(hd.UnsupportedUNet, match="unknown U-Net layout: 6 input blocks"):
        hd.apply(odd)
    assert fingerprint(odd) == before
    refiner = UNetModel(**dict(unet_config("sdxl"), channel_mult=[1, 2, 4, 4], attention_resolutions=[4, 2]))
    with pytest.raises(hd.UnsupportedUNet, match="refiner"):
        hd.apply(refiner)
    with pytest.raises(hd.UnsupportedUNet, match=r"torch\.nn\.modules\.linear\.Linear"):
        hd.apply(torch.nn.Linear(2, 2))


def test_both_parts_off_is_bit_identical(layout_unet):
    layout, unet = layout_unet
    inputs = make_inputs(layout, 2, 24, 40)
    vanilla = run(unet, inputs)
    with hd.apply(unet, hd.Settings(raunet=False, mswmsa=False)) as handle:
        handle.set_step(0, 10)
        assert torch.equal(run(unet, inputs), vanilla)


def test_remove_restores_exactly(layout_unet):
    layout, unet = layout_unet
    inputs = make_inputs(layout, 2, 24, 40)
    before, vanilla = fingerprint(unet), run(unet, inputs)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    handle = hd.apply(unet, hd.Settings(t1=1.0, t2=1.0))
    handle.set_step(0, 10)
    patched = run(unet, inputs)
    assert not torch.allclose(patched, vanilla, atol=1e-3)
    assert fingerprint(unet) != before
    handle.remove()
    handle.remove()
    assert fingerprint(unet) == before
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in state.items())
    assert torch.equal(run(unet, inputs), vanilla)


def test_apply_replaces_never_stacks():
    unet = make_unet("sd1")
    inputs = make_inputs("sd1", 2, 24, 40)
    once = hd.apply(unet, hd.Settings(shift="fixed", shift_index=1))
    once.set_step(0, 10)
    single = fingerprint(unet), run(unet, inputs)
    hd.apply(unet, hd.Settings(shift="fixed", shift_index=3))  # stale handle left behind
    again = hd.apply(unet, hd.Settings(shift="fixed", shift_index=1))
    again.set_step(0, 10)
    assert fingerprint(unet) == single[0]
    assert torch.equal(run(unet, inputs), single[1])
    once.remove()  # the stale handle must not take the live patch out
    assert torch.equal(run(unet, inputs), single[1])
    assert hd.remove(unet) > 0
    assert hd.remove(unet) == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(t1=1.5), r"Settings.t1 must be in \[0, 1\].*1.5"),
        (dict(t2=-0.1), r"Settings.t2 must be in \[0, 1\]"),
        (dict(t1="0.5"), r"Settings.t1 must be a number in \[0, 1\] or None, got '0.5'"),
        (dict(raunet=1), r"Settings.raunet must be True or False, got 1"),
        (dict(shift="swirl"), r"Settings.shift must be one of 'random', 'cycle', 'fixed', got 'swirl'"),
        (dict(shift_index=4), r"Settings.shift_index must be in \[0, 3\], got 4"),
        (dict(rau_mode="area"), r"Settings.rau_mode must be one of 'nearest', 'bicubic'"),
        (dict(arch="sd3"), r"Settings.arch must be one of 'sd1', 'sd2', 'sdxl', 'sdxl_turbo', got 'sd3'"),
        (dict(aggressive="yes"), r"Settings.aggressive must be True or False"),
    ],
)
def test_bad_settings_change_nothing(settings, message):
    unet = make_unet("sd1")
    live = hd.apply(unet, hd.Settings(shift="fixed"))
    live.set_step(0, 10)
    inputs = make_inputs("sd1", 1, 16, 16)
    before, output = fingerprint(unet), run(unet, inputs)
    with pytest.raises((TypeError, ValueError), match=message):
        hd.apply(unet, hd.Settings(**settings))
    assert fingerprint(unet) == before
    assert torch.equal(run(unet, inputs), output)


def test_settings_must_be_settings():
    with pytest.raises(TypeError, match="Settings or None, got dict"):
        hd.apply(make_unet("sd1"), {"t1": 0.5})


def test_set_step_validates():
    handle = hd.apply(make_unet("sd1"))
    for step, steps in ((-1, 10), (0, 0), (1.5, 10), (True, 10)):
        with pytest.raises(ValueError, match="set_step"):
            handle.set_step(step, steps)
    handle.remove()


# (latent h, latent w, batch): 1:4 to 4:1, odd sides, sides not multiples of 8
SIZES = [(16, 64, 2), (64, 16, 1), (17, 68, 1), (45, 27, 1), (27, 45, 2), (9, 9, 8), (33, 20, 3)]


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
@pytest.mark.parametrize(
    "settings",
    [
        hd.Settings(t1=1.0, t2=1.0, shift="fixed", shift_index=3),
        hd.Settings(t1=1.0, t2=1.0, aggressive=False, rau_mode="bicubic", shift="cycle"),
        hd.Settings(aggressive=True),
        hd.Settings(raunet=False),
    ],
    ids=["all-on", "bicubic", "aggressive", "mswmsa-only"],
)
def test_any_size_and_aspect(layout, settings):
    if layout != "sdxl" and settings.aggressive:
        pytest.skip("aggressive is SDXL's")
    unet = make_unet(layout)
    with hd.apply(unet, settings) as handle:
        for h, w, batch in SIZES:
            x, t, c = make_inputs(layout, batch, h, w)
            for step in (0, 2):
                handle.set_step(step, 10)
                with torch.no_grad():
                    out = unet(x, t, context=c)
                assert out.shape == x.shape and torch.isfinite(out).all()


def test_aggressive_only_for_sdxl():
    handle = hd.apply(make_unet("sd1"), hd.Settings(aggressive=True))
    assert handle.schedule_for(128, 128).aggressive is False
    handle.remove()


def test_no_global_rng_use_and_seeded_shifts():
    unet = make_unet("sd1")
    inputs = make_inputs("sd1", 2, 24, 40)
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(123)
        before = torch.get_rng_state()
        with hd.apply(unet, hd.Settings(seed=seed)) as handle:
            handle.set_step(3, 10)
            outputs.append(run(unet, inputs))
        assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(outputs[0], outputs[1])
    draws = {tuple(shift_indices(hd.Settings(seed=s), step, 5)) for s in range(4) for step in range(4)}
    assert len(draws) > 8


def test_shift_policies():
    assert shift_indices(hd.Settings(shift="fixed", shift_index=2), 7, 3) == [2, 2, 2]
    assert shift_indices(hd.Settings(shift="cycle"), 3, 5) == [3, 0, 1, 2, 3]


def test_native_gate_skips_at_training_size():
    unet = make_unet("sd1")
    small = make_inputs("sd1", 1, 64, 48)
    vanilla = run(unet, small)
    with hd.apply(unet, hd.Settings(native_gate=True, t1=1.0)) as handle:
        handle.set_step(0, 10)
        assert torch.equal(run(unet, small), vanilla)
        assert handle.state.gated
        run(unet, make_inputs("sd1", 1, 72, 16))  # one side above 64, the area below 64 x 64
        assert handle.state.gated
        run(unet, make_inputs("sd1", 1, 72, 64))
        assert not handle.state.gated and handle.state.active["main"]


def test_trace_records_what_each_forward_did():
    unet = make_unet("sd1")
    with hd.apply(unet, hd.Settings(t1=0.5, shift="fixed", shift_index=3)) as handle:
        for step in range(4):
            handle.set_step(step, 4)
            run(unet, make_inputs("sd1", 1, 24, 40))
    assert [(f.step, f.steps, f.main, f.extra) for f in handle.trace] == [
        (0, 4, True, False), (1, 4, True, False), (2, 4, False, False), (3, 4, False, False)]
    windowed = len(hd.BLOCK_MAPS["sd1"].windowed)
    assert {(f.height, f.width, f.windows) for f in handle.trace} == {(24, 40, (3,) * windowed)}


@pytest.mark.parametrize("size", [(32, 32), (13, 21), (6, 7)])
def test_rad_is_the_dilated_stride_4_conv_run_by_the_unchanged_module(monkeypatch, size):
    """RAD equals the paper's conv (stride 4, padding 2, dilation 2) at any size, and the conv
    module runs with its own stride, so a class-level Conv2d patch that adds its own conv of the
    same stride and padding, as the webui's Lora does in lora_functional mode
    (extensions-builtin/Lora/network_lora.py builds it from the module's stride and padding at
    load), lands on RAD steps too."""
    import torch.nn.functional as F

    unet = make_unet("sd1")
    down = unet.input_blocks[3][0]
    op = down.op
    generator = torch.Generator().manual_seed(3)
    delta = torch.nn.Conv2d(op.in_channels, op.out_channels, op.kernel_size, op.stride, op.padding, bias=False)
    delta.weight.data = torch.randn(delta.weight.shape, generator=generator) * 0.1
    original = torch.nn.Conv2d.forward
    seen = []

    def functional_lora(self, x):
        y = original(self, x)
        if self is op:
            seen.append((self.stride, self.padding, self.dilation))
            y = y + original(delta, x)
        return y

    monkeypatch.setattr(torch.nn.Conv2d, "forward", functional_lora)
    inputs, outputs = [], []
    down.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    down.register_forward_hook(lambda module, args, output: outputs.append(output))
    with hd.apply(unet, hd.Settings(t1=1.0, mswmsa=False)) as handle:
        handle.set_step(0, 10)
        run(unet, make_inputs("sd1", 1, *size))
    x = inputs[0]
    expected = F.conv2d(x, op.weight + delta.weight, op.bias, stride=4, padding=2, dilation=2)
    assert outputs[0].shape == expected.shape == (*x.shape[:2], -(-size[0] // 4), -(-size[1] // 4))
    torch.testing.assert_close(outputs[0], expected, rtol=1e-5, atol=1e-5)
    assert seen == [((2, 2), (1, 1), (1, 1))]


@pytest.mark.parametrize("size", [(5, 7), (13, 21), (1, 1), (16, 16)])
def test_nearest_x4_conv_shortcut_is_exact(size):
    """The RAU upsampler's x4 shortcut equals its conv over a nearest x4 map, bit for bit."""
    import torch.nn.functional as F

    from hidiffusion_lib.raunet import conv_of_nearest_x4

    generator = torch.Generator().manual_seed(sum(size))
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, *size, generator=generator)
    expected = conv(F.interpolate(x, size=(4 * size[0], 4 * size[1]), mode="nearest"))
    assert torch.equal(conv_of_nearest_x4(conv, x), expected)


def test_existing_instance_forward_is_kept_inside_and_restored():
    """A forward set before us (Hypertile's style) runs inside our window and comes back on removal."""
    unet = make_unet("sd1")
    attn = unet.input_blocks[1][1].transformer_blocks[0].attn1
    calls = []

    def other(x, context=None, mask=None):
        calls.append(x.shape)
        return type(attn).forward(attn, x, context, mask)

    attn.forward = other
    inputs = make_inputs("sd1", 2, 24, 40)
    with hd.apply(unet, hd.Settings(raunet=False, shift="fixed")) as handle:
        handle.set_step(0, 10)
        run(unet, inputs)
    assert calls[-1] == (8, 24 * 40 // 4, attn.to_q.in_features)
    assert attn.forward is other


def test_wrapper_installed_over_ours_passes_through_after_removal():
    unet = make_unet("sd1")
    attn = unet.input_blocks[1][1].transformer_blocks[0].attn1
    inputs = make_inputs("sd1", 2, 24, 40)
    vanilla = run(unet, inputs)
    handle = hd.apply(unet, hd.Settings(raunet=False))
    ours = attn.forward

    def outer(*args, **kwargs):
        return ours(*args, **kwargs)

    attn.forward = outer
    handle.remove()
    assert attn.forward is outer
    assert torch.equal(run(unet, inputs), vanilla)


def test_attn1_wrapper_passes_foreign_calls_through():
    """sgm's keywords, a reference-bank context or a tiled call go straight to the attention."""
    unet = make_unet("sd1")
    block = unet.input_blocks[1][1]
    attn = block.transformer_blocks[0].attn1
    handle = hd.apply(unet, hd.Settings(raunet=False, shift="fixed", shift_index=2))
    handle.set_step(0, 10)
    x = torch.randn(2, 24 * 40, attn.to_q.in_features)
    run(unet, make_inputs("sd1", 2, 24, 40))  # records h, w = 24, 40 and the shifts
    plain = type(attn).forward(attn, x)
    bank = torch.cat([x, x], dim=1)
    assert torch.equal(attn(x, context=bank), type(attn).forward(attn, x, context=bank))
    assert torch.equal(attn(x[:, :100]), type(attn).forward(attn, x[:, :100]))
    windowed = attn(x)
    assert not torch.allclose(windowed, plain, atol=1e-4)
    assert torch.equal(attn(x, context=x), windowed)
    with pytest.raises(TypeError, match="additional_tokens"):
        attn(x, additional_tokens=torch.zeros(2, 1, x.shape[-1]))  # ldm's attn1 does not take it: passed on as is
    handle.remove()


def test_sgm_calling_conventions():
    """sgm's BasicTransformerBlock calls attn1(x, context=None, additional_tokens=None,
    n_times_crossframe_attn_in_self=0) and the webui calls sgm's U-Net with keywords."""
    unet = make_unet("sdxl")
    x, t, c = make_inputs("sdxl", 2, 24, 40)
    attn = unet.input_blocks[4][1].transformer_blocks[1].attn1
    received = []

    def sgm_like(x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
        received.append((x.shape[0], additional_tokens, n_times_crossframe_attn_in_self))
        return type(attn).forward(attn, x, context, mask)

    attn.forward = sgm_like
    with hd.apply(unet, hd.Settings(raunet=False)) as handle:
        handle.set_step(0, 10)
        with torch.no_grad():
            unet(x=x, timesteps=t, context=c)
        tokens = torch.randn(2, 12 * 20, attn.to_q.in_features)
        attn(tokens, context=None, additional_tokens=None, n_times_crossframe_attn_in_self=0)
        attn(tokens, context=None, additional_tokens=None, n_times_crossframe_attn_in_self=2)
    assert received[0] == (8, None, 0)  # windowed inside the U-Net call
    assert received[-2:] == [(8, None, 0), (2, None, 2)]  # cross-frame attention passes through
