"""ControlNet beside HiDiffusion: the control model of a host (sd-webui-controlnet) whose
residuals the host adds to the U-Net's skips and middle block.

Always, while a patch is live: every residual is resized bicubic to the size of the skip it
is added to at this step, so on RAU-Net steps it lands on the shrunk levels as the authors'
package lands it (their hacked U-Net forward), not by the host's nearest resize.

With the authors' recipe (hidiffusion 0.1.10, written there for SDXL; here for SD 1.x/2.x too):
the control model runs at the model's native size (latent nearest-resized so its longer side
is the native latent side, rounded down to a multiple of 8; the control image to 8x that), and
only while ``step < CONTROL_SHARE * steps``; later calls return zero residuals without running
it. The ControlNet ratios (``Settings.controlnet``) are the third part, in :mod:`.schedule`.

    install_control(control_model, handle, recipe=True)  # before sampling
    remove_control(control_model)                         # after it

A T2I-Adapter (sd-webui-controlnet's ``PlugableAdapter``) returns a few features that the host
adds to the outputs of some input blocks (``lands``); they are resized bicubic to those blocks'
sizes at each step as residuals are. The recipe is the authors' for ControlNets and does not
apply: the adapter reads the control image alone (not the latent), so it has no native size to
run at, and it keeps running on the steps the host gives it (its unit's own steps).

    install_adapter(adapter, handle, lands)  # before sampling; remove_control(adapter) after it

An IP-Adapter adds no residual: its image tokens join every cross-attention, which HiDiffusion
leaves alone. Its region mask, though (sd-webui-controlnet's ``effective_region_mask``), is
resized to each attention's token grid by a grid the host infers from the token count and the
latent's aspect, which the shrunk levels of RAU-Net steps need not keep (1088x832: 9x7 tokens
in the middle block, where the host infers 9x6 and fails). The mask is resized to the grid the
tokens have in this forward instead.

    install_region_mask(ip_adapter, handle)  # before sampling; remove_control(ip_adapter) after it
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .patching import HiDiffusionHandle
from .schedule import CONTROL_SHARE
from .wrapping import call_original, marked, unpatch


def control_latent_size(latent_h: int, latent_w: int, native: int) -> tuple[int, int]:
    """The latent size the recipe runs the control model at: the authors' ``downsample_size``
    (never larger than the latent: a latent whose sides fit the native size is left as it is)."""
    factor = max(latent_h / native, latent_w / native)
    if factor <= 1:
        return latent_h, latent_w
    return int(latent_h // factor) // 8 * 8, int(latent_w // factor) // 8 * 8


def control_runs(step: int, steps: int | None, share: float | None) -> bool:
    """Whether the control model runs at ``step`` of a ``steps``-step pass: while
    ``step < share * steps``, as the authors' pipeline; always with share None."""
    return share is None or steps is None or step < share * steps


def fit_residuals(residuals: Sequence, sizes: Sequence[tuple[int, int]]) -> list:
    """Each residual resized bicubic to its size; a list of another length (not a ControlNet's
    skips + middle) comes back unchanged for the host to handle."""
    if len(residuals) != len(sizes):
        return list(residuals)
    return [
        F.interpolate(r, size=size, mode="bicubic")
        if isinstance(r, torch.Tensor) and r.ndim == 4 and tuple(r.shape[-2:]) != tuple(size) else r
        for r, size in zip(residuals, sizes, strict=True)
    ]


def fit_features(features: Sequence, sizes: Sequence[tuple[int, int]], lands: Sequence[int]) -> list:
    """Each adapter feature resized bicubic to the size of the block it lands on.

    features: what the adapter returned, one per entry of ``lands``; sizes: every input
    block's output size at this step, then the middle block's; lands: for each feature, the
    index into ``sizes`` of the block its host adds it to (-1: the middle block). A list of
    another length comes back unchanged for the host to handle.
    """
    if len(features) != len(lands):
        return list(features)
    return fit_residuals(features, [sizes[index] for index in lands])


def _level_sizes(state, latent_h: int, latent_w: int) -> list[tuple[int, int]]:
    """Every input block's output size at this step of the live patch, then the middle block's
    (which keeps the last input block's size): where control residuals and features land."""
    sizes = state.skips_at(latent_h, latent_w)
    return [*sizes, sizes[-1]]


def install_adapter(adapter: nn.Module, handle: HiDiffusionHandle, lands: Sequence[int]) -> None:
    """Wrap ``adapter`` (called by keyword as ``adapter(hint=image, x=latent, ...)``, returning
    one feature per entry of ``lands``) so that its features fit the live patch ``handle``'s
    levels at every call.

    lands: for each feature, the input block whose output the host adds it to (-1: the middle
    block's), as :func:`fit_features` takes them.
    """
    remove_control(adapter)
    previous = adapter.__dict__.get("forward")
    state = handle.state
    lands = tuple(lands)

    def forward(*args, **kwargs):
        # the latent only tells the step's sizes: sd-webui-controlnet passes it as x= (the
        # adapter's first positional parameter is the hint)
        x = kwargs.get("x", args[1] if len(args) > 1 else None)
        out = call_original(adapter, previous, *args, **kwargs)
        if not state.alive or not isinstance(x, torch.Tensor) or x.ndim != 4 or not isinstance(out, (list, tuple)):
            return out
        latent_h, latent_w = (int(n) for n in x.shape[-2:])
        if handle.gated_at(latent_h, latent_w):
            return out
        sizes = _level_sizes(state, latent_h, latent_w)
        # PlugableAdapter computes its features once and returns a copy of them at every call:
        # resizing the copy here, per call, fits each step's sizes and leaves its cache alone
        out = fit_features(out, sizes, lands)
        state.pending_features = [tuple(f.shape[-2:]) for f in out if isinstance(f, torch.Tensor)]
        return out

    adapter.forward = marked(forward, state, previous)


