"""ControlNet beside HiDiffusion (hidiffusion_lib/controlnet.py) in sd-webui-controlnet's U-Net
loop (tests/controlnet_host.py): residuals land on the skips as they are at each step, the
recipe's native size and 60% share, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
from controlnet_host import TinyControlNet, controlled_forward
from unets import make_inputs, make_unet

import hidiffusion_lib as hd
from hidiffusion_lib.controlnet import control_latent_size, control_runs, fit_residuals


def hint_for(h: int, w: int) -> torch.Tensor:
    return torch.rand(1, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(h * w))


@pytest.mark.parametrize(("layout", "settings", "size"), [
    ("sd1", hd.Settings(t1=0.5, t2=0.3), (16, 24)),
    ("sd1", hd.Settings(t1=0.5, t2=0.3), (13, 21)),
    ("sdxl", hd.Settings(), (27, 45)),
    ("sdxl", hd.Settings(aggressive=False, t1=0.6), (32, 48)),
])
def test_skips_at_predicts_every_input_block_of_every_step(layout, settings, size):
    unet = make_unet(layout)
    steps = 8
    x, t, context = make_inputs(layout, 1, *size)
    with hd.apply(unet, settings) as handle:
        for step in range(steps):
            handle.set_step(step, steps)
            expected = handle.state.skips_at(*size)
            with torch.no_grad():
                unet(x, t, context=context)
            assert handle.trace[-1].skips == expected, f"step {step}"
    switched = {(f.main, f.extra) for f in handle.trace}
    assert len(switched) > 1, "the schedule never switched: the sizes were not tested on both sides"


def test_residuals_land_on_the_shrunk_skips_and_the_model_is_restored():
    unet, control = make_unet("sd1"), TinyControlNet("sd1")
    x, t, context = make_inputs("sd1", 2, 32, 32)
    hint = hint_for(32, 32)
    before = controlled_forward(unet, control, x, t, context, hint)
    with hd.apply(unet, hd.Settings(t1=1.0)) as handle:
        handle.set_step(0, 10)
        hd.install_control(control, handle, recipe=False)
        fitted = controlled_forward(unet, control, x, t, context, hint)
        forward = handle.trace[-1]
        assert forward.main and forward.residuals == [*forward.skips, forward.skips[-1]]
        assert control.calls[-1] == ((32, 32), (256, 256))  # recipe off: full size
        # the same step with the host's nearest resize of the full-size residuals differs
        hd.remove_control(control)
        nearest = controlled_forward(unet, control, x, t, context, hint)
        assert (fitted - nearest).abs().max() > 1e-3
    assert hd.remove_control(control) == 0 and "forward" not in vars(control)
    torch.testing.assert_close(controlled_forward(unet, control, x, t, context, hint), before, rtol=0, atol=0)


def test_recipe_runs_control_at_native_size_for_the_first_60_percent():
    unet, control = make_unet("sd1"), TinyControlNet("sd1")
    size = (80, 96)  # 768x640 px on SD 1.x: the control runs at 48x64 (512x384 px)
    x, t, context = make_inputs("sd1", 1, *size)
    hint = hint_for(*size)
    steps = 5
    outputs = []
    with hd.apply(unet, hd.Settings()) as handle:
        hd.install_control(control, handle, recipe=True)
        for step in range(steps):
            handle.set_step(step, steps)
            outputs.append(controlled_forward(unet, control, x, t, context, hint, weight=3.0))
            assert handle.trace[-1].residuals == [*handle.trace[-1].skips, handle.trace[-1].skips[-1]]
        assert control.calls == [((48, 64), (384, 512))] * 3  # steps 0, 1, 2 < 0.6 * 5
        assert [f.control for f in handle.trace] == [(48, 64)] * 3 + [None] * 2
        # after the share the residuals are zeros: the plain patched U-Net's output, bit for bit
        plain = []
        for step in range(steps):
            handle.set_step(step, steps)
            with torch.no_grad():
                plain.append(unet(x, t, context=context))
        for step in (3, 4):
            torch.testing.assert_close(outputs[step], plain[step], rtol=0, atol=0)
        assert all((outputs[step] - plain[step]).abs().max() > 1e-3 for step in (0, 1, 2))


def test_a_unit_with_its_own_ending_step_runs_on_every_step_it_is_called():
    unet, control = make_unet("sd1"), TinyControlNet("sd1")
    x, t, context = make_inputs("sd1", 1, 72, 72)
    with hd.apply(unet, hd.Settings()) as handle:
        hd.install_control(control, handle, recipe=True, share=None)
        for step in range(4):
            handle.set_step(step, 4)
            controlled_forward(unet, control, x, t, context, hint_for(72, 72))
    assert control.calls == [((64, 64), (512, 512))] * 4


def test_native_size_pass_leaves_the_control_model_alone():
    unet, control = make_unet("sd1"), TinyControlNet("sd1")
    x, t, context = make_inputs("sd1", 1, 64, 64)
    with hd.apply(unet, hd.Settings(native_gate=True)) as handle:
        hd.install_control(control, handle)
        handle.set_step(4, 5)
        controlled_forward(unet, control, x, t, context, hint_for(64, 64))
    assert control.calls == [((64, 64), (512, 512))] and handle.trace[-1].residuals is None


def test_recipe_sizes_and_share_follow_the_authors_formulas():
    # SDXL 2048 px -> 1024 px; SD 1.x 1024x768 -> 512x384; 1000x1000 px (125 latent) -> 64 -> 64
    assert control_latent_size(256, 256, 128) == (128, 128)
    assert control_latent_size(128, 96, 64) == (64, 48)
    assert control_latent_size(125, 125, 64) == (64, 64)
    assert control_latent_size(100, 300, 128) == (40, 128)
    assert control_latent_size(48, 60, 64) == (48, 60)  # never enlarged
    assert [control_runs(i, 20, 0.6) for i in (11, 12)] == [True, False]
    assert [control_runs(i, 7, 0.6) for i in (4, 5)] == [True, False]  # 4 < 4.2
    # other lengths (a T2I-Adapter's four features) pass through
    residuals = [torch.zeros(1, 4, 8, 8)] * 4
    assert fit_residuals(residuals, [(4, 4)] * 13) == residuals


def test_controlnet_ratios_only_where_the_authors_have_them():
    with_cn = hd.Settings(controlnet=True)
    assert hd.resolve(with_cn, "sdxl", 256, 256).t1 == 0.5
    assert hd.resolve(hd.Settings(), "sdxl", 256, 256).t1 == 0.4
    assert hd.resolve(with_cn, "sd1", 128, 128) == hd.resolve(hd.Settings(), "sd1", 128, 128)
    assert hd.resolve(hd.Settings(controlnet=True, t1=0.3), "sdxl", 256, 256).t1 == 0.3
    with pytest.raises(TypeError, match="controlnet"):
        hd.Settings(controlnet="yes").validate()
