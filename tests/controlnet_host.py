"""A stand-in of how sd-webui-controlnet drives the U-Net, to keep CI fast (the real extension
runs in tests/e2e/test_controlnet_e2e.py).

``controlled_forward`` mirrors the ``forward`` that sd-webui-controlnet v1.1.455
(scripts/hook.py, ``UnetHook.hook``) puts on the U-Net: it calls the control model first, by
keyword (x, hint, timesteps, context), then runs the U-Net's blocks itself and adds the
residuals with ``aligned_adding`` (nearest resize where sizes differ) to the skips on the way
up and to the middle block's output. ``adapter_forward`` is the same loop with a T2I-Adapter
unit: its features added (``aligned_adding``) to the outputs of the input blocks its
``t2i_injection`` names (SDXL's fourth to the middle block's). ``TinyIPAdapter`` and
``ip_masked_forward``: an IP-Adapter's region mask on every cross-attention. ``TinyControlNet``
has a ControlNet's interface and output (the benchmark's, hidiffusion_lib/bench/controlnet.py):
the encoder of a small random ldm U-Net fed latent + embedded control image, one residual per
input block plus the middle one.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from ldm.modules.diffusionmodules.util import timestep_embedding
from torch import nn
from unets import randomize, unet_config

from hidiffusion_lib.bench.controlnet import ControlNet


def aligned_adding(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if base.shape[-2:] != x.shape[-2:]:
        x = F.interpolate(x, size=base.shape[-2:], mode="nearest")
    return base + x


def controlled_forward(unet: nn.Module, control_model: nn.Module, x: torch.Tensor, t: torch.Tensor, context,
                       hint: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """One U-Net call with ControlNet's residuals, in sd-webui-controlnet's order."""
    with torch.no_grad():
        residuals = [r * weight for r in control_model(x=x, hint=hint, timesteps=t, context=context)]
    return forward_with_residuals(unet, x, t, context, residuals)


def forward_with_residuals(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context, residuals: list,
                           add=aligned_adding) -> torch.Tensor:
    """The U-Net part of that loop: ``residuals`` (one per input block, then the middle one)
    added by ``add(base, residual)`` to the skips on the way up and to the middle block's output."""
    residuals = list(residuals)
    with torch.no_grad():
        emb = unet.time_embed(timestep_embedding(t, unet.model_channels, repeat_only=False))
        hs, h = [], x
        for module in unet.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = unet.middle_block(h, emb, context)
        h = add(h, residuals.pop())
        for module in unet.output_blocks:
            h = torch.cat([h, add(hs.pop(), residuals.pop())], dim=1)
            h = module(h, emb, context)
        return unet.out(h.type(x.dtype))


class TinyControlNet(ControlNet):
    """The benchmark's ControlNet for a small ``layout`` U-Net, random weights; records every
    call's latent and control image sizes."""

    def __init__(self, layout: str, seed: int = 5) -> None:
        super().__init__(unet_config(layout))
        randomize(self, seed).eval()
        self.calls: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def forward(self, x, hint, timesteps, context, **kwargs):
        self.calls.append((tuple(x.shape[-2:]), tuple(hint.shape[-2:])))
        return super().forward(x, hint, timesteps, context)


def adapter_forward(unet: nn.Module, adapter: nn.Module, x: torch.Tensor, t: torch.Tensor, context,
                    hint: torch.Tensor, lands: tuple[int, ...]) -> torch.Tensor:
    """One U-Net call with a T2I-Adapter's features, in sd-webui-controlnet's order: the adapter
    called by keyword, then feature k added to the output of input block ``lands[k]`` (-1: of
    the middle block)."""
    with torch.no_grad():
        features = list(adapter(x=x, hint=hint, timesteps=t, context=context))
        emb = unet.time_embed(timestep_embedding(t, unet.model_channels, repeat_only=False))
        hs, h = [], x
        for i, module in enumerate(unet.input_blocks):
            h = module(h, emb, context)
            if i in lands:
                h = aligned_adding(h, features.pop(0))
            hs.append(h)
        h = unet.middle_block(h, emb, context)
        if -1 in lands:
            h = aligned_adding(h, features.pop(0))
        for module in unet.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return unet.out(h.type(x.dtype))


