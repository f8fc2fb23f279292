"""Drives scripts/hidiffusion.py the way the webui v1.10.1 does, over a real ldm U-Net.

Mirrors the order of modules/processing.py (process -> per batch
process_before_every_sampling -> sampling -> [before_hr, process_before_every_sampling,
hires sampling] -> postprocess, which is skipped when sampling raises) and the step
accounting of modules/sd_samplers_cfg_denoiser.py / sd_samplers_common.py
(launch_sampling sets denoiser.steps and total_steps, doubled for second-order samplers;
denoiser.step counts model calls from 0 in each pass; on_cfg_denoiser fires before each).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from controlnet_host import forward_with_residuals

STUB = Path(__file__).parent / "webui_stub"
SCRIPT = Path(__file__).parents[1] / "scripts" / "hidiffusion.py"


def load_script(with_xyz: bool = True):
    """Import scripts/hidiffusion.py against the stand-ins; returns (module, stubs)."""
    if str(STUB) not in sys.path:
        sys.path.insert(0, str(STUB))
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.") or n == "xyz_grid"]:
        del sys.modules[name]
    import xyz_grid
    from modules import script_callbacks, scripts, shared

    if with_xyz:
        xyz_class = type("Script", (), {"__module__": "xyz_grid.py"})
        scripts.scripts_data.append(scripts.ScriptClassData(xyz_class, "xyz_grid.py", "", xyz_grid))
    spec = importlib.util.spec_from_file_location("hidiffusion_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, SimpleNamespace(callbacks=script_callbacks, scripts=scripts, shared=shared, xyz=xyz_grid)


@dataclass
class Processing:
    """The attributes of StableDiffusionProcessing the script reads."""

    sd_model: object
    width: int
    height: int
    seeds: list[int] = field(default_factory=lambda: [1])
    all_seeds: list[int] = field(default_factory=lambda: [1])
    extra_generation_params: dict = field(default_factory=dict)
    is_hr_pass: bool = False


def paste(stubs, script, params: dict) -> list:
    """The update each of ``script``'s infotext fields gets from parsed infotext ``params``
    (None: left as it is), as modules/infotext_utils.py connect_paste's paste_func computes
    it: the infotext_pasted callbacks first, then the value by name (or callable), converted
    to the type of the component's current value."""
    params = dict(params)
    for callback in stubs.callbacks.callbacks["infotext_pasted"]:
        callback("", params)
    updates = []
    for component, key in script.infotext_fields:
        value = key(params) if callable(key) else params.get(key)
        if value is not None:
            kind = type(component.value)
            value = False if kind is bool and value == "False" else float(value) if kind is int else kind(value)
        updates.append(value)
    return updates


def send_to(script, source_values: list) -> list:
    """What "Send to img2img" copies (modules/infotext_utils.py connect_paste_params_buttons):
    the source tab's value of each field whose name is a string in paste_field_names."""
    names = script.paste_field_names
    return [value for (_, name), value in zip(script.infotext_fields, source_values, strict=True) if name in names]


def sd_model(unet: torch.nn.Module, arch: str = "sd1") -> SimpleNamespace:
    """``p.sd_model`` as the webui builds it: the flags of modules/sd_models.py set_model_type and
    the ``parameterization`` of the model's config (ldm's DDPM: "v" from v2-inference-v.yaml for
    arch "sd2_768v"; modules/models/sd3/sd3_model.py SD3Inferencer: "eps", for arch "sd3", whose
    ``model.diffusion_model`` is an MMDiT)."""
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), is_sd1=arch == "sd1",
                           is_sd2=arch in ("sd2", "sd2_768v"), is_sdxl=arch == "sdxl", is_ssd=False,
                           is_sd3=arch == "sd3", parameterization="v" if arch == "sd2_768v" else "eps")


def controlnet_units(*units: tuple) -> SimpleNamespace:
    """``p.scripts`` with sd-webui-controlnet's Script among the always-on scripts, its units as
    its ``process`` leaves them (scripts/controlnet.py ``latest_network``, a
    scripts/hook.py UnetHook whose ``control_params`` are ControlParams). units: (control
    model, hint, Ending Control Step) each."""
    params = [SimpleNamespace(control_model=model, hint_cond=hint, stop_guidance_percent=end,
                              start_guidance_percent=0.0, control_model_type=SimpleNamespace(is_controlnet=True))
              for model, hint, end in units]
    # every webui Script has a title() (the host looks for Tiled Diffusion's by it)
    controlnet = SimpleNamespace(latest_network=SimpleNamespace(control_params=params), title=lambda: "ControlNet")
    return SimpleNamespace(alwayson_scripts=[SimpleNamespace(title=lambda: "Other"), controlnet])


