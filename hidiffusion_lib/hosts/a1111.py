"""The AUTOMATIC1111 webui (v1.10): ldm/sgm U-Nets, sd-webui-controlnet, built-in Hypertile,
multidiffusion-upscaler's Tiled Diffusion."""

from __future__ import annotations

from torch import nn

from .base import ControlUnit, StepAside, family_of

# multidiffusion-upscaler-for-automatic1111 (scripts/tilediffusion.py): its sampler runs the U-Net
# on tiles near the training size, the duplication RAU-Net exists to avoid at full size.
TILED_DIFFUSION = "Tiled Diffusion"
# sd-webui-controlnet v1.1.455 (scripts/hook.py, its U-Net forward) adds a T2I-Adapter's four
# features to the outputs of these input blocks (``t2i_injection``); SDXL's fourth to the middle block's
T2I_LANDS = (2, 5, 8, 11)
T2I_LANDS_SDXL = (3, 5, 8, -1)
TILES = ("off: Tiled Diffusion is on; its U-Net calls are tiles near the training size, so HiDiffusion "
         "leaves the pass to it")


def _enabled_script(p: object, title: str) -> bool:
    """Whether the always-on script ``title`` is on for ``p``: its first argument, its enable
    checkbox (modules/scripts.py keeps each script's slice of ``p.script_args`` from args_from)."""
    args = getattr(p, "script_args", None) or ()
    for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []:
        if script.title() == title:
            start = getattr(script, "args_from", None)
            return start is not None and start < len(args) and bool(args[start])
    return False


class A1111:
    name = "A1111"

    def owns(self, sd_model: object) -> bool:
        return True  # the fallback: checked last

    def unet(self, sd_model: object) -> nn.Module | None:
        return getattr(getattr(sd_model, "model", None), "diffusion_model", None)

    def family(self, sd_model: object) -> str | None:
        """ldm's LatentDiffusion keeps its config's ``parameterization``: "v" for SD 2.x 768-v
        (configs v2-inference-v.yaml, which modules/sd_models_config.py picks for a v model)."""
        return family_of(sd_model, getattr(sd_model, "parameterization", "eps") == "v")

    def control_units(self, p: object) -> list[ControlUnit]:
        """sd-webui-controlnet keeps its units on its Script's ``latest_network.control_params``
        after its ``process`` (scripts/controlnet.py, scripts/hook.py UnetHook, v1.1.455): its
        ControlNets, its T2I-Adapters (``ControlModelType.T2I_Adapter``) and its IP-Adapters
        with a region mask (``effective_region_mask``, which their cross-attention patch
        applies); not the style adapter, whose tokens go to the prompt, nor an IP-Adapter
        without a mask."""
        # the hook takes SDXL's injection points from the model's flag (and a y it passes)
        lands = T2I_LANDS_SDXL if getattr(getattr(p, "sd_model", None), "is_sdxl", False) else T2I_LANDS
        for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []:
            params = getattr(getattr(script, "latest_network", None), "control_params", None)
            if params:
                units = []
                for param in params:
                    kind = getattr(param, "control_model_type", None)
                    if not callable(getattr(param, "control_model", None)):
                        continue
                    end, name = float(getattr(param, "stop_guidance_percent", 1.0)), getattr(kind, "name", None)
                    if getattr(kind, "is_controlnet", False):
                        units.append(ControlUnit(param.control_model, end))
                    elif name == "T2I_Adapter":
                        units.append(ControlUnit(param.control_model, end, lands))
                    elif name == "IPAdapter" and getattr(param, "effective_region_mask", None) is not None:
                        units.append(ControlUnit(param.control_model, end, region_mask=True))
                return units
        return []

    def step_aside(self, p: object, opts: object) -> StepAside:
        """Hypertile (built in, extensions-builtin/hypertile) tiles the same self-attentions as
        MSW-MSA when its U-Net option is on for this pass; Tiled Diffusion takes the whole pass."""
        if _enabled_script(p, TILED_DIFFUSION):
            return StepAside(whole=TILES)
        hires = getattr(p, "is_hr_pass", False)
        on = getattr(opts, "hypertile_enable_unet", False) or (
            hires and getattr(opts, "hypertile_enable_unet_secondpass", False))
        return StepAside(mswmsa="off: Hypertile U-Net is on" if on else None)
