"""Architecture detection from the module tree of an ldm/sgm ``UNetModel``.

Works on class names, not classes, so ldm, sgm and test stand-ins are all recognised
without importing either package.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .blockmap import BLOCK_MAPS, BlockMap

# (number of input blocks, input blocks with a Downsample, input blocks with attention)
_SD_LAYOUT = (12, (3, 6, 9), (1, 2, 4, 5, 7, 8))
_SDXL_LAYOUT = (9, (3, 6), (4, 5, 7, 8))
_SDXL_REFINER_LAYOUT = (12, (3, 6, 9), (4, 5, 7, 8))


class UnsupportedUNet(ValueError):
    """The U-Net is not one HiDiffusion has a block map for; nothing was patched."""


class ArchMismatch(UnsupportedUNet):
    """An architecture override that does not fit the U-Net: ``arch`` was asked for, the U-Net
    has the ``family`` layout, which takes one of ``allowed``."""

    def __init__(self, message: str, arch: str, family: str, allowed: tuple[str, ...]) -> None:
        super().__init__(message)
        self.arch, self.family, self.allowed = arch, family, allowed


class RefinerUNet(UnsupportedUNet):
    """The SDXL refiner's U-Net, which the authors' method has no block map for."""


@dataclass(frozen=True)
class Detected:
    arch: str
    block_map: BlockMap
    inpaint: bool
    layout: str


def _has(module: nn.Module, class_name: str) -> bool:
    return any(type(child).__name__ == class_name for child in module.children())


def find_child(module: nn.Module, class_name: str) -> nn.Module | None:
    for child in module.children():
        if type(child).__name__ == class_name:
            return child
    return None


def _layout(unet: nn.Module) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    inputs = list(unet.input_blocks)
    downs = tuple(i for i, b in enumerate(inputs) if _has(b, "Downsample"))
    attn = tuple(i for i, b in enumerate(inputs) if _has(b, "SpatialTransformer"))
    return (len(inputs), downs, attn)


def describe_layout(unet: nn.Module) -> str:
    count, downs, attn = _layout(unet)
    return f"{count} input blocks, Downsample in {list(downs)}, SpatialTransformer in {list(attn)}"


def _context_dim(unet: nn.Module) -> int | None:
    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            to_k = getattr(getattr(module, "attn2", None), "to_k", None)
            return getattr(to_k, "in_features", None)
    return None


def detect(unet: nn.Module, arch: str | None = None) -> Detected:
    """Identify the architecture of ``unet`` and check its block map against the tree.

    arch: a user override ("sd1", "sd2", "sdxl", "sdxl_turbo"); it must fit the layout.
    Raises UnsupportedUNet naming what was found.
    """
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedUNet(
            f"HiDiffusion needs an ldm/sgm UNetModel (input_blocks, middle_block, output_blocks); "
            f"got {type(unet).__module__}.{type(unet).__name__}"
        )
    layout = _layout(unet)
    found = describe_layout(unet)
    if layout == _SD_LAYOUT:
        family, detected = "SD 1.x/2.x", ("sd2" if _context_dim(unet) == 1024 else "sd1")
        allowed = ("sd1", "sd2")
    elif layout == _SDXL_LAYOUT:
        family, detected, allowed = "SDXL", "sdxl", ("sdxl", "sdxl_turbo")
    elif layout == _SDXL_REFINER_LAYOUT:
        raise RefinerUNet(
            f"this looks like the SDXL refiner U-Net ({found}); HiDiffusion has no block map "
            "for it (the authors support SD 1.x/2.x, SDXL base and SDXL-Turbo)"
        )
    else:
        raise UnsupportedUNet(
            f"unknown U-Net layout: {found}; HiDiffusion supports the SD 1.x/2.x layout "
            "(12 input blocks) and the SDXL layout (9 input blocks)"
        )
    if arch is not None and arch not in allowed:
        raise ArchMismatch(
            f"architecture override {arch!r} does not fit this U-Net: it has the {family} layout "
            f"({found}); use one of {', '.join(map(repr, allowed))} or None",
            arch, family, allowed,
        )
    block_map = BLOCK_MAPS[arch or detected]
    _check_block_map(unet, block_map)
    in_channels = getattr(unet, "in_channels", None)
    return Detected(arch or detected, block_map, in_channels == 9, family)


def transformer_block(unet: nn.Module, where: tuple[str, int, int]) -> nn.Module:
    which, block, index = where
    blocks = unet.input_blocks if which == "input" else unet.output_blocks
    spatial = find_child(blocks[block], "SpatialTransformer")
    if spatial is None or index >= len(spatial.transformer_blocks):
        raise UnsupportedUNet(f"{which}_blocks[{block}] has no transformer_blocks[{index}] for MSW-MSA")
    return spatial.transformer_blocks[index]


def _check_block_map(unet: nn.Module, block_map: BlockMap) -> None:
    for switch in (block_map.main, block_map.extra):
        if switch is None or switch.kind != "rad":
            continue
        down = find_child(unet.input_blocks[switch.down], "Downsample")
        up = find_child(unet.output_blocks[switch.up], "Upsample")
        if down is None or type(getattr(down, "op", None)).__name__ != "Conv2d":
            raise UnsupportedUNet(f"input_blocks[{switch.down}] has no convolutional Downsample for RAD")
        if up is None:
            raise UnsupportedUNet(f"output_blocks[{switch.up}] has no Upsample for RAU")
    for where in block_map.windowed:
        if not hasattr(transformer_block(unet, where), "attn1"):
            raise UnsupportedUNet(f"{where} has no attn1 for MSW-MSA")
