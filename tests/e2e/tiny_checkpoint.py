"""Write tiny random-weight checkpoints that the AUTOMATIC1111 webui (and Forge) loads offline.

``sd1``: ``tiny-sd1.safetensors``, ``tiny-sd1.yaml`` (the config the webui picks up beside a
checkpoint) and ``tiny-sd1-clip/`` (CLIP tokenizer built from the BPE vocabulary that
open_clip ships, plus a small text-encoder config), so nothing is fetched from a hub. The
U-Net keeps the SD 1.x block layout (12 input blocks, downsamples at 3, 6 and 9, attention at
levels 0-2) with few, 32-wide heads.

``sdxl``: ``tiny-sdxl.safetensors``, ``tiny-sdxl.yaml`` and ``tiny-sdxl-clip/``: an sgm
DiffusionEngine with the SDXL base layout (9 input blocks, downsamples at 3 and 6, attention at
levels 1 and 2 with transformer depth 2, ``adm_in_channels`` for the pooled text and the three
size embeddings), the two text embedders the webui expects for SDXL (a small HF CLIP text model
from the same folder recipe as sd1, and an OpenCLIP text tower with the architecture of the
``ViT-S-32-alt`` config that open_clip ships, so open_clip finds it offline) and a VAE kept
cheap at 2048 px (32 channels, few res blocks, no attention, no resampling convs). The state dict has
``conditioner.embedders.1.model.ln_final.weight`` and no ``...embedders.0.model.ln_final``:
that is how the webui tells the SDXL base from the refiner (modules/sd_models_config.py).

``forge-sd1``: ``tiny-forge-sd1.safetensors`` alone, for Forge 2 (lllyasviel/stable-diffusion-webui-forge,
``backend/``), which takes the model configs and tokenizer from its own ``backend/huggingface/`` and
detects the model from key shapes (``huggingface_guess``): the U-Net keeps SD 1.5's detected
features (``model_channels`` 320, ``context_dim`` 768, 1x1-conv projections; Forge builds 8 heads
of 40) with ``channel_mult`` [1, 1, 1, 1], 2 res blocks a level and attention at levels 0-2, depth
1; the CLIP ViT-L/14 text encoder and the SD VAE keep their full shapes (Forge raises on a shape
mismatch). fp16, keys named as in the original SD 1.5 checkpoint (``model.diffusion_model.``,
``first_stage_model.``, ``cond_stage_model.transformer.text_model.``); about 600 MiB.

``forge-sdxl``: ``tiny-forge-sdxl.safetensors`` alone, the SDXL base for Forge 2: the U-Net keeps SDXL's
detected features (``model_channels`` 320, ``channel_mult`` [1, 2, 4], ``context_dim`` 2048,
``adm_in_channels`` 2816, linear projections; Forge builds heads of 64) with SSD-1B's input depths
[0, 0, 2, 2, 4, 4], the smallest that huggingface_guess matches to a subclass of its ``SDXL`` (so
Forge runs it as ``StableDiffusionXL``, ``is_sdxl`` True; Segmind-Vega's [0, 0, 1, 1, 2, 2] matches
too but has one transformer block at level 1, where HiDiffusion's SDXL block map windows two) and
depth 1 in the middle and the output blocks of level 2 (not matched); CLIP ViT-L/14, the OpenCLIP
ViT-bigG/14 text tower and the SDXL VAE keep their full shapes. fp16, keys as in the original SDXL
base checkpoint (``conditioner.embedders.0.transformer.text_model.``, ``conditioner.embedders.1.model.``);
1.8 G parameters, 3.4 GiB.

``sd3``: ``tiny-sd3.safetensors`` and ``tiny-sd3-hf/`` (a Hugging Face home: set HF_HOME to it).
The webui v1.10.1 has no YAML for SD3 (modules/models/sd3/): it reads the MMDiT's depth, patch
size and position grid from the state dict (here depth 2, so 128 wide and 2 heads; 2x2 patches;
SD3 Medium's 192x192 grid), but builds the VAE and the CLIP-L and CLIP-G text encoders at full
size from fixed configs and downloads CLIP weights a checkpoint lacks: those keep their full
shapes (about 0.9 G parameters, fp16: 1.7 GiB). T5-XXL is off (the webui's default,
``sd3_enable_t5``) and has no weights here. The tokenizers come from the hub by name
(``openai/clip-vit-large-patch14``, ``google/t5-v1_1-xxl``, even with T5 off): ``tiny-sd3-hf/hub``
holds both as a hub cache that transformers reads offline, the CLIP one from open_clip's BPE
vocabulary as for sd1, the T5 one a small Unigram model with T5's special tokens (pad 0, eos 1,
unk 2). The webui tells SD3 by ``model.diffusion_model.x_embedder.proj.weight``.

``sd1-inpaint`` and ``sdxl-inpaint``: the same with the inpainting layouts (9 input channels: latent,
mask, masked-image latent), as the SD 1.5-inpainting and SDXL inpainting checkpoints have them.

``sd2-v``: ``tiny-sd2-v.safetensors`` and ``tiny-sd2-v.yaml``: SD 2.x 768-v, an ldm LatentDiffusion
with ``parameterization: "v"`` (as v2-inference-v.yaml; the YAML beside the checkpoint spares the
webui its v-prediction probe, which builds a full-size SD 2.x U-Net; the webui logs "Creating
model from config: .../tiny-sd2-v.yaml"). The U-Net is sd1's with SD 2.x's linear
projections (``use_linear_in_transformer``) and heads of 32 channels (SD 2.x's 64 would leave
the tiny first level with none), its context the width of the text encoder: ldm's
``FrozenOpenCLIPEmbedder`` (the penultimate layer; ``version`` null, so no pretrained weights are
fetched) with the ``ViT-S-32-alt`` text tower under ``cond_stage_model.model.``, whose final
LayerNorm bias is offset as sd1's (the webui's emphasis divides by the embedding's mean). The
webui sets ``is_sd2`` from that embedder's ``model``.

``sdxl-refiner``: ``tiny-sdxl-refiner.safetensors`` and ``tiny-sdxl-refiner.yaml``: the SDXL refiner
(generative-models' sd_xl_refiner.yaml, shrunk): 4 levels (12 input blocks, downsamples at 3, 6
and 9), attention at levels 1 and 2 (depth 1 instead of 4), one text embedder, the OpenCLIP tower
as in sdxl but at index 0, and ``adm_in_channels`` for its pooled output and five size numbers of
256 (original size, crop, aesthetic score); sdxl's VAE. The state dict has
``conditioner.embedders.0.model.ln_final.weight``, which is how the webui tells the refiner
(modules/sd_models_config.py, when no YAML is beside it).

Weights are random, the same for a given seed. The YAML names the CLIP folder by absolute
path: move them together or rerun. A non-zero SEED writes ``tiny-KIND-seedSEED.*`` and its own
CLIP folder (``forge-sd1``, ``forge-sdxl``: the checkpoint alone; ``sd3``: its own HF home), e.g. a second
SDXL checkpoint to switch to as a refiner (two writers can run at once).

Usage: ``python tests/e2e/tiny_checkpoint.py OUT_DIR [KIND [SEED]]``, KIND one of the above (default sd1; needs torch,
safetensors, omegaconf, transformers, tokenizers and open_clip, as in the webui's or Forge's venv).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import math
import pathlib
import string
import sys

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

STEM = "tiny-sd1"
INPAINT = "-inpaint"  # stem suffix of the inpainting layouts
INPAINT_CHANNELS = 9
UNET_CHANNELS = 32
UNET_MULT = (1, 2, 4, 4)
UNET_DEPTH = (1, 1, 1, 0)  # transformer depth per level (0: no attention)
HEAD_WIDTH = 32
TEXT_WIDTH = 64
TEXT_LAYERS = 2
VAE_CHANNELS = 32
VAE_MULT = (1, 1, 2, 2)
LATENT = 4

SDXL_STEM = "tiny-sdxl"
SDXL_MULT = (1, 2, 4)
SDXL_DEPTH = (0, 2, 2)
OPENCLIP_ARCH = "ViT-S-32-alt"  # a config open_clip ships: 10 layers of width 256 (bigG: 32 of 1280)
SIZE_EMBED = 256  # ConcatTimestepEmbedderND outdim; three of them embed two numbers each
# The VAE decodes 2048 px images: one res block a level on the way up, none on the way down,
# 32 channels throughout (GroupNorm's 32 groups), resampling without convs, no attention.
SDXL_VAE_MULT = (1, 1, 1, 1)
SDXL_VAE_RES = 0

SD2_V_STEM = "tiny-sd2-v"
REFINER_STEM = "tiny-sdxl-refiner"
REFINER_MULT = (1, 2, 4, 4)  # sd_xl_refiner.yaml: four levels, downsamples at input blocks 3, 6 and 9
REFINER_DEPTH = (0, 1, 1, 0)  # attention_resolutions [4, 2]: levels 1 and 2 (the refiner's depth 4 kept at 1)

FORGE_SD1_STEM = "tiny-forge-sd1"
FORGE_SD1_CHANNELS = 320  # huggingface_guess's SD15 needs model_channels 320 and context_dim 768
FORGE_SD1_MULT = (1, 1, 1, 1)  # four levels keep the downsamples at input blocks 3, 6 and 9
FORGE_SD1_DEPTH = (1, 1, 1, 0)
# CLIP ViT-L/14's text encoder, as backend/huggingface/runwayml/stable-diffusion-v1-5/text_encoder
CLIP_L_CONFIG = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
FORGE_SDXL_STEM = "tiny-forge-sdxl"
FORGE_SDXL_CHANNELS = 320  # huggingface_guess's SDXL family: model_channels 320, context_dim 2048, adm 2816
FORGE_SDXL_DEPTH = (0, 2, 4)  # input blocks: SSD-1B's transformer_depth [0, 0, 2, 2, 4, 4]
FORGE_SDXL_DEPTH_OUT = (0, 2, 1)  # output blocks: level 1 keeps the two blocks HiDiffusion windows
CLIP_G_ARCH = "ViT-bigG-14"  # open_clip's config: text width 1280, 32 layers, 20 heads, projection 1280
SD_VAE_CHANNELS = 128
SD_VAE_MULT = (1, 2, 4, 4)
SD_VAE_RES = 2

SD3_STEM = "tiny-sd3"
SD3_DEPTH = 2  # the MMDiT is 64 * depth wide with depth heads (mmdit.py); SD3 Medium: 24
SD3_PATCH = 2
SD3_GRID = 192  # pos_embed_max_size: patch grids up to 192x192 (3072 px), as SD3 Medium
SD3_LATENT = 16
SD3_CONTEXT = 4096  # CLIP-L and CLIP-G features side by side, padded to T5-XXL's width
# (width, layers, MLP width) of sd3_cond.py's CLIPL_CONFIG and CLIPG_CONFIG
SD3_CLIP_L = (768, 12, 3072)
SD3_CLIP_G = (1280, 32, 5120)
SD3_POOLED = SD3_CLIP_L[0] + SD3_CLIP_G[0]
CLIP_VOCAB = 49408
# The hub repositories sd3_cond.py / other_impls.py take the tokenizers from
CLIP_REPO = "openai/clip-vit-large-patch14"
T5_REPO = "google/t5-v1_1-xxl"

Shapes = dict[str, tuple[int, ...]]


def _conv(s: Shapes, name: str, cout: int, cin: int, k: int = 3) -> None:
    s[f"{name}.weight"] = (cout, cin, k, k)
    s[f"{name}.bias"] = (cout,)


def _linear(s: Shapes, name: str, cout: int, cin: int, bias: bool = True) -> None:
    s[f"{name}.weight"] = (cout, cin)
    if bias:
        s[f"{name}.bias"] = (cout,)


def _norm(s: Shapes, name: str, c: int) -> None:
    s[f"{name}.weight"] = (c,)
    s[f"{name}.bias"] = (c,)


def _resblock(s: Shapes, p: str, cin: int, cout: int, temb: int) -> None:
    _norm(s, f"{p}.in_layers.0", cin)
    _conv(s, f"{p}.in_layers.2", cout, cin)
    _linear(s, f"{p}.emb_layers.1", cout, temb)
    _norm(s, f"{p}.out_layers.0", cout)
    _conv(s, f"{p}.out_layers.3", cout, cout)
    if cin != cout:
        _conv(s, f"{p}.skip_connection", cout, cin, 1)


def _transformer(s: Shapes, p: str, c: int, ctx: int, depth: int = 1, linear: bool = False) -> None:
    """A SpatialTransformer; ``linear``: proj_in/out are Linear (SDXL), else 1x1 convs."""
    proj = _linear if linear else (lambda s_, name, cout, cin: _conv(s_, name, cout, cin, 1))
    _norm(s, f"{p}.norm", c)
    proj(s, f"{p}.proj_in", c, c)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, kv in (("attn1", c), ("attn2", ctx)):
            _linear(s, f"{b}.{attn}.to_q", c, c, bias=False)
            _linear(s, f"{b}.{attn}.to_k", c, kv, bias=False)
            _linear(s, f"{b}.{attn}.to_v", c, kv, bias=False)
            _linear(s, f"{b}.{attn}.to_out.0", c, c)
        _linear(s, f"{b}.ff.net.0.proj", 8 * c, c)
        _linear(s, f"{b}.ff.net.2", c, 4 * c)
        for n in ("norm1", "norm2", "norm3"):
            _norm(s, f"{b}.{n}", c)
    proj(s, f"{p}.proj_out", c, c)


def unet_shapes(mc: int = UNET_CHANNELS, mult: tuple[int, ...] = UNET_MULT, ctx: int = TEXT_WIDTH,
                depth: tuple[int, ...] = UNET_DEPTH, middle: int = 1, linear: bool = False, adm: int = 0,
                cin: int = LATENT, depth_out: tuple[int, ...] | None = None) -> Shapes:
    """Parameter shapes of ldm's / sgm's UNetModel (2 res blocks a level, a downsample after
    every level but the last); ``depth[level]`` transformer blocks at a level (0: none),
    ``middle`` in the middle block; ``adm``: input width of the sequential label embedding;
    ``cin``: input channels (9 for an inpainting model: latent, mask, masked image latent);
    ``depth_out``: the output blocks' depths per level where they differ from ``depth``."""
    s: Shapes = {}
    depth_out = depth if depth_out is None else depth_out
    temb = 4 * mc
    _linear(s, "time_embed.0", temb, mc)
    _linear(s, "time_embed.2", temb, temb)
    if adm:
        _linear(s, "label_emb.0.0", temb, adm)
        _linear(s, "label_emb.0.2", temb, temb)
    _conv(s, "input_blocks.0.0", mc, cin)
    chans, ch, i = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(2):
            _resblock(s, f"input_blocks.{i}.0", ch, mc * m, temb)
            ch = mc * m
            if depth[level]:
                _transformer(s, f"input_blocks.{i}.1", ch, ctx, depth[level], linear)
            chans.append(ch)
            i += 1
        if level < len(mult) - 1:
            _conv(s, f"input_blocks.{i}.0.op", ch, ch)
            chans.append(ch)
            i += 1
    _resblock(s, "middle_block.0", ch, ch, temb)
    _transformer(s, "middle_block.1", ch, ctx, middle, linear)
    _resblock(s, "middle_block.2", ch, ch, temb)
    i = 0
    for level, m in reversed(list(enumerate(mult))):
        for j in range(3):
            _resblock(s, f"output_blocks.{i}.0", ch + chans.pop(), mc * m, temb)
            ch, k = mc * m, 1
            if depth_out[level]:
                _transformer(s, f"output_blocks.{i}.1", ch, ctx, depth_out[level], linear)
                k = 2
            if level and j == 2:
                _conv(s, f"output_blocks.{i}.{k}.conv", ch, ch)
            i += 1
    _norm(s, "out.0", ch)
    _conv(s, "out.2", LATENT, ch)
    return s


