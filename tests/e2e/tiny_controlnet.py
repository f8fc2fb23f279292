"""Write tiny random-weight ControlNet models for the tiny U-Nets of tiny_checkpoint.py, and fit
the sd-webui-controlnet extension's loader to them inside the webui.

``python tests/e2e/tiny_controlnet.py OUT_DIR sd1|sdxl|forge-sd1|t2i-sd1|t2i-sdxl|ip-sd1|clip-h [SEED]``
writes one file, ``OUT_DIR/tiny-controlnet-sd15.safetensors``, ``OUT_DIR/tiny-controlnet-sdxl.safetensors``,
``OUT_DIR/tiny-controlnet-forge-sd15.safetensors``, ``OUT_DIR/tiny-t2iadapter-sd15.safetensors``,
``OUT_DIR/tiny-t2iadapter-xl.safetensors``, ``OUT_DIR/tiny-ipadapter-sd15.safetensors`` or
``OUT_DIR/clip_h.pth`` (``...-seedSEED...`` for a non-zero SEED), and prints its path. The name
tells the extension the model's base ("sd15" / "xl" in it, scripts/enums.py); point its
``--controlnet-dir`` at OUT_DIR. The keys are those of the
extension's ``ControlNet`` (scripts/cldm.py) under the ``control_model.`` prefix of the original
ControlNet files (the loader strips it): the U-Net's encoder half (``time_embed``, ``label_emb``
for SDXL, ``input_blocks``, ``middle_block``, with the tiny U-Net's shapes), ``input_hint_block``
(the control image, 3 channels, to the latent grid), one ``zero_convs.N`` 1x1 conv per input
block and ``middle_block_out``: 13 residuals for sd1, 10 for SDXL, as the extension's U-Net forward
expects. No YAML: since its SDXL support (2023) the loader reads no config file beside a model.

``forge-sd1``: the ControlNet of tiny_checkpoint.py's ``forge-sd1`` U-Net (320 channels,
``channel_mult`` [1, 1, 1, 1], CLIP-L context), fp16, for Forge 2's built-in ControlNet. Forge's
loader (modules_forge/supported_controlnet.py) reads the layout from the keys themselves
(huggingface_guess ``model_config_from_unet``, which finds SD 1.5 as for the checkpoint), takes
the keys with or without the ``control_model.`` prefix and builds
``backend.nn.cnets.cldm.ControlNet``: no loader fitting is needed there. Point Forge's
``--controlnet-dir`` at OUT_DIR.

Weights are random (biases 0, norm scales 1, other weights N(0, 1/fan_in), the same for a seed),
and so are the "zero" convs, the hint block's last conv included: a trained ControlNet starts
them at zero, which would make an untrained one a no-op. ``_nonzero_outputs`` checks that each
of them has a non-zero weight, so every residual moves the image.

``t2i-sd1`` / ``t2i-sdxl``: a T2I-Adapter (the extension's ``Adapter``, scripts/adapter.py) for the
tiny sd1 / sdxl U-Net, with the keys of the released ``t2iadapter_*`` files (``conv_in``, ``body.N``
res blocks, no prefix). The loader reads its layout from the keys (``conv_in`` found: channels
c, 2c, 4c, 4c from its output, SDXL's pixel unshuffle of 16 when its input has 256 or 768
channels, ``ksize`` from ``body.0.block2``, no ``down_opt`` convs: average pooling), so the tiny
c = 32 gives the tiny U-Nets' channels where the extension adds the features (sd1: input blocks
2, 5, 8, 11 at 32, 64, 128, 128; sdxl: 3, 5, 8 and the middle block at 32, 64, 128, 128) and
no fitting is needed; the loader loads it non-strictly, so the webui script below makes that
load strict for these models.

``ip-sd1``: an IP-Adapter (the plain one: ``ImageProjModel`` and one ``to_k_ip``/``to_v_ip`` pair per
cross-attention, scripts/ipadapter/ipadapter_model.py) for the tiny sd1 U-Net, with the flat keys
of the released ``ip-adapter_sd15.safetensors`` (``image_proj.proj``, ``image_proj.norm``,
``ip_adapter.N.to_k_ip`` for N = 1, 3, ... 31). The loader reads every size from the keys: the
context width (the tiny text encoder's 64) from ``ip_adapter.1.to_k_ip``, 4 image tokens from
``image_proj.proj``, each layer's width from its own weight, so it loads as written.
``clip-h``: ``clip_h.pth``, the CLIP ViT-H/14 image encoder the extension's IP-Adapter
preprocessors load (annotator/clipvision: a fixed ``CLIPVisionModelWithProjection`` config of
632 M parameters, downloaded from a hub when its file is missing, loaded non-strictly): every
parameter of the model transformers builds from that config, random and seeded, fp16 (1.3 GB), so
nothing is left to the random init of the webui's process and every run embeds an image alike.

The loader (scripts/controlnet_model_guess.py) does not read a model's layout from its weights:
it builds every ControlNet with the fixed layout of SD 1.5's (320 channels) or SDXL's, and
a tiny model fails to load with size mismatches. So this file is also a webui script: loaded
by the webui (conftest.py's ``linked_controlnet`` puts it in a one-script extension), it wraps
the extension's ``PlugableControlModel.__init__`` so that a state dict of this layout (32
channels at the first input block) gets the tiny layout; other models load unchanged. The
wrapper also fails the load if a key does not match (the extension loads non-strictly).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import pathlib
import sys

import torch

HERE = str(pathlib.Path(__file__).resolve().parent)  # resolved: the webui loads this file through a link
if HERE not in sys.path:
    sys.path.append(HERE)
from tiny_checkpoint import (  # noqa: E402
    CLIP_L_CONFIG,
    FORGE_SD1_CHANNELS,
    FORGE_SD1_DEPTH,
    FORGE_SD1_MULT,
    HEAD_WIDTH,
    SDXL_DEPTH,
    SDXL_MULT,
    SIZE_EMBED,
    TEXT_WIDTH,
    UNET_CHANNELS,
    UNET_DEPTH,
    UNET_MULT,
    Shapes,
    _conv,
    _linear,
    _random,
    _stem,
    open_clip_text_shapes,
    unet_shapes,
)

STEMS = {"sd1": "tiny-controlnet-sd15", "sdxl": "tiny-controlnet-sdxl", "forge-sd1": "tiny-controlnet-forge-sd15",
         "t2i-sd1": "tiny-t2iadapter-sd15", "t2i-sdxl": "tiny-t2iadapter-xl", "ip-sd1": "tiny-ipadapter-sd15",
         "clip-h": "clip_h"}
PREFIX = "control_model."
HINT_CHANNELS = 3
HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # the hint block's convs; every second one has stride 2
ENCODER = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
PATCHED = "_hidiffusion_e2e_tiny_layout"
# scripts/enums.py StableDiffusionVersion.transformer_ids for SD 1.x, in the order the IP-Adapter
# numbers its key pairs (1, 3, 5 ...): input blocks, output blocks, then the middle block
IP_SD1_TRANSFORMERS = ([f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)]
                       + [f"output_blocks.{i}.1" for i in range(3, 12)] + ["middle_block.1"])
IP_TOKENS = 4
# annotator/clipvision/__init__.py config_clip_h (ViT-H/14 with its 1024-wide projection)
CLIP_H_CONFIG = {"hidden_size": 1280, "image_size": 224, "intermediate_size": 5120, "layer_norm_eps": 1e-05,
                 "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 32, "patch_size": 14,
                 "projection_dim": 1024, "hidden_act": "gelu"}
IP_TRACE = "TINY_IPADAPTER_TRACE"  # in the webui: a file that gets one JSON line per IP-Adapter call


def layout(kind: str) -> dict:
    """The ``ControlNet`` arguments (scripts/cldm.py) that differ from the loader's fixed ones:
    the tiny U-Net's levels, attention levels, depths and head width."""
    mult, depth = (UNET_MULT, UNET_DEPTH) if kind == "sd1" else (SDXL_MULT, SDXL_DEPTH)
    return {"model_channels": UNET_CHANNELS, "channel_mult": list(mult), "transformer_depth": list(depth),
            "transformer_depth_middle": 1 if kind == "sd1" else depth[-1],
            "attention_resolutions": [2**level for level, d in enumerate(depth) if d],
            "num_head_channels": HEAD_WIDTH, "use_linear_in_transformer": kind == "sdxl"}