class Host:
    def __init__(self, script_module, stubs, unet, context):
        self.module, self.stubs, self.unet, self.context = script_module, stubs, unet, context
        self.script = script_module.HiDiffusionScript()
        self.steps_seen: list[tuple[int, int]] = []
        self.controlnet: SimpleNamespace | None = None  # set to controlnet_units(...) to run them
        self.forge = None  # a tests/forge_stub.py Patcher: generate() on Forge's model, its ControlNets

    def new_sd_model(self):
        if self.forge is None:
            return sd_model(self.unet)
        from forge_stub import sd_model as forge_sd_model

        return forge_sd_model(self.forge)

    def call_unet(self, x, t):
        """The U-Net as the sampler calls it; with ControlNet units, through sd-webui-controlnet's
        forward (tests/controlnet_host.py), one unit after the other, residuals summed."""
        if self.forge is not None and self.forge.controlnet_linked_list is not None:
            from forge_stub import apply_control

            residuals = self.forge.controlnet_linked_list.get_control(x, t, self.context)
            return forward_with_residuals(self.unet, x, t, self.context, residuals, add=apply_control)
        if self.controlnet is None:
            return self.unet(x, t, context=self.context)
        params = self.controlnet.alwayson_scripts[-1].latest_network.control_params
        residuals = None
        for param in params:
            out = param.control_model(x=x, hint=param.hint_cond, timesteps=t, context=self.context)
            residuals = out if residuals is None else [a + b for a, b in zip(residuals, out, strict=True)]
        return forward_with_residuals(self.unet, x, t, self.context, residuals)

    def sample(self, x, steps: int, second_order: bool = False, fail_after: int | None = None,
               calls: int | None = None):
        """One sampling pass: Euler-like (one call a step) or Heun-like (2 a step, 1 for the last);
        ``calls``: a sampler the host counts as one call a step that makes that many (HeunPP2)."""
        denoiser = SimpleNamespace(step=0, steps=steps, total_steps=2 * steps if second_order else steps)
        calls = calls or (2 * steps - 1 if second_order else steps)
        for call in range(calls):
            if fail_after is not None and call == fail_after:
                raise RuntimeError("sampling failed")
            params = self.stubs.callbacks.CFGDenoiserParams(
                x, None, None, max(call - 1, 0), steps, None, None, denoiser
            )
            for callback in self.stubs.callbacks.callbacks["cfg_denoiser"]:
                callback(params)
            handle = self.module._Run.handle
            if handle is not None and handle.active:
                self.steps_seen.append((handle.state.step, handle.state.steps))
            with torch.no_grad():
                x = x - 0.1 * self.call_unet(x, torch.full((x.shape[0],), 999.0 * (1 - call / calls)))
            denoiser.step += 1
        return x

    def generate(self, args, h: int, w: int, steps: int = 4, second_order: bool = False, hires: tuple | None = None,
                 fail_after: int | None = None, p: Processing | None = None, seed: int = 1):
        """txt2img (+ hires fix as (h2, w2, steps2)); returns (latent, p)."""
        p = p or Processing(self.new_sd_model(), width=w * 8, height=h * 8, seeds=[seed], all_seeds=[seed])
        if self.controlnet is not None:
            p.scripts = self.controlnet
        noise = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(seed))
        self.script.process(p, *args)
        self.script.process_before_every_sampling(p, *args, x=noise, noise=noise, c=None, uc=None)
        x = self.sample(noise, steps, second_order, fail_after)
        if hires is not None:
            h2, w2, steps2 = hires
            p.is_hr_pass = True
            x = torch.nn.functional.interpolate(x, size=(h2, w2))
            self.script.before_hr(p, *args)
            self.script.process_before_every_sampling(p, *args, x=x, noise=x, c=None, uc=None)
            x = self.sample(x, steps2, second_order)
            p.is_hr_pass = False
        self.script.postprocess(p, None, *args)
        return x, p
