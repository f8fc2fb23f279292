"""The real SD 1.5, SD 2.1 and SDXL U-Net architectures as ldm ``UNetModel`` s, with random weights.

Configs are those of the official inference YAMLs, with two deviations for SDXL, which ldm 2.1.5
cannot express: its per-level transformer depth (1, 2, 10) is built as depth 2 everywhere, then
every level-2 SpatialTransformer (input blocks 7, 8, the middle block, output blocks 0-2) is
replaced by a depth-10 one; and its ``label_emb`` (the pooled-text/size embedding, 4 MFLOP) is
left out, so the U-Net takes no ``y``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# name -> (engine arch, ldm UNetModel keyword arguments)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "sd15": ("sd1", dict(
        image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=768, legacy=False,
    )),
    "sd21": ("sd2", dict(
        image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
        use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, legacy=False,
    )),
    "sdxl": ("sdxl", dict(
        image_size=128, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2],
        num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64, use_spatial_transformer=True,
        use_linear_in_transformer=True, transformer_depth=2, context_dim=[2048] * 2, legacy=False,
    )),
}
# name -> (level, depth): SpatialTransformers at that level rebuilt with that depth (see above).
DEEP_LEVELS: dict[str, tuple[int, int]] = {"sdxl": (2, 10)}
CONTEXT_TOKENS = 77


def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Redraw every parameter of ``module`` from ``seed``: weights ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, 0.01), other vectors ~ N(0, 0.01). ldm zero-initialises its output convolutions;
    random ones keep every path of the U-Net live, so equivalence checks can fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return module


def unet_config(arch: str, channels: int | None = None) -> dict:
    """ldm ``UNetModel`` keyword arguments of ``arch``. channels: a narrower copy of the
    architecture (same blocks, heads of ``channels`` wide where the real one has 64-wide heads;
    a multiple of 32, for group norm), for quick tests; None = the real width, 320."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    config = dict(ARCHITECTURES[arch][1])
    if channels is not None and channels != config["model_channels"]:
        if channels <= 0 or channels % 32:
            raise ValueError(f"channels must be a positive multiple of 32, got {channels}")
        config["model_channels"] = channels
        if "num_head_channels" in config:
            config["num_head_channels"] = channels
    return config


def build_unet(arch: str, seed: int | None = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, channels: int | None = None) -> nn.Module:
    """The ldm U-Net of ``arch`` ("sd15", "sd21", "sdxl") in eval mode.

    seed: weights via :func:`randomize`; None leaves them uninitialised (for FLOP counting on
    the "meta" device, where there is no data).
    device, dtype: where the U-Net lives and its parameters' type.
    channels: see :func:`unet_config`.
    """
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = unet_config(arch, channels)
    # Built on "meta": the default initialisation of 0.9-2.6 G parameters would be thrown away.
    with torch.device("meta"):
        unet = UNetModel(**config)
        if arch in DEEP_LEVELS:
            _deepen(unet, *DEEP_LEVELS[arch])
    unet.to_empty(device="cpu" if seed is not None else device)
    if seed is not None:
        randomize(unet, seed)
    unet.to(device=device, dtype=dtype)
    unet.dtype = dtype  # ldm casts the input to this
    if dtype != torch.float32:
        # ldm's timestep embedding is always float32
        unet.time_embed.register_forward_pre_hook(lambda module, args: (args[0].to(dtype),))
    return unet.eval().requires_grad_(False)


def _deepen(unet: nn.Module, level: int, depth: int) -> None:
    from ldm.modules.attention import SpatialTransformer

    def deeper(old: nn.Module) -> nn.Module:
        attn = old.transformer_blocks[0].attn1
        heads = attn.heads
        context_dim = old.transformer_blocks[0].attn2.to_k.in_features
        return SpatialTransformer(old.in_channels, heads, attn.to_q.out_features // heads, depth=depth,
                                  context_dim=[context_dim] * depth, use_linear=old.use_linear, use_checkpoint=False)

    # A level's transformers are the ones with its width (SDXL's widths differ per level).
    width = unet.model_channels * unet.channel_mult[level]
    for blocks in (unet.input_blocks, [unet.middle_block], unet.output_blocks):
        for block in blocks:
            for index, child in enumerate(block):
                if type(child).__name__ == "SpatialTransformer" and child.in_channels == width:
                    block[index] = deeper(child)


def context_depth(unet: nn.Module) -> int:
    """How many context tensors the deepest SpatialTransformer reads (ldm indexes a list)."""
    return max((len(m.transformer_blocks) for m in unet.modules() if type(m).__name__ == "SpatialTransformer"),
               default=1)


def example_inputs(unet: nn.Module, batch: int, latent_h: int, latent_w: int, seed: int = 1,
                   tokens: int = CONTEXT_TOKENS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | list]:
    """(x, timesteps, context) for one U-Net call on ``unet``'s device and dtype.

    batch: the batch (2 = one image with classifier-free guidance). latent_h/w: latent size
    (pixels / 8). tokens: context length. A U-Net with deeper transformers gets the context as
    a list (the same tensor per depth), as ldm wants it.
    """
    p = next(unet.parameters())
    generator = torch.Generator().manual_seed(seed)
    context_dim = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock").attn2.to_k.in_features
    x = torch.randn(batch, unet.in_channels, latent_h, latent_w, generator=generator).to(p.device, p.dtype)
    context = torch.randn(batch, tokens, context_dim, generator=generator).to(p.device, p.dtype)
    t = torch.full((batch,), 500.0, device=p.device)
    depth = context_depth(unet)
    return x, t, ([context] * depth if depth > 1 else context)
