"""HiDiffusion for the AUTOMATIC1111 webui and Forge: the thin glue between their script hooks
and hidiffusion_lib. What differs between the back ends (where the U-Net lives, whose control
models run, which other patches to step aside for) is asked of hidiffusion_lib.hosts.

Lifecycle: ``process`` cleans any stale patch and validates the arguments;
``process_before_every_sampling`` patches the U-Net for each sampling pass (first pass,
hires fix pass); the ``on_cfg_denoiser`` callback tells the engine the step before every
model call; ``postprocess`` removes the patch. The webui skips ``postprocess`` when a
generation raises, so the next ``process`` and every model load clean up as well. A model
load during sampling is the refiner switch: its steps run without HiDiffusion, and the
infotext says so. With ControlNet units on (sd-webui-controlnet, Forge's built-in), their
control models are wrapped for the pass (hidiffusion_lib.controlnet: the authors' recipe; a
T2I-Adapter's features fitted to the levels; an IP-Adapter's region mask to their tokens) and
unwrapped with the patch.

HIDIFFUSION_TRACE=<file> (for tests): every pass appends one JSON line with what each U-Net
forward did (``hidiffusion_lib.state.Forward``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import ClassVar

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.ui_components import InputAccordion

import hidiffusion_lib as hd
from hidiffusion_lib import controlnet as control
from hidiffusion_lib import hosts
from hidiffusion_lib import script_args as sa
from hidiffusion_lib.wrapping import marked

SECTION = ("hidiffusion", "HiDiffusion")
_FORGE_UI = importlib.util.find_spec("modules_forge") is not None  # Forge's own package, beside modules/


class _Run:
    """The live patch of the current pass, shared with the denoiser and model-load callbacks."""

    handle: hd.HiDiffusionHandle | None = None
    p = None
    hires = False  # read when patched: Forge clears p.is_hr_pass before the pass ends
    first_timestep: float | None = None
    controls: ClassVar[list] = []  # the control models wrapped for this pass

    @classmethod
    def end(cls, unet=None) -> None:
        for control_model in cls.controls:
            control.remove_control(control_model)
        cls.controls = []
        if cls.handle is not None:
            cls.handle.remove()
            _write_trace(cls.p, cls.hires, cls.handle)
            cls.handle = cls.p = cls.first_timestep = None
        if unet is not None:
            hd.remove(unet)


def _write_trace(p, hires: bool, handle: hd.HiDiffusionHandle) -> None:
    path = os.environ.get("HIDIFFUSION_TRACE")
    if not path or not handle.trace:  # Forge sets up a hires pass twice and runs only the second
        return
    record = {"sampler": getattr(p, "sampler_name", None), "hires": hires,
              "forwards": [forward._asdict() for forward in handle.trace]}
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def _unet(p):
    return hosts.host_of(p.sd_model).unet(p.sd_model)


def _refuse(unet, error: sa.ArgError) -> None:
    """Fail the generation with ``error`` at the first U-Net call: the webui swallows
    exceptions raised in script hooks, but one raised by the model reaches the API caller
    (as HTTP 422, see ArgError) and the UI, instead of a silently different image."""
    if unet is None:  # no module to call: the webui prints what a script hook raises
        raise error

    def hook(module, args):
        hd.remove(module)
        raise error

    unet.register_forward_pre_hook(marked(hook, None))


class HiDiffusionScript(scripts.Script):
    # Forge runs always-on scripts by this number: after its built-ins (ControlNet, Kohya HRFix,
    # MultiDiffusion ...) have patched the pass, so that what they did can be seen
    sorting_priority = 100

    def title(self):
        return "HiDiffusion"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        tab = "img2img" if is_img2img else "txt2img"
        components = {}
        with InputAccordion(False, label="HiDiffusion", elem_id=f"hidiffusion_{tab}") as enabled:
            components["enabled"] = enabled
            with gr.Row():
                for name in ("raunet", "mswmsa", "model"):
                    components[name] = _component(name, tab)
            with gr.Accordion("Advanced", open=False, elem_id=f"hidiffusion_{tab}_advanced"), gr.Row():
                for arg in sa.ARGS:
                    if arg.name not in components:
                        components[arg.name] = _component(arg.name, tab)
        ordered = [components[name] for name in sa.ARG_NAMES]
        # String names: the webui's Send-to copies only fields named in paste_field_names;
        # on_infotext_pasted (below) turns the infotext into these fields' values first.
        self.infotext_fields = [(component, arg.infotext) for component, arg in zip(ordered, sa.ARGS, strict=True)]
        self.paste_field_names = [arg.infotext for arg in sa.ARGS]
        return ordered

    def process(self, p, *args):
        unet = _unet(p)
        _Run.end(unet)
        p.hidiffusion_args = p.hidiffusion_refused = None
        # X/Y/Z cells are shallow copies sharing this dict: drop what an earlier cell wrote
        p.extra_generation_params = {
            key: value for key, value in p.extra_generation_params.items() if not key.startswith("HiDiffusion")
        }
        try:
            parsed = sa.parse(sa.merge_axis_values(args, getattr(p, "hidiffusion_xyz", {})))
        except sa.ArgError as error:
            p.hidiffusion_refused = error
            _refuse(unet, error)
            return
        if parsed.enabled:
            p.hidiffusion_args = parsed

    def process_before_every_sampling(self, p, *args, **kwargs):
        if getattr(p, "hidiffusion_refused", None) is not None:
            return
        parsed = getattr(p, "hidiffusion_args", None)
        unet = _unet(p)
        _Run.end(unet)
        if parsed is None or (getattr(p, "is_hr_pass", False) and not parsed.hires):
            return
        pass_name = "hires fix pass" if getattr(p, "is_hr_pass", False) else "first pass"
        if _is_refiner(p, p.sd_model):
            _note_refiner(p)
            return
        settings = parsed.settings()  # shifts by step alone: image k of a batch == its seed alone
        host = hosts.host_of(p.sd_model)
        family = host.family(p.sd_model)
        if family in sa.FAMILIES:
            _, side, arch = sa.FAMILIES[family]
            settings.arch = settings.arch or arch
            settings.native_size = side // 8  # the model's, whatever the preset (SD 2.x 768-v: 96)
        aside = host.step_aside(p, shared.opts)
        if aside.whole is not None:
            _skip(p, parsed, f"{pass_name}: {aside.whole}")
            return
        for part, reason in (("raunet", aside.raunet), ("mswmsa", aside.mswmsa)):
            if reason is not None and getattr(settings, part):
                setattr(settings, part, False)
                label = sa.ARGS[sa.ARG_NAMES.index(part)].label
                p.extra_generation_params[f"HiDiffusion {label}"] = reason
                print(f"HiDiffusion: {label} steps aside in the {pass_name}: {reason}")
        units = host.control_units(p)
        # the authors' ControlNet ratios are for text-to-image: not img2img, not the hires pass
        text_to_image = pass_name == "first pass" and not hasattr(p, "init_images")
        # (adapters are not ControlNets: the recipe and its ratios leave them out)
        settings.controlnet = any(u.controlnet for u in units) and parsed.controlnet_recipe and text_to_image
        try:
            handle = hd.apply(unet, settings)  # refuses before patching anything
        except hd.UnsupportedUNet as error:
            name = sa.unsupported_name(error, family, unet)
            if parsed.model == "Auto":  # e.g. the checkbox stayed ticked after a switch to SD3
                _skip(p, parsed, sa.unsupported_note(pass_name, name))
            else:  # the user asked for a block map this model does not have
                _refuse(unet, sa.ArgError(sa.unsupported_message(error, parsed.model, name)))
            return
        except ValueError as error:
            _refuse(unet, sa.ArgError(sa.unsupported_message(error, parsed.model, "")))
            return
        latent = kwargs.get("x")
        h, w = latent.shape[-2:] if latent is not None else (p.height // 8, p.width // 8)
        if handle.gated_at(h, w):
            handle.remove()
            _skip(p, parsed, sa.skipped_note(pass_name, 8 * w, 8 * h, family if family in sa.FAMILIES else handle.arch))
            return
        _Run.handle, _Run.p, _Run.hires = handle, p, bool(getattr(p, "is_hr_pass", False))
        p.extra_generation_params.update(sa.infotext(parsed, handle.schedule_for(h, w)))
        if units:
            _install_controls(p, handle, units, parsed.controlnet_recipe, pass_name, h, w)

    def postprocess(self, p, processed, *args):
        _Run.end(_unet(p))


def _component(name: str, tab: str):
    arg = sa.ARGS[sa.ARG_NAMES.index(name)]
    value = shared.opts.data.get(f"hidiffusion_default_{name}", arg.default) if arg.in_settings else arg.default
    elem_id = f"hidiffusion_{tab}_{name}"
    if arg.kind == "bool":
        component = gr.Checkbox(value=value, label=arg.label, elem_id=elem_id)
    elif arg.kind == "int":
        component = gr.Radio(choices=list(arg.ui_choices()), value=value, label=arg.label, elem_id=elem_id)
    else:
        # a ratio also takes a typed or pasted value (e.g. 0.45), which process() parses as the API's
        component = gr.Dropdown(choices=list(arg.ui_choices()), value=value, label=arg.label, elem_id=elem_id,
                                allow_custom_value=arg.kind == "ratio")
    if arg.in_settings:
        # ui-config.json would pin the first launch's value over the Settings default forever
        component.do_not_save_to_config = True
    return component


def _is_refiner(p, sd_model) -> bool:
    """Whether ``sd_model`` is this generation's refiner (the webui switches to it mid-pass)."""
    refiner = getattr(p, "refiner_checkpoint_info", None)
    return refiner is not None and getattr(sd_model, "sd_checkpoint_info", None) == refiner


