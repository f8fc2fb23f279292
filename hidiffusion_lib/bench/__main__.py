"""Command line: ``python -m hidiffusion_lib.bench [options]``; see ``--help``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .attention import ATTENTIONS
from .chart import write_chart
from .models import ARCHITECTURES
from .report import text, write_csv, write_json
from .runner import DEFAULT_SIZES, DTYPES, Options, run

EXIT_USAGE = 2


def _size(value: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not WIDTHxHEIGHT, e.g. 1024x1024") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise argparse.ArgumentTypeError(f"{value}: width and height must be positive multiples of 8")
    return width, height


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _device_problem(name: str) -> str | None:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        return f"--device {name}: {error}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: this torch has no CUDA device (torch {torch.__version__})"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {name}: MPS is not available here"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"--device {name}: use cpu, cuda[:N] or mps"
    return None


def parser() -> argparse.ArgumentParser:
    defaults = ", ".join(f"{a} {w}x{h}" for a, (w, h) in DEFAULT_SIZES.items())
    p = argparse.ArgumentParser(
        prog="python -m hidiffusion_lib.bench",
        description="Time one U-Net forward of the real SD 1.5 / SD 2.1 / SDXL architectures (random weights, "
        "no download): vanilla, HiDiffusion idle, and each state of a HiDiffusion pass (MSW-MSA only, "
        "RAU-Net + MSW-MSA, ...), with FLOPs, peak memory and the whole-generation estimate.",
    )
    p.add_argument("--arch", nargs="+", choices=sorted(ARCHITECTURES), default=["sd15"],
                   help="architectures (default sd15)")
    p.add_argument("--size", nargs="+", type=_size, metavar="WxH",
                   help=f"image sizes in pixels (default per architecture: {defaults})")
    p.add_argument("--batch", type=_positive, default=2, help="U-Net batch; 2 = one image with CFG (default 2)")
    p.add_argument("--steps", type=_positive, default=20,
                   help="sampling steps of the whole-generation estimate (default 20)")
    p.add_argument("--repeats", type=_positive, default=1,
                   help="forwards per configuration, the fastest counts; with more than one, the first "
                   "(which measures memory on a CPU, under the profiler) is not timed (default 1)")
    p.add_argument("--device", default=_default_device(), help="cpu, cuda, cuda:N or mps (default: the fastest found)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter type (default float32)")
    p.add_argument("--attention", choices=ATTENTIONS, default="sdp",
                   help="sdp: PyTorch's scaled_dot_product_attention, as the webui's --opt-sdp-attention (default); "
                   "ldm: ldm's own einsum softmax (needs ~34 GB at 1024 px on SD 1.5)")
    p.add_argument("--threads", type=_positive, default=os.cpu_count(),
                   help=f"torch CPU threads (default: all {os.cpu_count()} cores)")
    p.add_argument("--compare-reference", action="store_true",
                   help="also run the authors' package (hidiffusion 0.1.10) on a diffusers U-Net with the same weights")
    p.add_argument("--no-idle", dest="idle", action="store_false",
                   help="skip timing the installed patch with everything off")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip measuring peak memory")
    p.add_argument("--channels", type=_positive,
                   help="a narrower copy of each architecture (multiple of 32; a quick check, not a benchmark)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs (default 0)")
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="directory of bench.json, bench.csv and bench.png (default bench-out)")
    p.add_argument("--json", type=Path, help="JSON results path (default OUT/bench.json)")
    p.add_argument("--csv", type=Path, help="CSV results path (default OUT/bench.csv)")
    p.add_argument("--chart", type=Path, help="PNG bar chart path (default OUT/bench.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    options = Options(
        archs=args.arch, sizes=args.size, batch=args.batch, steps=args.steps, repeats=args.repeats,
        device=args.device, dtype=args.dtype, attention=args.attention, threads=args.threads,
        compare_reference=args.compare_reference, idle=args.idle, memory=args.memory, channels=args.channels,
        seed=args.seed,
    )
    problem = _device_problem(args.device)
    if args.attention == "ldm" and args.dtype != "float32":
        problem = "--attention ldm needs --dtype float32: ldm's own attention mixes float32 and the model's dtype"
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_USAGE
    if args.compare_reference:
        try:
            from .reference import reference_module

            reference_module()
        except ImportError as error:
            print(error, file=sys.stderr)
            return EXIT_USAGE
    with tqdm(total=options.forwards(), unit="forward", file=sys.stderr) as bar:
        def progress(what: str, done: bool) -> None:
            bar.set_description(what, refresh=not done)
            if done:
                bar.update(1)

        result = run(options, progress)
    print(text(result))
    paths = {"json": args.json or args.out / "bench.json", "csv": args.csv or args.out / "bench.csv",
             "chart": args.chart or args.out / "bench.png"}
    write_json(result, paths["json"])
    write_csv(result, paths["csv"])
    write_chart(result, paths["chart"])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
