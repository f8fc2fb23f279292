"""Forge 2 (lllyasviel/stable-diffusion-webui-forge main; Forge Neo keeps the same U-Net):
``backend/`` U-Nets behind a per-generation ``UnetPatcher``, ControlNet built in.

Read from Forge dfdcbab6: ``p.sd_model.forge_objects.unet`` is the generation's clone of the
``UnetPatcher`` (backend/patcher/unet.py), ``.model.diffusion_model`` the
``IntegratedUNet2DConditionModel`` (backend/nn/unet.py) that every clone shares, and
``.controlnet_linked_list`` the ControlNets of this generation, newest first, each a
``backend.patcher.controlnet.ControlNet`` with its ``control_model`` and
``timestep_percent_range``. Other built-ins patch the clone's ``model_options``.
"""

from __future__ import annotations

from torch import nn

from .base import ControlUnit, StepAside, family_of

# What the built-ins leave in model_options (backend/patcher/base.py) that HiDiffusion must not
# stack on, each with the note the user reads.
U_NET_WRAPPED = "off: another extension runs the U-Net through its own wrapper (MultiDiffusion's tiles)"
FEATURES_RESIZED = "off: another extension resizes the U-Net's features (Kohya HRFix's Deep Shrink)"
ATTENTION_REPLACED = "off: another extension replaces the self-attention of the top blocks (StyleAlign)"


def _patcher(sd_model: object) -> object | None:
    return getattr(getattr(sd_model, "forge_objects", None), "unet", None)


class Forge:
    name = "Forge"

    def owns(self, sd_model: object) -> bool:
        return _patcher(sd_model) is not None

    def unet(self, sd_model: object) -> nn.Module | None:
        return getattr(getattr(_patcher(sd_model), "model", None), "diffusion_model", None)

    def family(self, sd_model: object) -> str | None:
        """The patcher's KModel predicts with ``predictor.prediction_type`` (backend/modules/
        k_model.py, k_prediction.py): "v_prediction" for SD 2.x 768-v, as backend/loader.py sets
        it from the checkpoint's YAML or huggingface_guess's SD20.model_type."""
        predictor = getattr(getattr(_patcher(sd_model), "model", None), "predictor", None)
        return family_of(sd_model, getattr(predictor, "prediction_type", None) == "v_prediction")

    def control_units(self, p: object) -> list[ControlUnit]:
        """ControlNets with a control model (T2I-Adapters have ``t2i_model``; a Control-LoRA
        builds its model only when sampling starts), oldest first, each model once."""
        units, seen = [], set()
        cnet = getattr(_patcher(p.sd_model), "controlnet_linked_list", None)
        while cnet is not None:
            model = getattr(cnet, "control_model", None)
            if isinstance(model, nn.Module) and id(model) not in seen:
                seen.add(id(model))
                end = getattr(cnet, "timestep_percent_range", (0.0, 1.0))[1]
                units.append(ControlUnit(model, float(end)))
            cnet = getattr(cnet, "previous_controlnet", None)
        return units[::-1]

    def step_aside(self, p: object, opts: object) -> StepAside:
        options = getattr(_patcher(p.sd_model), "model_options", None) or {}
        transformer = options.get("transformer_options", {})
        patches = transformer.get("patches", {})
        replaced = transformer.get("patches_replace", {}).get("attn1", {})
        return StepAside(
            whole=U_NET_WRAPPED if options.get("model_function_wrapper") is not None else None,
            raunet=FEATURES_RESIZED if patches.get("input_block_patch") or patches.get("input_block_patch_after_skip")
            else None,
            # the middle block's self-attention (SAG, PAG) is not one MSW-MSA windows
            mswmsa=ATTENTION_REPLACED if any(key[0] != "middle" for key in replaced) else None,
        )