def _input_block_channels(unet: Shapes) -> list[int]:
    """Output channels of each input block of a U-Net (its first conv, res blocks, downsamplers)."""
    channels: list[int] = []
    while any(k.startswith(f"input_blocks.{len(channels)}.") for k in unet):
        i = len(channels)
        out = next(unet[k] for k in (f"input_blocks.{i}.0.weight", f"input_blocks.{i}.0.op.weight",
                                     f"input_blocks.{i}.0.out_layers.3.weight") if k in unet)
        channels.append(out[0])
    return channels


def controlnet_shapes(kind: str) -> Shapes:
    """Parameter shapes of the ControlNet of the tiny U-Net of ``kind``."""
    channels = UNET_CHANNELS
    if kind == "sd1":
        unet = unet_shapes()
    elif kind == "forge-sd1":  # as make_forge_sd1_checkpoint: CLIP-L's context
        channels = FORGE_SD1_CHANNELS
        unet = unet_shapes(mc=channels, mult=FORGE_SD1_MULT, ctx=CLIP_L_CONFIG["hidden_size"], depth=FORGE_SD1_DEPTH)
    else:
        text = open_clip_text_shapes()  # as make_tiny_sdxl_checkpoint: CLIP + OpenCLIP context, pooled + sizes
        ctx = TEXT_WIDTH + text["ln_final.weight"][0]
        adm = text["text_projection"][1] + 3 * 2 * SIZE_EMBED
        unet = unet_shapes(mult=SDXL_MULT, ctx=ctx, depth=SDXL_DEPTH, middle=SDXL_DEPTH[-1], linear=True, adm=adm)
    s: Shapes = {k: v for k, v in unet.items() if k.startswith(ENCODER)}
    cin = HINT_CHANNELS
    for j, width in enumerate((*HINT_WIDTHS, channels)):
        _conv(s, f"input_hint_block.{2 * j}", width, cin)  # SiLUs between them
        cin = width
    for i, ch in enumerate(_input_block_channels(unet)):
        _conv(s, f"zero_convs.{i}.0", ch, ch, 1)
    mid = unet["middle_block.2.out_layers.3.weight"][0]
    _conv(s, "middle_block_out.0", mid, mid, 1)
    return s


