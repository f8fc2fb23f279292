"""What a ControlNet costs beside HiDiffusion, with and without the authors' recipe.

A ControlNet (arXiv 2302.05543) is a copy of the U-Net's encoder (input blocks and middle
block) fed the latent plus an embedding of the control image, with a 1x1 conv on every output.
One is built here for the real architecture with random weights, from ldm's ``UNetModel`` (the
webui extension's own ``cldm`` is not a package), with the hint encoder of the released SD 1.5
ControlNets (seven 3x3 convs, 16-256 channels, x8 down). It is timed at the image's latent
size, as sd-webui-controlnet runs it, and at the size the recipe runs it (the model's native
size, :func:`hidiffusion_lib.controlnet.control_latent_size`), with SDP attention as the main
benchmark; a whole generation runs it on every step without the recipe and on the first 60%
with it.

    python -m hidiffusion_lib.bench.controlnet --size 1024x1024 2048x2048
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from torch import nn

from ..controlnet import control_latent_size
from ..schedule import CONTROL_SHARE
from .attention import ldm_attention
from .flops import count_flops
from .measure import measure, release_memory
from .models import ARCHITECTURES, example_inputs, randomize, unet_config
from .system import describe

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)
NATIVE_LATENT = {"sd1": 64, "sd2": 64, "sdxl": 128}


class ControlNet(nn.Module):
    """A ControlNet for an ldm U-Net config; ``forward(x, hint, timesteps, context)`` returns one
    residual per input block and the middle one, as the webui extension's control model does."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
        from ldm.modules.diffusionmodules.util import timestep_embedding

        self._embed = timestep_embedding
        encoder = UNetModel(**config)
        self.model_channels = encoder.model_channels
        # the encoder's parts only: its output blocks are never registered, so never allocated
        self.time_embed, self.input_blocks = encoder.time_embed, encoder.input_blocks
        self.middle_block = encoder.middle_block
        self.in_channels = config["in_channels"]
        layers, width = [], 3
        for channels, stride in zip(HINT_CHANNELS, HINT_STRIDES, strict=True):
            layers += [nn.Conv2d(width, channels, 3, stride=stride, padding=1), nn.SiLU()]
            width = channels
        layers.append(nn.Conv2d(width, encoder.model_channels, 3, padding=1))
        self.hint_block = nn.Sequential(*layers)
        widths = [_out_channels(block) for block in encoder.input_blocks] + [_out_channels(encoder.middle_block)]
        self.zero_convs = nn.ModuleList(nn.Conv2d(c, c, 1) for c in widths)

    def forward(self, x, hint, timesteps, context):
        emb = self.time_embed(self._embed(timesteps, self.model_channels, repeat_only=False))
        guided = self.hint_block(hint)
        outs, h = [], x
        for index, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if index == 0:
                h = h + guided
            outs.append(self.zero_convs[index](h))
        outs.append(self.zero_convs[-1](self.middle_block(h, emb, context)))
        return outs


def _out_channels(block: nn.Module) -> int:
    """The channels a U-Net block puts out: its last layer's (a SpatialTransformer keeps its input's)."""
    for child in reversed(list(block.children())):
        if type(child).__name__ == "SpatialTransformer":
            return int(child.in_channels)
        if isinstance(getattr(child, "out_channels", None), int):
            return int(child.out_channels)
    raise ValueError(f"cannot tell the output width of {type(block).__name__}")


def build_controlnet(arch: str, seed: int | None = 0, channels: int | None = None,
                     device: str | torch.device = "cpu") -> ControlNet:
    """A random ControlNet for ``arch`` ("sd15", "sd21", "sdxl"; SDXL as the bench's U-Net:
    depth 2, no label embedding). seed None: uninitialised, for FLOP counting on "meta"."""
    config = unet_config(arch, channels)
    with torch.device("meta"):
        model = ControlNet(config)
    model.to_empty(device="cpu" if seed is not None else device)
    if seed is not None:
        randomize(model, seed)
    return model.to(device).eval().requires_grad_(False)


def run(arch: str, sizes: list[tuple[int, int]], batch: int, steps: int, device: torch.device,
        channels: int | None = None, seed: int = 0) -> list[dict]:
    """Per size: the control model's seconds and FLOPs per call at full size and at the
    recipe's size, and over a whole ``steps``-step generation with and without the recipe."""
    engine_arch = ARCHITECTURES[arch][0]
    native = NATIVE_LATENT[engine_arch]
    model = build_controlnet(arch, seed, channels, device)
    counter = build_controlnet(arch, None, channels, "meta")
    recipe_steps = math.ceil(CONTROL_SHARE * steps)
    rows = []
    for width, height in sizes:
        latent = (height // 8, width // 8)
        small = control_latent_size(*latent, native)
        row = {"arch": arch, "width": width, "height": height, "recipe_latent": list(small), "steps": steps,
               "recipe_steps": recipe_steps}
        for key, (h, w) in (("recipe", small), ("full", latent)):
            release_memory()
            x, t, context = example_inputs(model, batch, h, w, seed=seed + 1)
            hint = torch.rand(1, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(seed)).to(x)
            inputs = (x, hint, t, context)
            with torch.no_grad():
                if key == "recipe":
                    model(*inputs)  # untimed: the first call grows the heap
                sample, _ = measure(lambda inputs=inputs: model(*inputs), device, memory=False)
            meta = [v.to("meta") if isinstance(v, torch.Tensor) else [c.to("meta") for c in v] for v in inputs]
            row[f"{key}_seconds"] = sample.seconds
            row[f"{key}_flops"] = count_flops(lambda meta=meta: counter(*meta))
        row["full_generation_seconds"] = row["full_seconds"] * steps
        row["recipe_generation_seconds"] = row["recipe_seconds"] * recipe_steps
        rows.append(row)
        print(markdown([row], header=not rows[:-1]), end="", flush=True)
    return rows


def markdown(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines += ["| size | control per call, full size | recipe size | control per call, recipe | speed-up per call "
                  "| FLOP ratio | 20-step generation: full, every step | recipe, first 60% | saved |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['width']}x{r['height']} | {r['full_seconds']:.1f} s | {8 * r['recipe_latent'][1]}x"
            f"{8 * r['recipe_latent'][0]} | {r['recipe_seconds']:.1f} s "
            f"| {r['full_seconds'] / r['recipe_seconds']:.2f}x "
            f"| {r['full_flops'] / r['recipe_flops']:.2f}x | {r['full_generation_seconds']:.0f} s ({r['steps']} calls) "
            f"| {r['recipe_generation_seconds']:.0f} s ({r['recipe_steps']} calls) "
            f"| {r['full_generation_seconds'] - r['recipe_generation_seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hidiffusion_lib.bench.controlnet",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15", choices=sorted(ARCHITECTURES))
    parser.add_argument("--size", nargs="+", default=["1024x1024", "2048x2048"], help="image sizes, WxH")
    parser.add_argument("--batch", type=int, default=1, help="control model batch (2 = one image with CFG)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the whole-generation figures")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--channels", type=int, default=None, help="a narrower architecture, for quick tests")
    parser.add_argument("--json", default=None, help="also write the rows and the machine here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = []
    for value in args.size:
        try:
            width, height = (int(v) for v in value.lower().split("x"))
        except ValueError:
            parser.error(f"--size {value!r} is not WIDTHxHEIGHT")
        sizes.append((width, height))
    device = torch.device("cpu")
    with ldm_attention("sdp"):  # as the main benchmark and the webui's --opt-sdp-attention
        rows = run(args.arch, sizes, args.batch, args.steps, device, args.channels)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"meta": describe(args, device), "rows": rows}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