def _vae_resblock(s: Shapes, p: str, cin: int, cout: int) -> None:
    _norm(s, f"{p}.norm1", cin)
    _conv(s, f"{p}.conv1", cout, cin)
    _norm(s, f"{p}.norm2", cout)
    _conv(s, f"{p}.conv2", cout, cout)
    if cin != cout:
        _conv(s, f"{p}.nin_shortcut", cout, cin, 1)


def _vae_mid(s: Shapes, p: str, c: int, attn: bool) -> None:
    _vae_resblock(s, f"{p}.block_1", c, c)
    if attn:
        _norm(s, f"{p}.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            _conv(s, f"{p}.attn_1.{n}", c, c, 1)
    _vae_resblock(s, f"{p}.block_2", c, c)


def vae_shapes(ch: int = VAE_CHANNELS, mult: tuple[int, ...] = VAE_MULT, nres: int = 1, attn: bool = True,
               resample_conv: bool = True, z: int = LATENT, quant: bool = True) -> Shapes:
    """Parameter shapes of ldm's AutoencoderKL / sgm's AutoencodingEngineLegacy (double_z;
    no attention but the mid blocks', and none there without ``attn``: attn_type "none";
    without ``resample_conv`` the down/upsamplers pool and repeat: resamp_with_conv false);
    ``z`` latent channels; without ``quant`` no quant_conv/post_quant_conv (SD3's SDVAE)."""
    s: Shapes = {}
    _conv(s, "encoder.conv_in", ch, 3)
    c = ch
    for i, m in enumerate(mult):
        for j in range(nres):
            _vae_resblock(s, f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
        if i < len(mult) - 1 and resample_conv:
            _conv(s, f"encoder.down.{i}.downsample.conv", c, c)
    _vae_mid(s, "encoder.mid", c, attn)
    _norm(s, "encoder.norm_out", c)
    _conv(s, "encoder.conv_out", 2 * z, c)
    c = ch * mult[-1]
    _conv(s, "decoder.conv_in", c, z)
    _vae_mid(s, "decoder.mid", c, attn)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            _vae_resblock(s, f"decoder.up.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
        if i and resample_conv:
            _conv(s, f"decoder.up.{i}.upsample.conv", c, c)
    _norm(s, "decoder.norm_out", c)
    _conv(s, "decoder.conv_out", 3, c)
    if quant:
        _conv(s, "quant_conv", 2 * z, 2 * z, 1)
        _conv(s, "post_quant_conv", z, z, 1)
    return s


def open_clip_text_shapes(arch: str = OPENCLIP_ARCH) -> Shapes:
    """Parameter shapes of the text tower of open_clip's CLIP ``arch`` (the visual tower is
    deleted by sgm's FrozenOpenCLIPEmbedder2), read from the config open_clip ships."""
    import open_clip

    config = open_clip.get_model_config(arch)
    if config is None:
        raise RuntimeError(f"open_clip has no model config {arch!r}")
    text, embed = config["text_cfg"], config["embed_dim"]
    w, mlp = text["width"], int(text["width"] * text.get("mlp_ratio", 4.0))
    s: Shapes = {"positional_embedding": (text["context_length"], w), "text_projection": (w, embed),
                 "logit_scale": (), "token_embedding.weight": (text["vocab_size"], w)}
    for i in range(text["layers"]):
        b = f"transformer.resblocks.{i}"
        _norm(s, f"{b}.ln_1", w)
        s[f"{b}.attn.in_proj_weight"] = (3 * w, w)
        s[f"{b}.attn.in_proj_bias"] = (3 * w,)
        _linear(s, f"{b}.attn.out_proj", w, w)
        _norm(s, f"{b}.ln_2", w)
        _linear(s, f"{b}.mlp.c_fc", mlp, w)
        _linear(s, f"{b}.mlp.c_proj", w, mlp)
    _norm(s, "ln_final", w)
    return s


def _random(shapes: Shapes, prefix: str, gen: torch.Generator,
            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Biases 0, norm scales (and scalars) 1, other weights N(0, 1/fan_in): finite activations;
    each cast to ``dtype`` (if given) as it is made, so that only one is ever held in float32."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("bias"):
            t = torch.zeros(shape)
        elif len(shape) <= 1:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        out[prefix + name] = t if dtype is None else t.to(dtype)
    return out


def _bpe_path() -> pathlib.Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip (open-clip-torch) is needed for the CLIP BPE vocabulary")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer(folder: pathlib.Path) -> int:
    """CLIP ViT-L/14's tokenizer (the same 49408-token vocabulary) into ``folder``; returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return len(tokens)


def write_clip_folder(folder: pathlib.Path) -> CLIPTextConfig:
    """CLIP ViT-L/14's tokenizer (write_clip_tokenizer) and a small text-encoder config."""
    config = CLIPTextConfig(
        vocab_size=write_clip_tokenizer(folder),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    config.save_pretrained(str(folder))
    return config


def _clip_text_state(config: CLIPTextConfig, prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's state dict with transformers' own random init, seeded."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_model = CLIPTextModel(config)
    return {prefix + k: v for k, v in text_model.state_dict().items()}


def _stem(base: str, seed: int) -> str:
    return base if seed == 0 else f"{base}-seed{seed}"


def _start(out_dir: pathlib.Path, base: str, seed: int) -> tuple[pathlib.Path, str, pathlib.Path, CLIPTextConfig]:
    """The output folder (made), the files' stem, and the CLIP folder (written) of a checkpoint."""
    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(base, seed)
    clip_dir = out_dir / f"{stem}-clip"
    return out_dir, stem, clip_dir, write_clip_folder(clip_dir)


def _save(out_dir: pathlib.Path, stem: str, state: dict[str, torch.Tensor], yaml_text: str | None) -> pathlib.Path:
    """The checkpoint and its YAML beside it (none when ``yaml_text`` is None); the YAML is
    parsed first so a broken template fails here, not in the webui."""
    if yaml_text is not None:
        OmegaConf.create(yaml_text)
    ckpt = out_dir / f"{stem}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    if yaml_text is not None:
        (out_dir / f"{stem}.yaml").write_text(yaml_text, encoding="utf-8")
    return ckpt


_YAML = """\
model:
  target: ldm.models.diffusion.ddpm.{target}
  params:
    {{linear_start: 0.00085, linear_end: 0.012, num_timesteps_cond: 1, log_every_t: 200, timesteps: 1000,
     first_stage_key: jpg, cond_stage_key: txt, image_size: 64, channels: {z}, cond_stage_trainable: false,
     conditioning_key: {conditioning}, {extra_params}monitor: val/loss_simple_ema, scale_factor: 0.18215,
     use_ema: false,
     unet_config: {{target: ldm.modules.diffusionmodules.openaimodel.UNetModel, params: {{
       image_size: 32, in_channels: {cin}, out_channels: {z}, model_channels: {mc}, attention_resolutions: [4, 2, 1],
       num_res_blocks: 2, channel_mult: {mult}, num_head_channels: {head}, use_spatial_transformer: true,
       use_linear_in_transformer: {linear}, transformer_depth: 1, context_dim: {ctx}, use_checkpoint: false,
       legacy: false}}}},
     first_stage_config: {{target: ldm.models.autoencoder.AutoencoderKL, params: {{
       embed_dim: {z}, monitor: val/rec_loss, lossconfig: {{target: torch.nn.Identity}}, ddconfig: {{
         double_z: true, z_channels: {z}, resolution: 256, in_channels: 3, out_ch: 3, ch: {vch},
         ch_mult: {vmult}, num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}}}}}},
     cond_stage_config: {cond}}}
"""
# ldm's embedder of SD 1.x (the CLIP folder) and SD 2.x (OpenCLIP; version null: no pretrained
# weights, so nothing is fetched; the penultimate layer, as v2-inference-v.yaml)
_CLIP_COND = '{{target: ldm.modules.encoders.modules.FrozenCLIPEmbedder, params: {{version: "{clip}"}}}}'
_OPENCLIP_COND = ("{{target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder,"
                  " params: {{arch: {arch}, version: null, freeze: true, layer: penultimate}}}}")


def make_tiny_checkpoint(out_dir: pathlib.Path, seed: int = 0, inpaint: bool = False) -> pathlib.Path:
    """Write the SD 1.x checkpoint, its YAML and CLIP folder into ``out_dir``; return the checkpoint
    path. ``inpaint``: the SD 1.5-inpainting layout (9 input channels, ldm's LatentInpaintDiffusion
    with the hybrid conditioning of v1-inpainting-inference.yaml)."""
    out_dir, stem, clip_dir, text_config = _start(out_dir, STEM + INPAINT * inpaint, seed)
    gen = torch.Generator().manual_seed(seed)
    state = _random(unet_shapes(cin=INPAINT_CHANNELS if inpaint else LATENT), "model.diffusion_model.", gen)
    state |= _random(vae_shapes(), "first_stage_model.", gen)
    state |= _clip_text_state(text_config, "cond_stage_model.transformer.", seed)
    # The webui rescales the prompt embedding to keep its mean ("Original" emphasis in
    # modules/sd_hijack_clip.py); a random final LayerNorm gives a mean of ~0 and so NaN
    # latents and black images. An offset keeps the mean away from 0.
    state["cond_stage_model.transformer.text_model.final_layer_norm.bias"] += 0.5
    text = _YAML.format(
        target="LatentInpaintDiffusion" if inpaint else "LatentDiffusion",
        conditioning="hybrid" if inpaint else "crossattn",
        # as v1-inpainting-inference.yaml: not a finetuning run (ldm would want its ckpt_path)
        extra_params="finetune_keys: null, " if inpaint else "",
        cin=INPAINT_CHANNELS if inpaint else LATENT,
        z=LATENT,
        mc=UNET_CHANNELS,
        mult=list(UNET_MULT),
        head=HEAD_WIDTH,
        linear="false",
        ctx=TEXT_WIDTH,
        vch=VAE_CHANNELS,
        vmult=list(VAE_MULT),
        cond=_CLIP_COND.format(clip=clip_dir.as_posix()),
    )
    return _save(out_dir, stem, state, text)


def make_tiny_sd2_v_checkpoint(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the SD 2.x 768-v checkpoint and its YAML into ``out_dir``; return the checkpoint path."""
    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    open_clip_shapes = open_clip_text_shapes()
    ctx = open_clip_shapes["ln_final.weight"][0]
    gen = torch.Generator().manual_seed(seed)
    state = _random(unet_shapes(ctx=ctx, linear=True), "model.diffusion_model.", gen)
    state |= _random(vae_shapes(), "first_stage_model.", gen)
    state |= _random(open_clip_shapes, "cond_stage_model.model.", gen)
    # ldm's OpenCLIP embedder ends with ln_final: the same mean-keeping offset as in
    # make_tiny_checkpoint (the webui's "Original" emphasis divides by the embedding's mean)
    state["cond_stage_model.model.ln_final.bias"] += 0.5
    text = _YAML.format(
        target="LatentDiffusion", conditioning="crossattn", extra_params='parameterization: "v", ', cin=LATENT,
        z=LATENT, mc=UNET_CHANNELS, mult=list(UNET_MULT), head=HEAD_WIDTH, linear="true", ctx=ctx,
        vch=VAE_CHANNELS, vmult=list(VAE_MULT), cond=_OPENCLIP_COND.format(arch=OPENCLIP_ARCH),
    )
    return _save(out_dir, _stem(SD2_V_STEM, seed), state, text)


def _size_embedders(*keys: str) -> list[dict]:
    """sgm's ConcatTimestepEmbedderND for each conditioning key (two numbers each, one for the
    aesthetic score)."""
    return [{"is_trainable": False, "input_key": key, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
             "params": {"outdim": SIZE_EMBED}} for key in keys]


# sgm's OpenCLIP embedder as the SDXL configs have it, with the tiny arch and no pretrained weights
_OPENCLIP2 = {"is_trainable": False, "input_key": "txt",
              "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
              "params": {"arch": OPENCLIP_ARCH, "version": None, "freeze": True, "layer": "penultimate",
                         "always_return_pooled": True, "legacy": False}}


def _sgm_config(network: dict, embedders: list[dict]) -> dict:
    """An sgm DiffusionEngine as generative-models' configs/inference/sd_xl_*.yaml, around the
    UNetModel's ``network`` params and the conditioner's ``embedders``, with the tiny VAE."""
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"},
        }},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "num_classes": "sequential", "use_checkpoint": False, "out_channels": LATENT,
            "model_channels": UNET_CHANNELS, "num_res_blocks": 2, "num_head_channels": HEAD_WIDTH,
            "use_spatial_transformer": True, "use_linear_in_transformer": True,
            "spatial_transformer_attn_type": "softmax-xformers", "legacy": False, **network,
        }},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": LATENT, "monitor": "val/rec_loss",
            "ddconfig": {"attn_type": "none", "double_z": True, "z_channels": LATENT, "resolution": 256,
                         "in_channels": 3, "out_ch": 3, "ch": VAE_CHANNELS, "ch_mult": list(SDXL_VAE_MULT),
                         "num_res_blocks": SDXL_VAE_RES, "resamp_with_conv": False, "attn_resolutions": [],
                         "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"},
        }},
    }}}


def _sdxl_config(clip_dir: pathlib.Path, ctx: int, adm: int, cin: int = LATENT) -> dict:
    """configs/inference/sd_xl_base.yaml of generative-models, shrunk (``cin`` 9: the webui's
    configs/sd_xl_inpaint.yaml)."""
    network = {"adm_in_channels": adm, "in_channels": cin, "attention_resolutions": [4, 2],
               "channel_mult": list(SDXL_MULT), "transformer_depth": list(SDXL_DEPTH), "context_dim": ctx}
    return _sgm_config(network, [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         # the penultimate layer, as layer_idx 11 of CLIP ViT-L's 12
         "params": {"layer": "hidden", "layer_idx": TEXT_LAYERS - 1, "version": clip_dir.as_posix()}},
        _OPENCLIP2,
        *_size_embedders("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"),
    ])


def make_tiny_sdxl_checkpoint(out_dir: pathlib.Path, seed: int = 0, inpaint: bool = False) -> pathlib.Path:
    """Write the SDXL base checkpoint, its YAML and CLIP folder into ``out_dir``; return the checkpoint
    path. ``inpaint``: the SDXL inpainting layout (9 input channels; the webui sets ``is_sdxl_inpaint``
    from that and concatenates mask and masked image itself, modules/sd_models_xl.py)."""
    out_dir, stem, clip_dir, text_config = _start(out_dir, SDXL_STEM + INPAINT * inpaint, seed)
    cin = INPAINT_CHANNELS if inpaint else LATENT
    open_clip_shapes = open_clip_text_shapes()
    pooled = open_clip_shapes["text_projection"][1]
    ctx = TEXT_WIDTH + open_clip_shapes["ln_final.weight"][0]
    adm = pooled + 3 * 2 * SIZE_EMBED
    gen = torch.Generator().manual_seed(seed)
    state = _random(unet_shapes(mult=SDXL_MULT, ctx=ctx, depth=SDXL_DEPTH, middle=SDXL_DEPTH[-1], linear=True,
                                adm=adm, cin=cin), "model.diffusion_model.", gen)
    vae = vae_shapes(mult=SDXL_VAE_MULT, nres=SDXL_VAE_RES, attn=False, resample_conv=False)
    state |= _random(vae, "first_stage_model.", gen)
    state |= _random(open_clip_shapes, "conditioner.embedders.1.model.", gen)
    state |= _clip_text_state(text_config, "conditioner.embedders.0.transformer.", seed)
    text = OmegaConf.to_yaml(OmegaConf.create(_sdxl_config(clip_dir, ctx, adm, cin)))
    return _save(out_dir, stem, state, text)


def make_tiny_sdxl_refiner_checkpoint(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the SDXL refiner checkpoint and its YAML into ``out_dir``; return the checkpoint path."""
    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    open_clip_shapes = open_clip_text_shapes()
    ctx = open_clip_shapes["ln_final.weight"][0]
    # the pooled text and five numbers of 256: original size (2), crop (2), aesthetic score (1)
    adm = open_clip_shapes["text_projection"][1] + 5 * SIZE_EMBED
    gen = torch.Generator().manual_seed(seed)
    state = _random(unet_shapes(mult=REFINER_MULT, ctx=ctx, depth=REFINER_DEPTH, linear=True, adm=adm),
                    "model.diffusion_model.", gen)
    vae = vae_shapes(mult=SDXL_VAE_MULT, nres=SDXL_VAE_RES, attn=False, resample_conv=False)
    state |= _random(vae, "first_stage_model.", gen)
    state |= _random(open_clip_shapes, "conditioner.embedders.0.model.", gen)
    network = {"adm_in_channels": adm, "in_channels": LATENT, "attention_resolutions": [4, 2],
               "channel_mult": list(REFINER_MULT), "transformer_depth": 1, "context_dim": ctx}
    config = _sgm_config(network, [_OPENCLIP2, *_size_embedders("original_size_as_tuple", "crop_coords_top_left",
                                                                "aesthetic_score")])
    return _save(out_dir, _stem(REFINER_STEM, seed), state, OmegaConf.to_yaml(OmegaConf.create(config)))


def make_forge_sd1_checkpoint(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the SD 1.5 checkpoint for Forge 2 into ``out_dir`` (no YAML, no CLIP folder: Forge
    ships both); return the checkpoint path."""
    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    text_config = CLIPTextConfig(**CLIP_L_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    state = _random(unet_shapes(mc=FORGE_SD1_CHANNELS, mult=FORGE_SD1_MULT, ctx=text_config.hidden_size,
                                depth=FORGE_SD1_DEPTH), "model.diffusion_model.", gen)
    state |= _random(vae_shapes(ch=SD_VAE_CHANNELS, mult=SD_VAE_MULT, nres=SD_VAE_RES), "first_stage_model.", gen)
    state |= _clip_text_state(text_config, "cond_stage_model.transformer.", seed)
    # Forge's "Original" emphasis (backend/text_processing/emphasis.py) divides by the
    # prompt embedding's mean too: the same offset as in make_tiny_checkpoint.
    state["cond_stage_model.transformer.text_model.final_layer_norm.bias"] += 0.5
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return _save(out_dir, _stem(FORGE_SD1_STEM, seed), state, None)


def make_forge_sdxl_checkpoint(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the SDXL base checkpoint for Forge 2 into ``out_dir`` (no YAML, no CLIP folder: Forge
    ships both); return the checkpoint path."""
    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    text_config = CLIPTextConfig(**CLIP_L_CONFIG)
    open_clip_shapes = open_clip_text_shapes(CLIP_G_ARCH)
    ctx = text_config.hidden_size + open_clip_shapes["ln_final.weight"][0]
    adm = open_clip_shapes["text_projection"][1] + 3 * 2 * SIZE_EMBED
    gen = torch.Generator().manual_seed(seed)
    half = torch.float16  # cast tensor by tensor: 1.8 G parameters would take 7 GB in float32
    state = _random(unet_shapes(mc=FORGE_SDXL_CHANNELS, mult=SDXL_MULT, ctx=ctx, depth=FORGE_SDXL_DEPTH, middle=1,
                                linear=True, adm=adm, depth_out=FORGE_SDXL_DEPTH_OUT), "model.diffusion_model.", gen,
                    half)
    state |= _random(vae_shapes(ch=SD_VAE_CHANNELS, mult=SD_VAE_MULT, nres=SD_VAE_RES), "first_stage_model.", gen, half)
    state |= _random(open_clip_shapes, "conditioner.embedders.1.model.", gen, half)
    state |= _clip_text_state(text_config, "conditioner.embedders.0.transformer.", seed)
    # Forge's SDXL takes both prompt embeddings from the penultimate layer, before the final
    # LayerNorm (backend/diffusion_engine/sdxl.py): no offset needed for the emphasis' mean.
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return _save(out_dir, _stem(FORGE_SDXL_STEM, seed), state, None)


def mmdit_shapes(depth: int = SD3_DEPTH, patch: int = SD3_PATCH, grid: int = SD3_GRID) -> Shapes:
    """Parameter shapes of the webui's SD3 MMDiT (modules/models/sd3/mmdit.py) as BaseModel
    builds it from a state dict: 64 * ``depth`` wide, QKV biases, no QK norm, MLP ratio 4; the
    last joint block's context half is ``pre_only`` (no output projection, no MLP)."""
    h = 64 * depth
    s: Shapes = {"x_embedder.proj.weight": (h, SD3_LATENT, patch, patch), "x_embedder.proj.bias": (h,),
                 "pos_embed": (1, grid * grid, h)}
    for name, cin in (("t_embedder", 256), ("y_embedder", SD3_POOLED)):  # 256: the timestep's frequencies
        _linear(s, f"{name}.mlp.0", h, cin)
        _linear(s, f"{name}.mlp.2", h, h)
    _linear(s, "context_embedder", h, SD3_CONTEXT)
    for i in range(depth):
        for half in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{half}"
            pre_only = half == "context_block" and i == depth - 1
            _linear(s, f"{p}.attn.qkv", 3 * h, h)
            _linear(s, f"{p}.adaLN_modulation.1", (2 if pre_only else 6) * h, h)
            if not pre_only:
                _linear(s, f"{p}.attn.proj", h, h)
                _linear(s, f"{p}.mlp.fc1", 4 * h, h)
                _linear(s, f"{p}.mlp.fc2", h, 4 * h)
    _linear(s, "final_layer.linear", patch * patch * SD3_LATENT, h)
    _linear(s, "final_layer.adaLN_modulation.1", 2 * h, h)
    return s


def sd3_clip_shapes(width: int, layers: int, mlp: int) -> Shapes:
    """Parameter shapes of an SD3 CLIP text encoder (other_impls.py's SDClipModel: transformers'
    key names, a square text projection, a logit scale)."""
    s: Shapes = {"transformer.text_model.embeddings.token_embedding.weight": (CLIP_VOCAB, width),
                 "transformer.text_model.embeddings.position_embedding.weight": (77, width),
                 "transformer.text_projection.weight": (width, width), "logit_scale": ()}
    for i in range(layers):
        b = f"transformer.text_model.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, f"{b}.self_attn.{n}", width, width)
        _norm(s, f"{b}.layer_norm1", width)
        _norm(s, f"{b}.layer_norm2", width)
        _linear(s, f"{b}.mlp.fc1", mlp, width)
        _linear(s, f"{b}.mlp.fc2", width, mlp)
    _norm(s, "transformer.text_model.final_layer_norm", width)
    return s


def _hub_snapshot(hub: pathlib.Path, repo: str) -> pathlib.Path:
    """The snapshot folder of ``repo`` in the hub cache ``hub`` (made), its ref "main" pointing at it."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()  # any 40 hex digits name the one snapshot
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit, encoding="utf-8")
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def write_t5_tokenizer(folder: pathlib.Path) -> None:
    """A T5TokenizerFast with T5's special tokens (pad 0, eos 1 appended to every text, unk 2) and
    a Unigram vocabulary of single letters: the webui only tokenizes with it when T5 is on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pieces = ["\u2581", *string.ascii_lowercase, *(f"\u2581{c}" for c in string.ascii_lowercase)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(piece, -float(len(piece))) for piece in pieces]
    model = Tokenizer(models.Unigram(vocab, 2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    model.save(str(folder / "tokenizer.json"))
    # extra_ids 0: T5's 100 sentinel tokens would only be added tokens here
    T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), extra_ids=0).save_pretrained(str(folder))


def make_tiny_sd3_checkpoint(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the SD3 checkpoint and its HF home (the two tokenizers) into ``out_dir``; return the
    checkpoint path."""
    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(SD3_STEM, seed)
    hub = out_dir / f"{stem}-hf" / "hub"
    write_clip_tokenizer(_hub_snapshot(hub, CLIP_REPO))
    write_t5_tokenizer(_hub_snapshot(hub, T5_REPO))
    # the cache layout's version: without it transformers takes the folder for a pre-4.22 cache
    (hub / "version.txt").write_text("1", encoding="utf-8")
    gen = torch.Generator().manual_seed(seed)
    half = torch.float16  # cast tensor by tensor: CLIP-G alone has 0.7 G parameters
    state = _random(mmdit_shapes(), "model.diffusion_model.", gen, half)
    vae = vae_shapes(ch=SD_VAE_CHANNELS, mult=SD_VAE_MULT, nres=SD_VAE_RES, z=SD3_LATENT, quant=False)
    state |= _random(vae, "first_stage_model.", gen, half)
    # sd3_cond.py downloads the weights of a text encoder whose position embedding is missing
    state |= _random(sd3_clip_shapes(*SD3_CLIP_L), "text_encoders.clip_l.", gen, half)
    state |= _random(sd3_clip_shapes(*SD3_CLIP_G), "text_encoders.clip_g.", gen, half)
    return _save(out_dir, stem, state, None)


WRITERS = {"sd1": make_tiny_checkpoint, "sdxl": make_tiny_sdxl_checkpoint, "forge-sd1": make_forge_sd1_checkpoint,
           "forge-sdxl": make_forge_sdxl_checkpoint, "sd3": make_tiny_sd3_checkpoint,
           "sd1-inpaint": functools.partial(make_tiny_checkpoint, inpaint=True),
           "sdxl-inpaint": functools.partial(make_tiny_sdxl_checkpoint, inpaint=True),
           "sd2-v": make_tiny_sd2_v_checkpoint, "sdxl-refiner": make_tiny_sdxl_refiner_checkpoint}

if __name__ == "__main__":
    args = sys.argv[1:]
    if not 1 <= len(args) <= 3 or (args[1:] and args[1] not in WRITERS) or (args[2:] and not args[2].isdigit()):
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR [{'|'.join(WRITERS)} [SEED]]")
    print(WRITERS[args[1] if len(args) > 1 else "sd1"](pathlib.Path(args[0]), int(args[2]) if len(args) > 2 else 0))