def _note_refiner(p) -> None:
    if p.extra_generation_params.get(sa.REFINER_KEY) != sa.REFINER_NOTE:
        print(f"HiDiffusion: {sa.REFINER_NOTE} (HiDiffusion applies to the base model)")
    p.extra_generation_params[sa.REFINER_KEY] = sa.REFINER_NOTE


def _skip(p, parsed: sa.ScriptArgs, note: str) -> None:
    """A pass that runs unchanged: say why in the infotext and the console."""
    _add_note(p, sa.SKIPPED_KEY, note)
    for key, value in sa.infotext(parsed).items():  # what was asked, so that paste restores it
        p.extra_generation_params.setdefault(key, value)
    print(f"HiDiffusion: {note}")


def _add_note(p, key: str, note: str) -> None:
    """Put ``note`` under ``key`` in the infotext; a second pass's different note is appended."""
    previous = p.extra_generation_params.get(key)
    p.extra_generation_params[key] = note if previous in (None, note) else f"{previous}; {note}"


def _install_controls(p, handle: hd.HiDiffusionHandle, units: list[hosts.ControlUnit], recipe: bool, pass_name: str,
                      h: int, w: int) -> None:
    controls = [unit for unit in units if unit.controlnet]
    adapters = [unit for unit in units if unit.adapter]
    masked = [unit for unit in units if unit.region_mask]
    # the authors' 60% share, unless the user moved the unit's Ending Control Step off 1.0
    shares = [recipe and unit.end >= 1.0 for unit in controls]
    for unit, share in zip(controls, shares, strict=True):
        control.install_control(unit.model, handle, recipe=recipe, share=hd.CONTROL_SHARE if share else None)
        _Run.controls.append(unit.model)
    for unit in adapters:
        control.install_adapter(unit.model, handle, unit.lands)
        _Run.controls.append(unit.model)
    for unit in masked:
        control.install_region_mask(unit.model, handle)
        _Run.controls.append(unit.model)
    notes = []
    if controls:
        size = control.control_latent_size(h, w, handle.native_latent) if recipe else None
        notes.append(sa.controlnet_note(len(controls), recipe, size, shares))
    if adapters:
        notes.append(sa.adapter_note(len(adapters)))
    if masked:
        notes.append(sa.region_mask_note(len(masked)))
    note = f"{pass_name}: {'; '.join(notes)}"
    _add_note(p, sa.CONTROLNET_KEY, note)
    print(f"HiDiffusion ControlNet: {note}")


