"""apply / remove: install HiDiffusion on a live ldm/sgm U-Net and take it out again.

Nothing is replaced: instance ``forward`` attributes on Downsample, Upsample and attn1
modules and forward hooks on blocks, all marked (see :mod:`.wrapping`). They shadow any
class-level patch of the host and disappear without a trace on removal.
"""

from __future__ import annotations

import numbers
from dataclasses import replace

from torch import nn

from .detection import detect, find_child, transformer_block
from .mswmsa import record_token_hw, windowed_forward
from .raunet import input_block_hook, rad_forward, unpool_hook, upsample_forward
from .schedule import Schedule, gated, native_side, resolve
from .settings import Settings
from .state import SWITCHES, Forward, Resampling, State
from .wrapping import marked, unpatch


class HiDiffusionHandle:
    """A live patch. Tell it the step before each model call; remove it when done."""

    def __init__(self, unet: nn.Module, state: State) -> None:
        self.unet = unet
        self.state = state

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def arch(self) -> str:
        return self.state.detected.arch

    @property
    def active(self) -> bool:
        return self.state.alive

    @property
    def trace(self) -> list[Forward]:
        """One record per U-Net forward since ``apply``, oldest first (see state.Forward)."""
        return self.state.trace

    def set_step(self, step: int, steps: int) -> None:
        """step: index of the coming denoising step (0-based) in this sampling pass of
        ``steps`` steps. Decides which RAU-Net switches run and the window shifts."""
        for name, value, low in (("step", step, 0), ("steps", steps, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"set_step: {name} must be an integer >= {low}, got {value!r}")
        self.state.step, self.state.steps = int(step), int(steps)

    def schedule_for(self, latent_h: int, latent_w: int) -> Schedule:
        """The ratios this patch uses at a latent size."""
        return resolve(self.settings, self.arch, latent_h, latent_w, self.state.detected.inpaint)

    @property
    def native_latent(self) -> int:
        """The latent side of the model's training size: ``settings.native_size`` where the host
        said (SD 2.x 768-v: 96), else the block map's (64 for SD 1.x/2.x, 128 for SDXL)."""
        return native_side(self.settings, self.state.detected.block_map.native_latent)

    def gated_at(self, latent_h: int, latent_w: int) -> bool:
        """Whether the native-resolution gate leaves a forward at this latent size vanilla."""
        return gated(self.settings, self.state.detected.block_map.native_latent, latent_h, latent_w)

    def remove(self) -> None:
        """Restore the U-Net exactly; safe to call twice."""
        unpatch(self.unet, self.state)
        self.state.alive = False

    def __enter__(self) -> HiDiffusionHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def remove(unet: nn.Module) -> int:
    """Remove every patch of this engine from ``unet`` (stale ones too); returns the number
    of forwards and hooks taken out."""
    return unpatch(unet)


def apply(unet: nn.Module, settings: Settings | None = None) -> HiDiffusionHandle:
    """Patch ``unet`` (an ldm/sgm UNetModel) with HiDiffusion and return the handle.

    settings: what to apply; defaults to ``Settings()``. A patch already on ``unet`` is
    replaced. Bad settings or an unsupported U-Net raise before anything changes.
    """
    if settings is not None and not isinstance(settings, Settings):
        raise TypeError(f"settings must be a hidiffusion_lib.Settings or None, got {type(settings).__name__}")
    settings = replace(settings) if settings is not None else Settings()  # later edits by the caller don't leak in
    settings.validate()
    detected = detect(unet, settings.arch)
    unpatch(unet)
    state = State(settings, detected)
    try:
        _install(unet, state)
    except BaseException:
        unpatch(unet, state)
        raise
    return HiDiffusionHandle(unet, state)


def _install(unet: nn.Module, state: State) -> None:
    settings, block_map = state.settings, state.detected.block_map
    state.resampling = _resampling(unet, block_map)
    if not (settings.raunet or settings.mswmsa):
        return

    def begin(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        state.begin_forward(int(x.shape[-2]), int(x.shape[-1]))

    unet.input_blocks[0].register_forward_pre_hook(marked(begin, state), with_kwargs=True)

    pools: dict[int, str] = {}
    rau_switch_of: dict[int, str] = {}
    if settings.raunet:
        for name in SWITCHES:
            switch = getattr(block_map, name)
            if switch is None:
                continue
            if switch.kind == "rad":
                down = find_child(unet.input_blocks[switch.down], "Downsample")
                down.forward = rad_forward(down, state, name)
                rau_switch_of[switch.up] = name
            else:
                pools[switch.down] = name
                unet.output_blocks[switch.up].register_forward_hook(unpool_hook(state, name))

    # Every Upsample resizes to its skip (see raunet.py); that needs the skip sizes, which every
    # input block records (the trace shows them next to the control residuals' sizes).
    num_inputs = len(unet.input_blocks)
    for index, block in enumerate(unet.output_blocks):
        upsample = find_child(block, "Upsample")
        if upsample is not None:
            upsample.forward = upsample_forward(upsample, state, num_inputs - 2 - index, rau_switch_of.get(index))
    for index in range(num_inputs):
        unet.input_blocks[index].register_forward_hook(input_block_hook(state, index, pools.get(index)))

    if settings.mswmsa:
        cells: dict[int, list] = {}
        for position, where in enumerate(block_map.windowed):
            which, block, _ = where
            blocks = unet.input_blocks if which == "input" else unet.output_blocks
            spatial = find_child(blocks[block], "SpatialTransformer")
            if id(spatial) not in cells:
                cells[id(spatial)] = [None]
                spatial.register_forward_pre_hook(record_token_hw(state, cells[id(spatial)]), with_kwargs=True)
            attn = transformer_block(unet, where).attn1
            attn.forward = windowed_forward(attn, state, position, cells[id(spatial)])


def _resampling(unet: nn.Module, block_map) -> Resampling:
    """Where the input blocks change the latent size, for State.skips_at."""
    convs = {}
    for index, block in enumerate(unet.input_blocks):
        down = find_child(block, "Downsample")
        if down is not None:
            op = down.op
            axes = [_pair(getattr(op, name, 1)) for name in ("kernel_size", "stride", "padding", "dilation")]
            convs[index] = tuple(zip(*axes, strict=True))
    rad, pool = {}, {}  # where each switch acts; State.switches_at says whether it does
    for name in SWITCHES:
        switch = getattr(block_map, name)
        if switch is not None:
            (rad if switch.kind == "rad" else pool)[switch.down] = name
    return Resampling(len(unet.input_blocks), convs, rad, pool)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value), int(value))
