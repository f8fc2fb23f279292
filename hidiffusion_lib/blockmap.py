"""Where HiDiffusion acts in an ldm/sgm ``UNetModel``, per architecture.

Indices are into ``input_blocks`` / ``output_blocks``. They translate the authors'
diffusers module names (hidiffusion 0.1.10) and are checked against the module tree
by :mod:`hidiffusion_lib.detection` before anything is patched.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    """One RAU-Net switch: a downsampling change and the upsampling that undoes it.

    kind: "rad" (the Downsample in ``input_blocks[down]`` runs with stride 4, the
        Upsample in ``output_blocks[up]`` interpolates by 4) or "pool" (avg-pool the
        output of ``input_blocks[down]``, bicubic back after ``output_blocks[up]``).
    """

    kind: str
    down: int
    up: int


@dataclass(frozen=True)
class BlockMap:
    """main/extra: the T1 and T2 switches. windowed: (which, block, transformer_index)
    of every self-attention that MSW-MSA windows. native_latent: training latent side."""

    arch: str
    main: Switch
    extra: Switch | None
    windowed: tuple[tuple[str, int, int], ...]
    native_latent: int


_SD_WINDOWED = tuple(("input", b, 0) for b in (1, 2)) + tuple(("output", b, 0) for b in (9, 10, 11))
_SDXL_WINDOWED = tuple(("input", b, t) for b in (4, 5) for t in (0, 1)) + tuple(
    ("output", b, t) for b in (3, 4, 5) for t in (0, 1)
)

BLOCK_MAPS: dict[str, BlockMap] = {
    "sd1": BlockMap("sd1", Switch("rad", 3, 8), Switch("pool", 4, 7), _SD_WINDOWED, 64),
    "sd2": BlockMap("sd2", Switch("rad", 3, 8), Switch("pool", 4, 7), _SD_WINDOWED, 64),
    "sdxl": BlockMap("sdxl", Switch("pool", 4, 4), Switch("rad", 6, 2), _SDXL_WINDOWED, 128),
    "sdxl_turbo": BlockMap("sdxl_turbo", Switch("pool", 4, 4), None, _SDXL_WINDOWED, 128),
}
