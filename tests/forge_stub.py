"""Stand-ins of the Forge objects that hidiffusion_lib.hosts.forge reads, to keep CI fast (the
real Forge runs in tests/e2e/test_forge_e2e.py). Each mirrors Forge main dfdcbab6:

- ``Patcher``: ``backend/patcher/unet.py`` ``UnetPatcher`` (``model.diffusion_model`` and
  ``model.predictor.prediction_type`` of its ``backend/modules/k_model.py`` KModel,
  ``controlnet_linked_list``, ``add_patched_controlnet``) with the ``model_options`` setters of
  ``backend/patcher/base.py`` that the built-ins call (``set_model_input_block_patch[_after_skip]``,
  ``set_model_output_block_patch``, ``set_model_unet_function_wrapper``,
  ``set_model_attn1_replace``, ``set_model_replace_all``).
- ``ControlNet``: ``backend/patcher/controlnet.py`` (``control_model``,
  ``timestep_percent_range``, ``previous_controlnet``); ``T2IAdapter`` keeps ``t2i_model``.
- ``apply_control``: ``backend/nn/unet.py``'s, which drops a residual of another size.
- ``sd_model``: ``backend/diffusion_engine/base.py``'s ``ForgeDiffusionEngine`` as a script sees
  it: ``forge_objects.unet`` and the ``is_sd1`` / ``is_sd2`` / ``is_sdxl`` / ``is_sd3`` flags, no
  ``.model``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def apply_control(h: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    try:
        return h + control if h.shape == control.shape else _mismatch(h, control)
    except RuntimeError:
        return _mismatch(h, control)


def _mismatch(h: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    print("warning control could not be applied", h.shape, control.shape)
    return h


class Patcher:
    def __init__(self, unet: torch.nn.Module, prediction_type: str = "epsilon") -> None:
        # backend/modules/k_prediction.py: "v_prediction" for SD 2.x 768-v (backend/loader.py)
        self.model = SimpleNamespace(diffusion_model=unet, predictor=SimpleNamespace(prediction_type=prediction_type))
        self.model_options = {"transformer_options": {}}
        self.controlnet_linked_list = None

    def add_patched_controlnet(self, cnet) -> None:
        cnet.previous_controlnet = self.controlnet_linked_list
        self.controlnet_linked_list = cnet

    def _patch(self, name: str, patch) -> None:
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {}).setdefault(name, []).append(patch)

    def set_model_input_block_patch(self, patch) -> None:
        self._patch("input_block_patch", patch)

    def set_model_input_block_patch_after_skip(self, patch) -> None:
        self._patch("input_block_patch_after_skip", patch)

    def set_model_output_block_patch(self, patch) -> None:
        self._patch("output_block_patch", patch)

    def set_model_unet_function_wrapper(self, wrapper) -> None:
        self.model_options["model_function_wrapper"] = wrapper

    def set_model_attn1_replace(self, patch, block_name: str, number: int,
                                transformer_index: int | None = None) -> None:
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to = self.model_options["transformer_options"]
        to.setdefault("patches_replace", {}).setdefault("attn1", {})[key] = patch

    def set_model_replace_all(self, patch, target: str = "attn1") -> None:
        for block_name in ("input", "middle", "output"):
            for number in range(16):
                for transformer_index in range(16):
                    self.set_model_attn1_replace(patch, block_name, number, transformer_index)


class ControlNet:
    def __init__(self, control_model: torch.nn.Module, hint: torch.Tensor, start: float = 0.0,
                 end: float = 1.0) -> None:
        self.control_model, self.cond_hint = control_model, hint
        self.timestep_percent_range = (start, end)
        self.previous_controlnet = None

    def get_control(self, x: torch.Tensor, t: torch.Tensor, context) -> list:
        """The residuals of this and the earlier ControlNets, summed (control_merge)."""
        out = self.control_model(x=x, hint=self.cond_hint, timesteps=t, context=context)
        previous = self.previous_controlnet.get_control(x, t, context) if self.previous_controlnet else None
        return out if previous is None else [a + b for a, b in zip(out, previous, strict=True)]


class T2IAdapter:
    """Its features go to the input side (``control_input``), which the stand-in U-Net loop leaves out."""

    def __init__(self, t2i_model: torch.nn.Module) -> None:
        self.t2i_model = t2i_model
        self.previous_controlnet = None

    def get_control(self, x: torch.Tensor, t: torch.Tensor, context) -> list | None:
        return self.previous_controlnet.get_control(x, t, context) if self.previous_controlnet else None


def sd_model(patcher: Patcher, arch: str = "sd1") -> SimpleNamespace:
    return SimpleNamespace(forge_objects=SimpleNamespace(unet=patcher), is_sd1=arch == "sd1",
                           is_sd2=arch == "sd2", is_sdxl=arch == "sdxl", is_sd3=arch == "sd3")
