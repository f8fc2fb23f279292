"""The authors' package (hidiffusion 0.1.10) on diffusers twins of the small ldm U-Nets in unets.py.

A twin is a diffusers ``UNet2DConditionModel`` carrying the ldm weights converted by diffusers'
own checkpoint converter. :class:`ReferenceRun` drives the reference through one sampling pass
with its hidden inputs pinned: the ratios (its preset table is patched, because its presets
switch only at 2048/4096 px, too large for this machine), the aggressive flag and the window
shift of every windowed block (its ``torch.rand(1)`` draws are replaced).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from unittest import mock

import hidiffusion.hidiffusion as hd
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from unets import make_unet, unet_config

# The name makes the reference pick its block map; the twins' module names are not the real ones.
REFERENCE_NAMES = {
    "sd1": "runwayml/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1-base",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sdxl_turbo": "stabilityai/sdxl-turbo",
}
LAYOUT = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sdxl_turbo": "sdxl"}
WINDOWED = {"sd1": 5, "sd2": 5, "sdxl": 10, "sdxl_turbo": 10}
# The preset the reference picks below 2048 px (SD) / 4096 px (SDXL), and that size in latents.
SMALL_PRESET = {
    "sd1": ("sd15_1024", 256), "sd2": ("sd15_1024", 256), "sdxl": ("sdxl_2048", 512),
    "sdxl_turbo": ("sdxl_turbo_1024", 1 << 30),
}
# A torch.rand(1) value that makes the reference pick window shift 0, 1, 2, 3.
SHIFT_DRAWS = (0.1, 0.3, 0.6, 0.9)
VANILLA_TOLERANCE = 1e-5
# What the reference and ReferenceRun leave in instance dicts (counters survive remove_hidiffusion).
REFERENCE_ATTRIBUTES = (
    "info", "model", "switching_threshold_ratio", "max_timestep", "timestep", "aggressive_raunet",
    "T1_ratio", "T1", "T1_start", "T1_end", "ori_stride", "ori_padding", "ori_dilation", "_num_timesteps",
    "name_or_path",
)


def diffusers_config(layout: str, channels: int = 32) -> dict:
    """``UNet2DConditionModel`` keyword arguments matching ``unets.unet_config(layout, channels)``."""
    cfg = unet_config(layout, channels)
    widths = [channels * m for m in cfg["channel_mult"]]
    with_attention = [2**level in cfg["attention_resolutions"] for level in range(len(widths))]
    context_dim = cfg["context_dim"]
    return dict(
        sample_size=cfg["image_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        block_out_channels=widths, layers_per_block=cfg["num_res_blocks"],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)],
        cross_attention_dim=context_dim[0] if isinstance(context_dim, list) else context_dim,
        # diffusers' "attention_head_dim" is the number of heads
        attention_head_dim=[w // cfg["num_head_channels"] for w in widths],
        use_linear_projection=cfg.get("use_linear_in_transformer", False),
        transformer_layers_per_block=cfg["transformer_depth"],
    )


def make_twin(ldm_unet: UNetModel, layout: str, channels: int = 32) -> UNet2DConditionModel:
    """A diffusers U-Net with ``ldm_unet``'s weights, converted as for a single-file checkpoint."""
    config = diffusers_config(layout, channels)
    checkpoint = {"model.diffusion_model." + k: v for k, v in ldm_unet.state_dict().items()}
    twin = UNet2DConditionModel(**config)
    twin.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    for module in twin.modules():
        clash = set(REFERENCE_ATTRIBUTES) & set(vars(module))
        assert not clash, f"{type(module).__name__} has {clash}: resetting the reference would break it"
    return twin.eval()


def run_ldm(unet: UNetModel, x: torch.Tensor, t: torch.Tensor, context) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, timesteps=t, context=context)


