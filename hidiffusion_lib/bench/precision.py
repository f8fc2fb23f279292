"""Half-precision runs of ldm U-Nets.

ldm's GroupNorm32 casts its input to float32, which fails against float16/bfloat16 parameters
(the webui patches it too). For a run in another dtype it normalises in the input's dtype, as
diffusers' GroupNorm does, so both sides of a comparison compute alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def ldm_precision(dtype: torch.dtype) -> Iterator[None]:
    """Within the block, ldm's GroupNorm32 runs in its input's dtype unless ``dtype`` is float32."""
    from ldm.modules.diffusionmodules.util import GroupNorm32

    original = GroupNorm32.forward
    if dtype != torch.float32:
        GroupNorm32.forward = nn.GroupNorm.forward
    try:
        yield
    finally:
        GroupNorm32.forward = original
