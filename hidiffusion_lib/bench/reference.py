"""The authors' package (hidiffusion 0.1.10) on a diffusers twin of an ldm U-Net.

A twin is a diffusers ``UNet2DConditionModel`` carrying the ldm U-Net's weights, converted by
diffusers' own single-file checkpoint converter (the tensors are shared, not copied).
:class:`ReferenceRun` drives the reference through one sampling pass with its hidden inputs
pinned: the ratios (its preset table is patched), the aggressive flag and the window shift of
every windowed block (its ``torch.rand(1)`` draws are replaced).

diffusers and hidiffusion are imported when first needed; without them a clear ImportError says
what to install.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from types import ModuleType
from unittest import mock

import torch
from torch import nn

# The name makes the reference pick its block map; the twins' module names are not the real ones.
REFERENCE_NAMES = {
    "sd1": "runwayml/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sdxl_turbo": "stabilityai/sdxl-turbo",
}
WINDOWED = {"sd1": 5, "sd2": 5, "sdxl": 10, "sdxl_turbo": 10}
# A torch.rand(1) value that makes the reference pick window shift 0, 1, 2, 3.
SHIFT_DRAWS = (0.1, 0.3, 0.6, 0.9)
# What the reference and ReferenceRun leave in instance dicts (counters survive remove_hidiffusion).
REFERENCE_ATTRIBUTES = (
    "info", "model", "switching_threshold_ratio", "max_timestep", "timestep", "aggressive_raunet",
    "T1_ratio", "T1", "T1_start", "T1_end", "ori_stride", "ori_padding", "ori_dilation", "_num_timesteps",
    "name_or_path",
)
INSTALL_HINT = (
    "the authors' package is needed: pip install --no-deps hidiffusion==0.1.10 and "
    "pip install diffusers==0.40.0 (see requirements-test.txt)"
)


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error


def reference_module() -> ModuleType:
    """The authors' ``hidiffusion.hidiffusion`` module."""
    return _import("hidiffusion.hidiffusion")


def diffusers_config(unet: nn.Module) -> dict:
    """``UNet2DConditionModel`` keyword arguments for the architecture of an ldm ``UNetModel``,
    read from its module tree (widths, heads, transformer depth and projection per level)."""
    widths = [unet.model_channels * m for m in unet.channel_mult]
    transformers: dict[int, nn.Module] = {}
    level = 0
    for block in unet.input_blocks[1:]:
        kinds = {type(child).__name__: child for child in block}
        if "Downsample" in kinds:
            level += 1
        elif "SpatialTransformer" in kinds:
            transformers.setdefault(level, kinds["SpatialTransformer"])
    first = next(iter(transformers.values()))
    # diffusers' middle block takes the last level's heads and depth, with attention there or not
    middle = next(child for child in unet.middle_block if type(child).__name__ == "SpatialTransformer")
    heads = [transformers.get(i, middle).transformer_blocks[0].attn1.heads for i in range(len(widths))]
    depths = [len(transformers.get(i, middle).transformer_blocks) for i in range(len(widths))]
    with_attention = [i in transformers for i in range(len(widths))]
    return dict(
        sample_size=unet.image_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
        block_out_channels=widths, layers_per_block=unet.num_res_blocks[0],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)],
        cross_attention_dim=first.transformer_blocks[0].attn2.to_k.in_features,
        attention_head_dim=heads,  # diffusers' "attention_head_dim" is the number of heads
        use_linear_projection=bool(first.use_linear),
        transformer_layers_per_block=depths,
    )


def make_twin(ldm_unet: nn.Module) -> nn.Module:
    """A diffusers U-Net sharing ``ldm_unet``'s weights (converted as for a single-file checkpoint)."""
    diffusers = _import("diffusers")
    convert = _import("diffusers.loaders.single_file_utils").convert_ldm_unet_checkpoint
    config = diffusers_config(ldm_unet)
    checkpoint = {"model.diffusion_model." + k: v for k, v in ldm_unet.state_dict().items()}
    with torch.device("meta"):
        twin = diffusers.UNet2DConditionModel(**config)
    twin.load_state_dict(convert(checkpoint, config), strict=True, assign=True)
    for module in twin.modules():
        clash = set(REFERENCE_ATTRIBUTES) & set(vars(module))
        if clash:
            raise RuntimeError(f"{type(module).__name__} has {clash}: resetting the reference would break it")
    return twin.eval().requires_grad_(False)