def adapter_shapes(kind: str) -> Shapes:
    """Parameter shapes of the T2I-Adapter of ``kind`` ("t2i-sd1", "t2i-sdxl"), as the extension's
    ``Adapter(cin, [c, 2c, 4c, 4c], nums_rb=2, ksize=1, sk=True, use_conv=False, is_sdxl)`` has them:
    the RGB control image pixel-unshuffled by 8 (SDXL: 16) into ``cin`` channels, then per level
    two res blocks, the first of a level with a 1x1 ``in_conv`` where the channels change."""
    c = UNET_CHANNELS
    channels = (c, 2 * c, 4 * c, 4 * c)
    s: Shapes = {}
    _conv(s, "conv_in", c, HINT_CHANNELS * (8 if kind == "t2i-sd1" else 16) ** 2)
    previous = c
    for i, ch in enumerate(channels):
        for r in range(2):
            block = f"body.{2 * i + r}"
            if r == 0 and previous != ch:
                _conv(s, f"{block}.in_conv", ch, previous, 1)
            _conv(s, f"{block}.block1", ch, ch)
            _conv(s, f"{block}.block2", ch, ch, 1)
        previous = ch
    return s


def ip_adapter_shapes() -> Shapes:
    """Parameter shapes of the IP-Adapter of the tiny sd1 U-Net: CLIP ViT-H's image embedding
    projected to ``IP_TOKENS`` context tokens, and each cross-attention's extra key and value."""
    unet = unet_shapes()
    s: Shapes = {}
    _linear(s, "image_proj.proj", IP_TOKENS * TEXT_WIDTH, CLIP_H_CONFIG["projection_dim"])
    s["image_proj.norm.weight"] = s["image_proj.norm.bias"] = (TEXT_WIDTH,)
    for n, block in enumerate(IP_SD1_TRANSFORMERS):
        width = unet[f"{block}.transformer_blocks.0.attn2.to_k.weight"][0]
        for kv in ("k", "v"):
            s[f"ip_adapter.{2 * n + 1}.to_{kv}_ip.weight"] = (width, TEXT_WIDTH)
    return s


