"""Command line: ``python -m hidiffusion_lib.bench [options]``; see ``--help``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import hypertile as ht
from .attention import ATTENTIONS
from .chart import write_chart
from .hires import DENOISING
from .models import ARCHITECTURES
from .progress import Progress, amount, duration
from .report import text, write_csv, write_json
from .runner import DEFAULT_SIZES, DTYPES, Options, estimate, run
from .summary import write_markdown

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


def _scale(value: str) -> float:
    number = float(value)
    if not number > 1:
        raise argparse.ArgumentTypeError(f"must be above 1, got {value}")
    return number


def _strength(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
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
        "RAU-Net + MSW-MSA, ...), with --hypertile the webui's Hypertile alone and RAU-Net under it, and "
        "the hires fix's first pass; with FLOPs, peak memory and every route's whole generation.",
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
    p.add_argument("--hypertile", metavar="WEBUI_DIR",
                   help="a webui checkout: run its built-in Hypertile (extensions-builtin/hypertile) with its "
                   "defaults, alone and with RAU-Net, on the same U-Net; without it those rows are skipped")
    p.add_argument("--hires-scale", type=_scale,
                   help="hires fix \"Upscale by\" (default: from the architecture's native size, 512 px for SD 1.5)")
    p.add_argument("--hires-steps", type=int, default=0, help="hires fix second-pass steps; 0 = --steps (default)")
    p.add_argument("--denoising", type=_strength, default=DENOISING,
                   help=f"hires fix denoising strength (default {DENOISING}); it does not change the step count")
    p.add_argument("--no-hires", dest="hires", action="store_false", help="skip the hires fix route")
    p.add_argument("--estimate", action="store_true",
                   help="count FLOPs, time one small forward, print the expected duration and stop")
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
    p.add_argument("--markdown", type=Path, help="Markdown side-by-side table path (default OUT/bench.md)")
    return p


class _Bar(Progress):
    """A tqdm bar in GFLOP: its rate and time left follow the speed measured so far. After each
    size, the results so far go to ``partial`` (JSON), so a run cut short keeps them."""

    def __init__(self, partial: Path | None = None) -> None:
        self.bar: tqdm | None = None
        self.partial = partial

    def measured(self, result: object) -> None:
        if self.partial is not None:
            write_json(result, self.partial)

    def doing(self, what: str) -> None:
        if self.bar is None:
            print(what, file=sys.stderr, flush=True)
        else:
            self.bar.set_description(what)

    def planned(self, flops: int, seconds: float, forwards: int) -> None:
        line = (f"expected: about {duration(seconds)} for {forwards} forwards ({amount(flops)} at the "
                f"{flops / seconds / 1e9:,.1f} GFLOP/s of a small forward here; larger ones usually run faster)")
        if self.bar is None:
            print(line, file=sys.stderr, flush=True)
            # In a log file (not a terminal) a line every 10 s, not a redraw every 0.1 s.
            interval = 0.1 if sys.stderr.isatty() else 10.0
            self.bar = tqdm(total=flops / 1e9, unit="GFLOP", file=sys.stderr, dynamic_ncols=True,
                            mininterval=interval, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} GFLOP "
                            "[{elapsed}<{remaining}, {rate_fmt}]")
        else:
            self.bar.write(line, file=sys.stderr)
            self.bar.total += flops / 1e9
            self.bar.refresh()

    def did(self, flops: int) -> None:
        self.bar.update(min(flops / 1e9, self.bar.total - self.bar.n))  # no float drift past the end

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    skipped = None
    if args.hypertile is not None and ht.find(args.hypertile) is None:
        skipped = f"no webui Hypertile at {Path(args.hypertile) / ht.ENGINE}"
        print(f"{skipped}: skipping the Hypertile rows", file=sys.stderr)
    options = Options(
        archs=args.arch, sizes=args.size, batch=args.batch, steps=args.steps, repeats=args.repeats,
        device=args.device, dtype=args.dtype, attention=args.attention, threads=args.threads,
        compare_reference=args.compare_reference, idle=args.idle, memory=args.memory, channels=args.channels,
        seed=args.seed, hypertile_dir=None if skipped or args.hypertile is None else str(args.hypertile),
        hires=args.hires, hires_scale=args.hires_scale, hires_steps=args.hires_steps, denoising=args.denoising,
    )
    problem = _device_problem(args.device)
    if args.attention == "ldm" and args.dtype != "float32":
        problem = "--attention ldm needs --dtype float32: ldm's own attention mixes float32 and the model's dtype"
    if args.hires_steps < 0:
        problem = f"--hires-steps must be 0 or more, got {args.hires_steps}"
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
    json_path = args.json or args.out / "bench.json"
    bar = _Bar(json_path)
    try:
        if args.estimate:
            found = estimate(options, bar)
            for part in [*found, {"label": "in all", **{k: sum(p[k] for p in found) for k in
                                                         ("flops", "forwards", "seconds")}}]:
                print(f"{part['label']}: about {duration(part['seconds'])} for {part['forwards']} forwards"
                      f" ({amount(part['flops'])}), warm-up included")
            return 0
        result = run(options, bar)
    finally:
        bar.close()
    if skipped:
        result.meta["hypertile_skipped"] = skipped
    print(text(result))
    paths = {"json": json_path, "csv": args.csv or args.out / "bench.csv",
             "chart": args.chart or args.out / "bench.png", "markdown": args.markdown or args.out / "bench.md"}
    write_json(result, paths["json"])
    write_csv(result, paths["csv"])
    write_chart(result, paths["chart"])
    write_markdown(result, paths["markdown"])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