def on_cfg_denoiser(params) -> None:
    handle = _Run.handle
    if handle is None or not handle.active:
        return
    denoiser = params.denoiser
    steps = int(denoiser.steps or params.total_sampling_steps)
    funcname = getattr(getattr(_Run.p, "sampler", None), "funcname", None)
    if funcname == "sample_dpm_adaptive":
        handle.set_step(_adaptive_step(denoiser, params.sigma, steps), steps)
        return
    if funcname == "sample_heunpp2":  # Forge: up to 3 calls a step, counted by the host as one
        handle.set_step(hd.step_of_calls(int(denoiser.step), hd.heunpp2_calls(steps)), steps)
        return
    total = int(denoiser.total_steps or steps)
    handle.set_step(hd.step_of_call(int(denoiser.step), steps, total), steps)


def _adaptive_step(denoiser, sigma, steps: int) -> int:
    """DPM adaptive chooses its own calls: read its progress from the noise level, as the
    webui's refiner switch does (sd_samplers_common.apply_refiner), relative to the pass's
    first call, and count it in the pass's steps."""
    sigmas = denoiser.inner_model.sigmas
    timestep = float((sigmas.to(sigma.device) - sigma.max()).abs().argmin())
    if _Run.first_timestep is None:
        _Run.first_timestep = timestep
    start = _Run.first_timestep
    return hd.step_of_progress((start - timestep) / (start + 1), steps)