def run_diffusers(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, context) -> torch.Tensor:
    """``context`` as for ldm: the SDXL layout's per-level list holds the same tensor twice."""
    if isinstance(context, list):
        context = context[0]
    with torch.no_grad():
        # The sample goes positionally: the reference's size hook reads args[0].
        return unet(x, t, encoder_hidden_states=context).sample


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``."""
    return ((a - b).abs().max() / b.abs().max()).item()


def make_pair(layout: str, x: torch.Tensor, t: torch.Tensor, context, seed: int = 0,
              channels: int = 32) -> tuple[UNetModel, UNet2DConditionModel]:
    """An ldm U-Net and its diffusers twin; asserts they agree on ``(x, t, context)`` unpatched."""
    ldm_unet = make_unet(layout, seed, channels)
    twin = make_twin(ldm_unet, layout, channels)
    diff = max_diff(run_ldm(ldm_unet, x, t, context), run_diffusers(twin, x, t, context))
    assert diff <= VANILLA_TOLERANCE, f"{layout}: vanilla ldm and diffusers U-Nets differ by {diff:.2e}"
    return ldm_unet, twin


class _QueuedRand:
    """Stands in for ``torch`` inside the reference module: ``rand`` returns queued values."""

    def __init__(self, values: Iterator[float]) -> None:
        self._values = values

    def rand(self, *size, **kwargs) -> torch.Tensor:
        value = next(self._values, None)
        assert value is not None, "the reference windowed more blocks than expected"
        return torch.tensor([value])

    def __getattr__(self, name: str):
        return getattr(torch, name)


def reset_reference(unet: UNet2DConditionModel) -> None:
    """Take the reference off ``unet`` completely, its leftover counters and flags too."""
    hd.remove_hidiffusion(unet)
    for module in unet.modules():
        for name in REFERENCE_ATTRIBUTES:
            module.__dict__.pop(name, None)
    # apply_hidiffusion adds 12 on every call and removal never subtracts it
    unet.num_upsamplers = sum(block.upsamplers is not None for block in unet.up_blocks)


class ReferenceRun:
    """The reference applied to a twin for one ``steps``-step sampling pass.

    arch: the authors' model family (picks their block map), one of REFERENCE_NAMES.
    Its per-module call counters are the step, so call it exactly once per step, in order.
    t1, t2: the ratios it uses; aggressive: its SDXL split schedule (read for "sdxl" only).
    """

    def __init__(self, unet: UNet2DConditionModel, arch: str, steps: int, *, raunet: bool = True,
                 mswmsa: bool = True, t1: float = 0.4, t2: float = 0.0, aggressive: bool = False) -> None:
        self.unet, self.arch, self.steps = unet, arch, steps
        self.ratios = {"T1_ratio": t1, "T2_ratio": t2}
        self.aggressive = aggressive
        self.windowed = WINDOWED[arch] if mswmsa else 0
        self.step = 0
        reset_reference(unet)
        unet.name_or_path = REFERENCE_NAMES[arch]
        unet._num_timesteps = steps  # read as info["pipeline"]._num_timesteps; the pipeline is the U-Net
        hd.apply_hidiffusion(unet, apply_raunet=raunet, apply_window_attn=mswmsa)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context, shifts: Sequence[int] = ()) -> torch.Tensor:
        """The next step. shifts: the window shift (0..3) of each windowed block, in call order."""
        assert self.step < self.steps, "the reference's counters would wrap around into a new pass"
        preset, side = SMALL_PRESET[self.arch]
        assert min(x.shape[-2:]) < side, f"the reference would leave preset {preset} at this size"
        assert len(shifts) == self.windowed, f"{self.windowed} windowed blocks need as many shifts"
        draws = iter([SHIFT_DRAWS[k] for k in shifts])
        with ExitStack() as stack:
            stack.enter_context(mock.patch.dict(hd.switching_threshold_ratio_dict, {preset: self.ratios}))
            stack.enter_context(mock.patch.object(hd, "is_aggressive_raunet", self.aggressive))
            stack.enter_context(mock.patch.object(hd, "torch", _QueuedRand(draws)))
            out = run_diffusers(self.unet, x, t, context)
        assert next(draws, None) is None, "the reference windowed fewer blocks than expected"
        self.step += 1
        return out

    def close(self) -> None:
        reset_reference(self.unet)

    def __enter__(self) -> ReferenceRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
