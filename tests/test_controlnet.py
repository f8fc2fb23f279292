"""ControlNet beside HiDiffusion (hidiffusion_lib/controlnet.py) in sd-webui-controlnet's U-Net
loop (tests/controlnet_host.py): residuals land on the skips as they are at each step, the
recipe's native size and 60% share, and the model left as it was; a T2I-Adapter's features
(tests/controlnet_host.py adapter_forward) land on the levels as they are at each step."""

from __future__ import annotations

import enum
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from controlnet_host import (
    T2I_LANDS,
    TinyAdapter,
    TinyControlNet,
    TinyIPAdapter,
    adapter_forward,
    controlled_forward,
    ip_masked_forward,
)
from unets import make_inputs, make_unet

import hidiffusion_lib as hd
from hidiffusion_lib.controlnet import control_latent_size, control_runs, fit_features, fit_residuals
from hidiffusion_lib.hosts import A1111


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


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
def test_adapter_features_land_resized_bicubic_on_raunet_steps_and_unchanged_on_others(layout):
    unet, adapter = make_unet(layout), TinyAdapter(layout)
    plain = TinyAdapter(layout)  # the same weights, never wrapped: the host's nearest resize
    lands = T2I_LANDS[layout]
    size, steps = (32, 48), 4
    x, t, context = make_inputs(layout, 1, *size)
    hint = hint_for(*size)
    raw = plain(hint=hint)
    full = [tuple(f.shape[-2:]) for f in raw]
    mains = []
    with hd.apply(unet, hd.Settings(t1=0.5, aggressive=False)) as handle:
        hd.install_adapter(adapter, handle, lands)
        for step in range(steps):
            handle.set_step(step, steps)
            fitted = adapter_forward(unet, adapter, x, t, context, hint, lands)
            forward = handle.trace[-1]
            sizes = [*forward.skips, forward.skips[-1]]
            assert forward.features == [sizes[i] for i in lands], f"step {step}"
            nearest = adapter_forward(unet, plain, x, t, context, hint, lands)
            assert handle.trace[-1].features is None
            mains.append(forward.main)
            if forward.main:
                assert forward.features != full
                assert (fitted - nearest).abs().max() > 1e-3
                # each feature is the bicubic resize of the adapter's own
                for feature, own, want in zip(adapter(x=x, hint=hint), raw, forward.features, strict=True):
                    torch.testing.assert_close(feature, F.interpolate(own, size=want, mode="bicubic"), rtol=0, atol=0)
            else:
                assert forward.features == full
                torch.testing.assert_close(fitted, nearest, rtol=0, atol=0)
    assert mains == [True, True, False, False]
    # the adapter computed its features once; its cache kept the full sizes
    assert adapter.computed == 1 and [tuple(f.shape[-2:]) for f in adapter.control] == full


def test_adapter_is_unwrapped_and_runs_as_before_after_removal():
    unet, adapter = make_unet("sd1"), TinyAdapter("sd1")
    lands = T2I_LANDS["sd1"]
    x, t, context = make_inputs("sd1", 2, 32, 32)
    hint = hint_for(32, 32)
    before = adapter_forward(unet, adapter, x, t, context, hint, lands)
    with hd.apply(unet, hd.Settings(t1=1.0)) as handle:
        handle.set_step(0, 10)
        hd.install_adapter(adapter, handle, lands)
        on = adapter_forward(unet, adapter, x, t, context, hint, lands)
        assert handle.trace[-1].main and handle.trace[-1].features is not None
    assert (on - before).abs().max() > 1e-3
    # the patch removed, a wrapper left behind passes the features through as they are
    torch.testing.assert_close(adapter_forward(unet, adapter, x, t, context, hint, lands), before, rtol=0, atol=0)
    assert hd.remove_control(adapter) == 1 and hd.remove_control(adapter) == 0 and "forward" not in vars(adapter)
    torch.testing.assert_close(adapter_forward(unet, adapter, x, t, context, hint, lands), before, rtol=0, atol=0)


def test_adapter_is_left_alone_in_a_native_size_pass():
    unet, adapter = make_unet("sd1"), TinyAdapter("sd1")
    x, t, context = make_inputs("sd1", 1, 64, 64)
    with hd.apply(unet, hd.Settings(native_gate=True)) as handle:
        hd.install_adapter(adapter, handle, T2I_LANDS["sd1"])
        handle.set_step(0, 5)
        adapter_forward(unet, adapter, x, t, context, hint_for(64, 64), T2I_LANDS["sd1"])
    assert handle.trace[-1].features is None


def test_fit_features_takes_the_landing_blocks_sizes():
    features = [torch.ones(1, 2, 8, 8), torch.ones(1, 2, 4, 4), torch.ones(1, 2, 2, 2)]
    sizes = [(8, 8), (4, 4), (4, 4), (2, 2), (1, 1)]
    out = fit_features(features, sizes, (1, 3, -1))
    assert [tuple(f.shape[-2:]) for f in out] == [(4, 4), (2, 2), (1, 1)]
    torch.testing.assert_close(out[1], torch.ones(1, 2, 2, 2))  # bicubic keeps a constant
    assert fit_features(features, sizes, (1, 3)) == features  # another count: the host's business