def run_diffusers(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context, **unet_kwargs) -> torch.Tensor:
    """One call of a diffusers U-Net; ``context`` as for ldm (a list holds the same tensor per
    depth); ``unet_kwargs`` go to its forward (e.g. ControlNet residuals)."""
    if isinstance(context, list):
        context = context[0]
    with torch.no_grad():
        # The sample goes positionally: the reference's size hook reads args[0].
        return unet(x, t, encoder_hidden_states=context, **unet_kwargs).sample


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def reference_preset(arch: str, latent_h: int, latent_w: int) -> str:
    """The preset the reference picks at this latent size (it switches when either side is small)."""
    if arch in ("sd1", "sd2"):
        return "sd15_1024" if min(latent_h, latent_w) < 256 else "sd15_2048"
    if arch == "sdxl_turbo":
        return "sdxl_turbo_1024"
    return "sdxl_2048" if min(latent_h, latent_w) < 512 else "sdxl_4096"


class _QueuedRand:
    """Stands in for ``torch`` inside the reference module: ``rand`` returns queued values."""

    def __init__(self, values: Iterator[float]) -> None:
        self._values = values

    def rand(self, *size, **kwargs) -> torch.Tensor:
        value = next(self._values, None)
        if value is None:
            raise RuntimeError("the reference windowed more blocks than expected")
        return torch.tensor([value])

    def __getattr__(self, name: str):
        return getattr(torch, name)


def reset_reference(unet: nn.Module) -> None:
    """Take the reference off ``unet`` completely, its leftover counters and flags too."""
    reference_module().remove_hidiffusion(unet)
    for module in unet.modules():
        for name in REFERENCE_ATTRIBUTES:
            module.__dict__.pop(name, None)
    # apply_hidiffusion adds 12 on every call and removal never subtracts it
    unet.num_upsamplers = sum(block.upsamplers is not None for block in unet.up_blocks)


class ReferenceRun:
    """The reference applied to a twin for one ``steps``-step sampling pass.

    unet: a twin from :func:`make_twin`. arch: the authors' model family (picks their block
    map), one of REFERENCE_NAMES. Its per-module call counters are the step, so call it exactly
    once per step, in order. raunet, mswmsa: the reference's two switches. t1, t2: the ratios it
    uses, whatever the size; aggressive: its SDXL split schedule (read for "sdxl" only).
    controlnet: the U-Net as the reference's SDXL ControlNet pipeline makes it (its forward
    resizes ControlNet residuals bicubic to the skips; text-to-image ControlNet ratios, which
    replace t1 and t2, as the pipeline does without an init image).
    """

    def __init__(self, unet: nn.Module, arch: str, steps: int, *, raunet: bool = True,
                 mswmsa: bool = True, t1: float = 0.4, t2: float = 0.0, aggressive: bool = False,
                 controlnet: bool = False) -> None:
        self.hd = reference_module()
        self.unet, self.arch, self.steps = unet, arch, steps
        self.ratios = {"T1_ratio": t1, "T2_ratio": t2}
        self.aggressive = aggressive
        self.windowed = WINDOWED[arch] if mswmsa else 0
        self.step = 0
        reset_reference(unet)
        unet.name_or_path = REFERENCE_NAMES[arch]
        unet._num_timesteps = steps  # read as info["pipeline"]._num_timesteps; the pipeline is the U-Net
        self.hd.apply_hidiffusion(unet, apply_raunet=raunet, apply_window_attn=mswmsa)
        if controlnet:
            # what apply_hidiffusion does to a ControlNet pipeline's U-Net; undone by remove_hidiffusion
            unet.__class__ = self.hd.make_diffusers_unet_2d_condition(unet.__class__)
            unet.info["text_to_img_controlnet"] = True

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context, shifts: Sequence[int] = (),
                 **unet_kwargs) -> torch.Tensor:
        """The next step. shifts: the window shift (0..3) of each windowed block, in call order;
        unet_kwargs: more arguments of the U-Net's forward (ControlNet residuals)."""
        if self.step >= self.steps:
            raise RuntimeError("the reference's counters would wrap around into a new pass")
        if len(shifts) != self.windowed:
            raise ValueError(f"{self.windowed} windowed blocks need as many shifts, got {len(shifts)}")
        preset = reference_preset(self.arch, *x.shape[-2:])
        draws = iter([SHIFT_DRAWS[k] for k in shifts])
        hd = self.hd
        with ExitStack() as stack:
            stack.enter_context(mock.patch.dict(hd.switching_threshold_ratio_dict, {preset: self.ratios}))
            stack.enter_context(mock.patch.object(hd, "is_aggressive_raunet", self.aggressive))
            stack.enter_context(mock.patch.object(hd, "torch", _QueuedRand(draws)))
            out = run_diffusers(self.unet, x, t, context, **unet_kwargs)
        if next(draws, None) is not None:
            raise RuntimeError("the reference windowed fewer blocks than expected")
        self.step += 1
        return out

    def close(self) -> None:
        reset_reference(self.unet)

    def __enter__(self) -> ReferenceRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