# scripts/hook.py ``t2i_injection``: the input blocks a T2I-Adapter's features are added to (-1: the middle block)
T2I_LANDS = {"sd1": (2, 5, 8, 11), "sdxl": (3, 5, 8, -1)}


class TinyAdapter(nn.Module):
    """A T2I-Adapter with sd-webui-controlnet's ``PlugableAdapter`` interface (scripts/adapter.py):
    ``forward(hint=None, x=None, ...)`` computes its features from the control image once,
    caches them and returns a deep copy at every call. The features are those of the
    extension's ``Adapter`` at the sizes and channels of a small ``layout`` U-Net's landing
    blocks (tests/unets.py, 32 channels): the image pixel-unshuffled to the latent grid (SDXL:
    half of it), then 1x1 convs, average pooling where the U-Net halves the size."""

    def __init__(self, layout: str, seed: int = 6) -> None:
        super().__init__()
        self.shuffle = 8 if layout == "sd1" else 16
        self.channels = (32, 64, 128, 128)
        self.down = (False, True, True, True) if layout == "sd1" else (False, False, True, False)
        ins = (3 * self.shuffle**2, *self.channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 1) for cin, cout in zip(ins, self.channels, strict=True))
        randomize(self, seed).eval()
        self.control: list[torch.Tensor] | None = None
        self.computed = 0

    def forward(self, hint=None, x=None, *args, **kwargs):
        if self.control is None:
            self.computed += 1
            h, self.control = F.pixel_unshuffle(hint, self.shuffle), []
            with torch.no_grad():  # as the webui samples
                for conv, down in zip(self.convs, self.down, strict=True):
                    h = conv(F.avg_pool2d(h, 2) if down else h)
                    self.control.append(h)
        return copy.deepcopy(self.control)


class TinyIPAdapter(nn.Module):
    """The region mask of sd-webui-controlnet's ``PlugableIPAdapter`` (scripts/ipadapter/
    plugable_ipadapter.py, v1.1.455): ``apply_effective_region_mask(out)`` multiplies an
    attention's output (batch x tokens x channels) by ``effective_region_mask`` (1 x 1 x H x W)
    resized bilinear to a grid it infers from the token count and the latent's aspect
    (``latent_width`` / ``latent_height``), floor of each side, then repeated over the batch and
    channels; ``calls`` counts its calls."""

    def __init__(self, mask: torch.Tensor, latent_h: int, latent_w: int) -> None:
        super().__init__()
        self.effective_region_mask = mask
        self.latent_height, self.latent_width = latent_h, latent_w
        self.calls = 0

    def apply_effective_region_mask(self, out: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        factor = math.sqrt(out.shape[1] / (self.latent_width * self.latent_height))
        size = (int(self.latent_height * factor), int(self.latent_width * factor))
        mask = F.interpolate(self.effective_region_mask, size=size, mode="bilinear").squeeze()
        mask = mask.repeat(out.shape[0], 1, 1).view(out.shape[0], -1, 1).repeat(1, 1, out.shape[2])
        return out * mask


def ip_masked_forward(unet: nn.Module, ip: nn.Module, x: torch.Tensor, t: torch.Tensor, context) -> torch.Tensor:
    """One U-Net call where every cross-attention adds its own output masked by ``ip`` (as the
    extension's ``attn_forward_hacked`` adds each IP-Adapter's masked output)."""
    def hook(module, args, output):
        return output + ip.apply_effective_region_mask(output)

    handles = [m.attn2.register_forward_hook(hook) for m in unet.modules() if hasattr(m, "attn2")]
    try:
        with torch.no_grad():
            return unet(x, t, context=context)
    finally:
        for handle in handles:
            handle.remove()