def left_half(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, 8 * h, 8 * w)
    mask[..., : 4 * w] = 1
    return mask


def test_region_mask_fits_the_tokens_of_shrunk_levels_the_host_cannot_infer():
    unet = make_unet("sd1")
    h, w = 40, 24  # 3x2 tokens in the middle block on RAU-Net steps, 3x1 by the host's rule (5x3 without)
    x, t, context = make_inputs("sd1", 2, h, w)
    ip = TinyIPAdapter(left_half(h, w), h, w)
    seen = []
    masked = ip.apply_effective_region_mask

    def expected(out):  # the mask resized to the grid these tokens have (checked below)
        grid = hd_token_grid(out.shape[1])
        seen.append(grid)
        return out * F.interpolate(ip.effective_region_mask, size=grid, mode="bilinear").reshape(1, -1, 1)

    ip_masked_forward(unet, ip, x, t, context)  # without HiDiffusion the host's grid is right
    with hd.apply(unet, hd.Settings(t1=1.0, native_gate=False)) as handle:
        handle.set_step(0, 4)
        with pytest.raises(RuntimeError, match="must match"):  # the host's own grid
            ip_masked_forward(unet, ip, x, t, context)
        calls = ip.calls
        hd.install_region_mask(ip, handle)
        fitted = ip_masked_forward(unet, ip, x, t, context)
        levels = set(handle.trace[-1].skips)
        assert (3, 2) in levels and ip.calls == calls  # the wrapper took every call
        del ip.apply_effective_region_mask  # the reference: each call's mask on its own grid
        ip.apply_effective_region_mask = expected
        hd_token_grid = {a * b: (a, b) for a, b in levels}.__getitem__
        torch.testing.assert_close(fitted, ip_masked_forward(unet, ip, x, t, context), rtol=0, atol=0)
        assert set(seen) <= levels and (3, 2) in seen
    del ip.apply_effective_region_mask
    assert ip.apply_effective_region_mask.__func__ is masked.__func__


def test_region_mask_is_the_hosts_where_its_grid_is_right_and_is_restored():
    unet = make_unet("sd1")
    h, w = 32, 16  # every level's grid keeps the latent's aspect, RAU-Net steps too
    x, t, context = make_inputs("sd1", 1, h, w)
    ip = TinyIPAdapter(left_half(h, w), h, w)
    plain = TinyIPAdapter(left_half(h, w), h, w)
    with hd.apply(unet, hd.Settings(t1=0.5, native_gate=False)) as handle:
        hd.install_region_mask(ip, handle)
        for step in range(2):
            handle.set_step(step, 2)
            ours = ip_masked_forward(unet, ip, x, t, context)
            torch.testing.assert_close(ours, ip_masked_forward(unet, plain, x, t, context), rtol=0, atol=0)
    assert [f.main for f in handle.trace[::2]] == [True, False]
    assert ip.calls == 0  # every call was the wrapper's while the patch lived
    assert hd.remove_control(ip) == 1 and "apply_effective_region_mask" not in vars(ip)
    ip_masked_forward(unet, ip, x, t, context)
    assert ip.calls == 16


class ModelType(enum.Enum):
    """sd-webui-controlnet's ControlModelType (scripts/enums.py), the members that matter here."""

    ControlNet = "ControlNet"
    T2I_Adapter = "T2I_Adapter"
    T2I_StyleAdapter = "T2I_StyleAdapter"
    IPAdapter = "IPAdapter"

    @property
    def is_controlnet(self) -> bool:
        return self is ModelType.ControlNet


@pytest.mark.parametrize(("is_sdxl", "lands"), [(False, (2, 5, 8, 11)), (True, (3, 5, 8, -1))])
def test_a1111_host_returns_controlnets_t2i_adapters_and_masked_ip_adapters(is_sdxl, lands):
    models = {kind: torch.nn.Identity() for kind in ModelType}
    params = [SimpleNamespace(control_model=model, control_model_type=kind, stop_guidance_percent=0.5,
                              effective_region_mask=None) for kind, model in models.items()]
    masked = torch.nn.Identity()  # an IP-Adapter with a region mask (ControlParams keeps the unit's)
    params.append(SimpleNamespace(control_model=masked, control_model_type=ModelType.IPAdapter,
                                  stop_guidance_percent=1.0, effective_region_mask=torch.ones(1, 1, 8, 8)))
    p = SimpleNamespace(sd_model=SimpleNamespace(is_sdxl=is_sdxl), scripts=SimpleNamespace(alwayson_scripts=[
        SimpleNamespace(latest_network=SimpleNamespace(control_params=params))]))
    units = A1111().control_units(p)
    assert [(u.model, u.end, u.lands, u.adapter, u.controlnet, u.region_mask) for u in units] == [
        (models[ModelType.ControlNet], 0.5, None, False, True, False),
        (models[ModelType.T2I_Adapter], 0.5, lands, True, False, False), (masked, 1.0, None, False, False, True)]
