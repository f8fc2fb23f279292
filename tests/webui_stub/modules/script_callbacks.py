"""Mirrors modules/script_callbacks.py: registration functions append to per-event lists;
`CFGDenoiserParams(x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond,
text_uncond, denoiser)` is what `on_cfg_denoiser` callbacks receive."""

from __future__ import annotations

from collections import defaultdict

callbacks: dict[str, list] = defaultdict(list)


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


def on_cfg_denoiser(callback, *, name=None):
    callbacks["cfg_denoiser"].append(callback)


def on_model_loaded(callback, *, name=None):
    callbacks["model_loaded"].append(callback)


def on_ui_settings(callback, *, name=None):
    callbacks["ui_settings"].append(callback)


def on_infotext_pasted(callback, *, name=None):
    """Called as callback(infotext, params) before a paste applies the parsed params."""
    callbacks["infotext_pasted"].append(callback)


def on_before_ui(callback, *, name=None):
    callbacks["before_ui"].append(callback)
