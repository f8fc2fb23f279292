"""Benchmark: HiDiffusion against vanilla and against the authors' package, on the real SD 1.5,
SD 2.1 and SDXL U-Net architectures with random weights.

    python -m hidiffusion_lib.bench                          # SD 1.5 at 1024x1024
    python -m hidiffusion_lib.bench --compare-reference --repeats 2

or from Python: ``run(Options(...))`` and the writers of :mod:`.report` and :mod:`.chart`.
"""

from .results import BenchResult, ConfigResult, SizeResult, Timing
from .runner import Options, run

__all__ = ["BenchResult", "ConfigResult", "Options", "SizeResult", "Timing", "run"]