def token_grid(state, tokens: int) -> tuple[int, int] | None:
    """The (height, width) of ``tokens`` tokens in the running forward: the level of the sizes
    its input blocks have output so far with that many (levels shrink: at most one); None if
    there is none."""
    grids = {size for size in state.skip_sizes.values() if size[0] * size[1] == tokens}
    return grids.pop() if len(grids) == 1 else None


def install_region_mask(ip_adapter: nn.Module, handle: HiDiffusionHandle) -> None:
    """Wrap ``ip_adapter.apply_effective_region_mask(out)`` (``out``: an attention's output,
    batch x tokens x channels; the mask: ``ip_adapter.effective_region_mask``, 1 x 1 x H x W or
    None) so that, in the live patch ``handle``'s forwards, the mask is resized bilinear to the
    grid the tokens have (:func:`token_grid`) before it multiplies ``out``."""
    remove_control(ip_adapter)
    previous = ip_adapter.__dict__.get("apply_effective_region_mask")
    original = previous or type(ip_adapter).apply_effective_region_mask.__get__(ip_adapter)
    state = handle.state

    def apply_effective_region_mask(out):
        mask = getattr(ip_adapter, "effective_region_mask", None)
        usable = state.alive and not state.gated and isinstance(mask, torch.Tensor) and mask.ndim == 4
        grid = token_grid(state, out.shape[1]) if usable and isinstance(out, torch.Tensor) and out.ndim == 3 else None
        if grid is None:
            return original(out)
        mask = F.interpolate(mask.to(out.device), size=grid, mode="bilinear")
        return out * mask.reshape(mask.shape[0], -1, 1)

    ip_adapter.apply_effective_region_mask = marked(apply_effective_region_mask, state, previous)


def install_control(control_model: nn.Module, handle: HiDiffusionHandle, recipe: bool = True,
                    share: float | None = CONTROL_SHARE) -> None:
    """Wrap ``control_model`` (called as ``control_model(x=latent, hint=image, ...)``, returning
    one residual per input block plus the middle one) for the live patch ``handle``.

    recipe: run it at the native size and only for the first ``share`` of the steps (share
    None: every step the host runs it). Without recipe its residuals are only fitted.
    """
    remove_control(control_model)
    previous = control_model.__dict__.get("forward")
    state = handle.state
    native = handle.native_latent
    last: list[tuple[torch.Size, torch.dtype, torch.device]] = []

    def forward(*args, **kwargs):
        x = args[0] if args else kwargs.get("x")
        if not state.alive or not isinstance(x, torch.Tensor) or x.ndim != 4:
            return call_original(control_model, previous, *args, **kwargs)
        latent_h, latent_w = (int(n) for n in x.shape[-2:])
        if handle.gated_at(latent_h, latent_w):
            return call_original(control_model, previous, *args, **kwargs)
        sizes = _level_sizes(state, latent_h, latent_w)
        if recipe and last and not control_runs(state.step, state.steps, share):
            out = [torch.zeros((x.shape[0], shape[1], *size), dtype=dtype, device=device)
                   for (shape, dtype, device), size in zip(last, sizes, strict=False)]
        else:
            if recipe:
                args, kwargs = _at_native_size(args, kwargs, latent_h, latent_w, native)
            ran_at = args[0] if args else kwargs["x"]
            state.pending_control = (int(ran_at.shape[-2]), int(ran_at.shape[-1]))
            out = call_original(control_model, previous, *args, **kwargs)
            if not isinstance(out, (list, tuple)):
                return out
            out = fit_residuals(out, sizes)
            last[:] = [(r.shape, r.dtype, r.device) for r in out if isinstance(r, torch.Tensor)]
        state.pending_residuals = [tuple(r.shape[-2:]) for r in out if isinstance(r, torch.Tensor)]
        return out

    control_model.forward = marked(forward, state, previous)


def remove_control(control_model: nn.Module) -> int:
    """Take this module's wrappers off ``control_model``; returns how many."""
    return unpatch(control_model)


def _at_native_size(args: tuple, kwargs: dict, latent_h: int, latent_w: int, native: int) -> tuple[tuple, dict]:
    """The call's latent and control image (``hint``) nearest-resized to the recipe's size."""
    size = control_latent_size(latent_h, latent_w, native)
    if size == (latent_h, latent_w) or min(size) < 8:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    _replace(args, kwargs, 0, "x", lambda x: F.interpolate(x, size=size))
    _replace(args, kwargs, 1, "hint", lambda hint: F.interpolate(hint, size=(8 * size[0], 8 * size[1]))
             if isinstance(hint, torch.Tensor) and hint.ndim == 4 else hint)
    return tuple(args), kwargs


def _replace(args: list, kwargs: dict, position: int, name: str, change: Callable) -> None:
    if len(args) > position:
        args[position] = change(args[position])
    elif name in kwargs:
        kwargs[name] = change(kwargs[name])
