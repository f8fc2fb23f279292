"""Wall time and peak memory of one call on a device.

Peak memory is what the call allocates above what was allocated before it (activations and
temporaries, not the weights). CUDA: the caching allocator's peak statistics. CPU: PyTorch's
profiler records every tensor allocation and free; the peak of their running sum is taken
(the process RSS would also count the allocator's retained heap, and tracemalloc does not see
tensors). MPS: not measured.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    """seconds: wall time of the call; peak_bytes: None when not measured; profiled: the call
    ran under the profiler (its time is a little longer)."""

    seconds: float
    peak_bytes: int | None
    profiled: bool = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_memory() -> None:
    """Hand freed memory back to the system (glibc keeps it for reuse): between sizes, so a
    large size does not stack its working set on a smaller one's leftovers."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and name:
        with suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def measure(fn: Callable[[], object], device: torch.device, memory: bool = True) -> tuple[Sample, object]:
    """Run ``fn()`` once; return its Sample and result. memory: also measure peak memory
    (on the CPU this runs the call under the profiler, which adds about 2% to its time)."""
    synchronize(device)
    if not memory or device.type == "mps":
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        return Sample(time.perf_counter() - start, None), result
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds = time.perf_counter() - start
        return Sample(seconds, torch.cuda.max_memory_allocated(device) - base), result
    return _measure_cpu(fn)


def _measure_cpu(fn: Callable[[], object]) -> tuple[Sample, object]:
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        profiler.__enter__()
    try:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    finally:
        with _quiet_stderr():
            profiler.__exit__(None, None, None)
    events = sorted((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return Sample(seconds, peak, profiled=True), result


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's native start/stop log lines (written straight to fd 2)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
