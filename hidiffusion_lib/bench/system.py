"""The machine, versions and options a benchmark ran with, for its report."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from datetime import UTC, datetime
from importlib import metadata

import torch

PACKAGES = ("torch", "stable-diffusion-sdkit", "diffusers", "hidiffusion")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def describe(options: object, device: torch.device) -> dict:
    """Everything needed to read, compare or repeat a run."""
    accelerator = None
    if device.type == "cuda":
        accelerator = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        accelerator = "Apple MPS"
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m hidiffusion_lib.bench " + " ".join(sys.argv[1:]),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "accelerator": accelerator,
        "versions": versions(),
        "options": dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(vars(options)),
        "load_average_start": list(os.getloadavg()),
    }
