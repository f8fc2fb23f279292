"""What the webui script asks of a host back end (see :mod:`hidiffusion_lib.hosts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn


@dataclass(frozen=True)
class ControlUnit:
    """A control model the host runs beside the U-Net in this generation.

    model: called as ``model(x=latent, hint=image, ...)``, returning one residual per input
        block plus the middle one (a ControlNet).
    end: the fraction of the steps after which the host stops running it (its Ending Control
        Step; 1.0 when left at the default).
    lands: None for a ControlNet; for a T2I-Adapter (called as ``model(hint=image, x=latent,
        ...)``, returning a few features), the input block whose output the host adds each
        feature to (-1: the middle block's).
    region_mask: True for an IP-Adapter with a region mask, which adds no residual but masks
        its cross-attention output (``model.apply_effective_region_mask``, see
        hidiffusion_lib.controlnet.install_region_mask).
    """

    model: nn.Module
    end: float = 1.0
    lands: tuple[int, ...] | None = None
    region_mask: bool = False

    @property
    def adapter(self) -> bool:
        """Whether this is a T2I-Adapter (features on a few levels, no recipe)."""
        return self.lands is not None

    @property
    def controlnet(self) -> bool:
        """Whether this is a ControlNet (residuals on every level; the recipe applies)."""
        return self.lands is None and not self.region_mask


@dataclass(frozen=True)
class StepAside:
    """Why HiDiffusion, or one of its parts, leaves this pass to another patch of the host;
    each reason in the user's words, None where there is none."""

    whole: str | None = None
    raunet: str | None = None
    mswmsa: str | None = None


def family_of(sd_model: object, v_prediction: bool) -> str | None:
    """The loaded model's family from the flags both back ends set on ``p.sd_model``
    (A1111 modules/sd_models.py set_model_type; Forge backend/diffusion_engine/*.py "WebUI
    Legacy"): "sd1", "sd2", "sd2_768v" (SD 2.x predicting v: trained at 768 px), "sdxl" (the
    refiner too), "sd3", or None where no flag is set (Forge's Flux): the engine reads the tree.
    ``v_prediction`` is the back end's own answer (see each adapter)."""
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"  # an SDXL v-prediction model was still trained at 1024 px
    if getattr(sd_model, "is_sd2", False):
        return "sd2_768v" if v_prediction else "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    return None


class Host(Protocol):
    name: str

    def owns(self, sd_model: object) -> bool:
        """Whether ``sd_model`` (the webui's ``p.sd_model``) comes from this back end."""

    def unet(self, sd_model: object) -> nn.Module | None:
        """The U-Net module that HiDiffusion patches (None where the model has none); for a
        model that is no U-Net (SD3's MMDiT) the diffusion model the host runs."""

    def family(self, sd_model: object) -> str | None:
        """The loaded model's family, a key of ``script_args.FAMILIES`` (see :func:`family_of`)."""

    def control_units(self, p: object) -> list[ControlUnit]:
        """The ControlNet-type units that run in this generation; called after the host's
        ControlNet has set up the pass. Adapters and reference units are left out."""

    def step_aside(self, p: object, opts: object) -> StepAside:
        """What other patches on this pass (called after theirs are set up) leave to
        HiDiffusion; ``opts`` is the webui's ``shared.opts``."""