def clip_h_shapes() -> Shapes:
    """Parameter shapes of the extension's CLIP ViT-H image encoder, as transformers builds it."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_H_CONFIG))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _nonzero_outputs(state: dict[str, torch.Tensor]) -> None:
    """Every conv that a trained ControlNet starts at zero has a non-zero weight here."""
    outputs = [k for k in state if ".zero_convs." in k or ".middle_block_out." in k
               or k == f"{PREFIX}input_hint_block.{2 * len(HINT_WIDTHS)}.weight"]
    zero = [k for k in outputs if k.endswith("weight") and not state[k].abs().sum() > 0]
    if zero or len(outputs) < 4:
        raise RuntimeError(f"zero output convs: {zero or outputs}")


def make_tiny_controlnet(out_dir: pathlib.Path, kind: str = "sd1", seed: int = 0) -> pathlib.Path:
    """Write the ControlNet of ``kind`` into ``out_dir``; return its path."""
    from safetensors.torch import save_file

    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # a seed of its own, so the weights differ from the checkpoint's of the same seed
    if kind == "clip-h":  # a pickle, as the file the extension downloads: it torch.loads it
        path = out_dir / f"{_stem(STEMS[kind], seed)}.pth"
        state = _random(clip_h_shapes(), "", torch.Generator().manual_seed(4000 + seed), torch.float16)
        # the legacy format: the webui's safe unpickler (modules/safe.py) refuses the zip entries
        # a newer torch writes (".format_version"), so the extension would not load the file
        torch.save(state, path, _use_new_zipfile_serialization=False)
        return path
    if kind.startswith("t2i-"):
        state = _random(adapter_shapes(kind), "", torch.Generator().manual_seed(2000 + seed))
    elif kind == "ip-sd1":
        state = _random(ip_adapter_shapes(), "", torch.Generator().manual_seed(3000 + seed))
    else:
        state = _random(controlnet_shapes(kind), PREFIX, torch.Generator().manual_seed(1000 + seed))
        _nonzero_outputs(state)
    if kind == "forge-sd1":  # as the forge-sd1 checkpoint and the released ControlNets
        state = {k: v.half() for k, v in state.items()}
    path = out_dir / f"{_stem(STEMS[kind], seed)}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# ---- in the webui: fit the extension's loader to these models ----

def _tiny_kind(state_dict: dict | None) -> str | None:
    first = (state_dict or {}).get("input_blocks.0.0.weight")
    if first is None or first.shape[0] != UNET_CHANNELS:
        return None
    return "sdxl" if "label_emb.0.0.weight" in state_dict else "sd1"


def _with_tiny_layout(init):
    @functools.wraps(init)
    def __init__(self, config, state_dict=None, *args, **kwargs):
        kind = _tiny_kind(state_dict)
        if kind is None:
            return init(self, config, state_dict, *args, **kwargs)
        config = {**config, **layout(kind)}
        config["context_dim"] = int(next(v for k, v in state_dict.items() if k.endswith("attn2.to_k.weight")).shape[1])
        if kind == "sdxl":
            config["adm_in_channels"] = int(state_dict["label_emb.0.0.weight"].shape[1])
        init(self, config, state_dict, *args, **kwargs)
        own = set(self.control_model.state_dict())
        missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
        if missing or unexpected:
            raise RuntimeError(f"tiny ControlNet ({kind}) does not fit: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
        print(f"tiny ControlNet: loaded with the tiny {kind} layout")

    setattr(__init__, PATCHED, True)
    return __init__


def _strict_for_tiny(load_state_dict):
    @functools.wraps(load_state_dict)
    def wrapper(self, state_dict, strict=True, *args, **kwargs):
        first = state_dict.get("conv_in.weight")
        if first is not None and first.shape[0] == UNET_CHANNELS:  # a tiny T2I-Adapter: every key must fit
            result = load_state_dict(self, state_dict, True, *args, **kwargs)
            print(f"tiny T2I-Adapter: loaded strictly ({type(self).__name__}, {len(state_dict)} tensors)")
            return result
        return load_state_dict(self, state_dict, strict, *args, **kwargs)

    setattr(wrapper, PATCHED, True)
    return wrapper


def _traced_ip_forward(patch_forward, path: str):
    @functools.wraps(patch_forward)
    def wrapper(self, number: int, transformer_index: int):
        forward = patch_forward(self, number, transformer_index)
        # the block, as the extension's hook numbers them (plugable_ipadapter.py PlugableIPAdapter.hook)
        versions = sys.modules[type(self).__module__].StableDiffusionVersion
        ids = versions.SDXL.transformer_ids if self.ipadapter.is_sdxl else versions.SD1x.transformer_ids
        where = list(itertools.chain(*ids))[number]
        kind = where.block_type.value
        block = "middle_block" if kind == "middle" else f"{kind}_blocks.{where.block_id}"

        def traced(attn_blk, x, q):
            out = forward(attn_blk, x, q)
            moved = bool(torch.is_tensor(out) and out.abs().sum() > 0)
            record = {"number": number, "block": block, "tokens": int(x.shape[1]), "moved": moved}
            with open(path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")
            return out

        return traced

    setattr(wrapper, PATCHED, True)
    return wrapper


def patch_controlnet_loader() -> int:
    """Wrap ``PlugableControlModel.__init__`` of every loaded module that has one (the
    extension's ``scripts.cldm``, whose class its loader uses), ``load_state_dict`` of its
    T2I-Adapter class (``scripts.adapter.Adapter``, beside ``PlugableAdapter``) and, with
    ``IP_TRACE`` set, the cross-attention calls of its ``PlugableIPAdapter`` (each call's IP
    number, its block, its token count and whether it added anything); returns how many classes were
    wrapped now (0 without the extension, or when done already)."""
    modules = list(sys.modules.values())
    classes = {getattr(m, "PlugableControlModel", None) for m in modules}
    wrapped = 0
    for cls in classes - {None}:
        if isinstance(cls, type) and not getattr(cls.__init__, PATCHED, False):
            cls.__init__ = _with_tiny_layout(cls.__init__)
            wrapped += 1
    adapters = {getattr(m, "Adapter", None) for m in modules if hasattr(m, "PlugableAdapter")}
    for cls in adapters - {None}:
        if isinstance(cls, type) and not getattr(cls.load_state_dict, PATCHED, False):
            cls.load_state_dict = _strict_for_tiny(cls.load_state_dict)
            wrapped += 1
    trace = os.environ.get(IP_TRACE)
    for cls in {getattr(m, "PlugableIPAdapter", None) for m in modules} - {None}:
        if trace and isinstance(cls, type) and not getattr(cls.patch_forward, PATCHED, False):
            cls.patch_forward = _traced_ip_forward(cls.patch_forward, trace)
            wrapped += 1
    return wrapped


WRITERS = set(STEMS)

if __name__ == "__main__":
    args = sys.argv[1:]
    if not 2 <= len(args) <= 3 or args[1] not in WRITERS or (args[2:] and not args[2].isdigit()):
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR {'|'.join(sorted(WRITERS))} [SEED]")
    print(make_tiny_controlnet(pathlib.Path(args[0]), args[1], int(args[2]) if len(args) > 2 else 0))
elif "modules.script_callbacks" in sys.modules:  # loaded by the webui as an extension's script
    sys.modules["modules.script_callbacks"].on_before_ui(lambda: print(
        f"tiny ControlNet: wrapped {patch_controlnet_loader()} loader class(es)"))
