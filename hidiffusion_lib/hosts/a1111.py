"""The AUTOMATIC1111 webui (v1.10): ldm/sgm U-Nets, sd-webui-controlnet, built-in Hypertile."""

from __future__ import annotations

from torch import nn

from .base import ControlUnit, StepAside, family_of


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
        after its ``process`` (scripts/controlnet.py, scripts/hook.py UnetHook, v1.1.455)."""
        for script in getattr(getattr(p, "scripts", None), "alwayson_scripts", None) or []:
            params = getattr(getattr(script, "latest_network", None), "control_params", None)
            if params:
                return [ControlUnit(param.control_model, float(getattr(param, "stop_guidance_percent", 1.0)))
                        for param in params
                        if getattr(getattr(param, "control_model_type", None), "is_controlnet", False)
                        and callable(getattr(param, "control_model", None))]
        return []

    def step_aside(self, p: object, opts: object) -> StepAside:
        """Hypertile (built in, extensions-builtin/hypertile) tiles the same self-attentions as
        MSW-MSA when its U-Net option is on for this pass."""
        hires = getattr(p, "is_hr_pass", False)
        on = getattr(opts, "hypertile_enable_unet", False) or (
            hires and getattr(opts, "hypertile_enable_unet_secondpass", False))
        return StepAside(mswmsa="off: Hypertile U-Net is on" if on else None)