def on_model_loaded(sd_model) -> None:
    p = _Run.p
    _Run.end()
    if p is not None and _is_refiner(p, sd_model):
        _note_refiner(p)
    unet = hosts.host_of(sd_model).unet(sd_model)
    if unet is not None:
        hd.remove(unet)


def on_infotext_pasted(infotext: str, params: dict) -> None:
    sa.normalize_pasted(params)


def on_ui_settings() -> None:
    for arg in sa.ARGS:
        if not arg.in_settings:
            continue
        if arg.kind == "bool":
            component, component_args = gr.Checkbox, None
        else:
            component, component_args = gr.Dropdown, {"choices": list(arg.choices)}
        label = f"Default: {arg.label}"
        if _FORGE_UI:  # Forge's Settings page shows no comment_after: the label says it
            label += " (requires Reload UI)"
        option = shared.OptionInfo(arg.default, label, component, component_args, section=SECTION)
        shared.opts.add_option(f"hidiffusion_default_{arg.name}", option.info(arg.hint).needs_reload_ui())


def add_xyz_axes() -> bool:
    """Add the X/Y/Z plot axes once; False while the X/Y/Z script is not loaded yet."""
    # scripts/xyz_grid.py in A1111 and Forge; Forge Neo moved it to extensions-builtin/xyz
    xyz = next((s.module for s in scripts.scripts_data
                if hasattr(s.module, "AxisOption") and hasattr(s.module, "axis_options")), None)
    if xyz is None:
        return False
    known = {option.label for option in xyz.axis_options}
    for axis in sa.AXES:
        if axis.label in known:
            continue
        xyz.axis_options.append(
            xyz.AxisOption(
                axis.label,
                float if axis.kind == "float" else str,
                _xyz_apply(axis),
                choices=(lambda axis=axis: list(axis.choices)) if axis.choices else None,
                confirm=_xyz_confirm(axis),
            )
        )
    return True


def _xyz_apply(axis: sa.Axis):
    def apply(p, value, values):
        # a new dict per cell: p is a shallow copy shared with the other cells
        p.hidiffusion_xyz = {**getattr(p, "hidiffusion_xyz", {}), **axis.updates(value)}

    return apply


def _xyz_confirm(axis: sa.Axis):
    def confirm(p, values):
        for value in values:
            axis.updates(value)

    return confirm


script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
script_callbacks.on_model_loaded(on_model_loaded)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_infotext_pasted(on_infotext_pasted)
if not add_xyz_axes():
    script_callbacks.on_before_ui(add_xyz_axes)
