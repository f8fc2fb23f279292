"""FLOPs of one U-Net call, counted by PyTorch's FlopCounterMode on the "meta" device.

On "meta" the forward runs on shapes alone, in no time and no memory, and counts what the real
device would run. The counter has no formula for the fused CPU attention kernel that
scaled_dot_product_attention dispatches to on a CPU (it counts 0 there); one is registered, so
a count on the CPU is right too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CUSTOM_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` (a multiply-add counts 2)."""
    with FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS) as counter:
        fn()
    return counter.get_total_flops()
