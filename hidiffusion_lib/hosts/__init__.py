"""Where each webui back end keeps what HiDiffusion needs: one small adapter per back end.

The webui script asks :func:`host_of` for the loaded model's adapter and then only the
adapter's answers (which U-Net, which control models, which other patches to step aside for),
so another back end (``ldm_patched``: Forge Classic, reForge) is one more module here. No
webui imports: an adapter reads the objects the host hands to a script.
"""

from __future__ import annotations

from .a1111 import A1111
from .base import ControlUnit, Host, StepAside, family_of
from .forge import Forge

HOSTS: tuple[Host, ...] = (Forge(), A1111())  # A1111 last: it takes any model

__all__ = ["A1111", "HOSTS", "ControlUnit", "Forge", "Host", "StepAside", "family_of", "host_of"]


def host_of(sd_model: object) -> Host:
    """The adapter of the back end that built ``sd_model`` (the webui's ``p.sd_model``)."""
    return next(host for host in HOSTS if host.owns(sd_model))
