"""Write a tiny random-weight SD 1.x checkpoint that the AUTOMATIC1111 webui loads offline.

Output in ``out_dir``: ``tiny-sd1.safetensors``, ``tiny-sd1.yaml`` (the config the webui
picks up beside a checkpoint) and ``tiny-sd1-clip/`` (CLIP tokenizer built from the BPE
vocabulary that open_clip ships, plus a small text-encoder config), so nothing is fetched
from a hub. The U-Net keeps the SD 1.x block layout (12 input blocks, downsamples at 3, 6
and 9, attention at levels 0-2) with few, 32-wide heads; weights are random, the same for a
given seed. The YAML names the CLIP folder by absolute path: move the three together or rerun.

Usage: ``python tests/e2e/tiny_checkpoint.py OUT_DIR`` (needs torch, safetensors,
omegaconf, transformers and open_clip, as in the webui's venv).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import pathlib
import sys

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.models.clip.tokenization_clip import bytes_to_unicode

STEM = "tiny-sd1"
UNET_CHANNELS = 32
UNET_MULT = (1, 2, 4, 4)
HEAD_WIDTH = 32
TEXT_WIDTH = 64
VAE_CHANNELS = 32
VAE_MULT = (1, 1, 2, 2)
LATENT = 4

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


def _transformer(s: Shapes, p: str, c: int, ctx: int) -> None:
    _norm(s, f"{p}.norm", c)
    _conv(s, f"{p}.proj_in", c, c, 1)
    b = f"{p}.transformer_blocks.0"
    for attn, kv in (("attn1", c), ("attn2", ctx)):
        _linear(s, f"{b}.{attn}.to_q", c, c, bias=False)
        _linear(s, f"{b}.{attn}.to_k", c, kv, bias=False)
        _linear(s, f"{b}.{attn}.to_v", c, kv, bias=False)
        _linear(s, f"{b}.{attn}.to_out.0", c, c)
    _linear(s, f"{b}.ff.net.0.proj", 8 * c, c)
    _linear(s, f"{b}.ff.net.2", c, 4 * c)
    for n in ("norm1", "norm2", "norm3"):
        _norm(s, f"{b}.{n}", c)
    _conv(s, f"{p}.proj_out", c, c, 1)


def unet_shapes(mc: int = UNET_CHANNELS, mult: tuple[int, ...] = UNET_MULT, ctx: int = TEXT_WIDTH) -> Shapes:
    """Parameter shapes of ldm's UNetModel (SD 1.x layout, 2 res blocks a level)."""
    s: Shapes = {}
    temb = 4 * mc
    _linear(s, "time_embed.0", temb, mc)
    _linear(s, "time_embed.2", temb, temb)
    _conv(s, "input_blocks.0.0", mc, LATENT)
    chans, ch, i = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(2):
            _resblock(s, f"input_blocks.{i}.0", ch, mc * m, temb)
            ch = mc * m
            if level < len(mult) - 1:
                _transformer(s, f"input_blocks.{i}.1", ch, ctx)
            chans.append(ch)
            i += 1
        if level < len(mult) - 1:
            _conv(s, f"input_blocks.{i}.0.op", ch, ch)
            chans.append(ch)
            i += 1
    _resblock(s, "middle_block.0", ch, ch, temb)
    _transformer(s, "middle_block.1", ch, ctx)
    _resblock(s, "middle_block.2", ch, ch, temb)
    i = 0
    for level, m in reversed(list(enumerate(mult))):
        for j in range(3):
            _resblock(s, f"output_blocks.{i}.0", ch + chans.pop(), mc * m, temb)
            ch, k = mc * m, 1
            if level < len(mult) - 1:
                _transformer(s, f"output_blocks.{i}.1", ch, ctx)
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


def _vae_mid(s: Shapes, p: str, c: int) -> None:
    _vae_resblock(s, f"{p}.block_1", c, c)
    _norm(s, f"{p}.attn_1.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _conv(s, f"{p}.attn_1.{n}", c, c, 1)
    _vae_resblock(s, f"{p}.block_2", c, c)


def vae_shapes(ch: int = VAE_CHANNELS, mult: tuple[int, ...] = VAE_MULT, nres: int = 1) -> Shapes:
    """Parameter shapes of ldm's AutoencoderKL (double_z, no attention but the mid block's)."""
    s: Shapes = {}
    _conv(s, "encoder.conv_in", ch, 3)
    c = ch
    for i, m in enumerate(mult):
        for j in range(nres):
            _vae_resblock(s, f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
        if i < len(mult) - 1:
            _conv(s, f"encoder.down.{i}.downsample.conv", c, c)
    _vae_mid(s, "encoder.mid", c)
    _norm(s, "encoder.norm_out", c)
    _conv(s, "encoder.conv_out", 2 * LATENT, c)
    c = ch * mult[-1]
    _conv(s, "decoder.conv_in", c, LATENT)
    _vae_mid(s, "decoder.mid", c)
    for i in reversed(range(len(mult))):
        for j in range(nres + 1):
            _vae_resblock(s, f"decoder.up.{i}.block.{j}", c, ch * mult[i])
            c = ch * mult[i]
        if i:
            _conv(s, f"decoder.up.{i}.upsample.conv", c, c)
    _norm(s, "decoder.norm_out", c)
    _conv(s, "decoder.conv_out", 3, c)
    _conv(s, "quant_conv", 2 * LATENT, 2 * LATENT, 1)
    _conv(s, "post_quant_conv", LATENT, LATENT, 1)
    return s


def _random(shapes: Shapes, prefix: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Biases 0, norm scales 1, other weights N(0, 1/fan_in): finite activations throughout."""
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        out[prefix + name] = t
    return out


def _bpe_path() -> pathlib.Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip (open-clip-torch) is needed for the CLIP BPE vocabulary")
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_folder(folder: pathlib.Path) -> CLIPTextConfig:
    """CLIP ViT-L/14's tokenizer (same 49408-token vocabulary) and a small text-encoder config."""
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
    config = CLIPTextConfig(
        vocab_size=len(tokens),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    config.save_pretrained(str(folder))
    return config


_YAML = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    {{linear_start: 0.00085, linear_end: 0.012, num_timesteps_cond: 1, log_every_t: 200, timesteps: 1000,
     first_stage_key: jpg, cond_stage_key: txt, image_size: 64, channels: {z}, cond_stage_trainable: false,
     conditioning_key: crossattn, monitor: val/loss_simple_ema, scale_factor: 0.18215, use_ema: false,
     unet_config: {{target: ldm.modules.diffusionmodules.openaimodel.UNetModel, params: {{
       image_size: 32, in_channels: {z}, out_channels: {z}, model_channels: {mc}, attention_resolutions: [4, 2, 1],
       num_res_blocks: 2, channel_mult: {mult}, num_head_channels: {head}, use_spatial_transformer: true,
       transformer_depth: 1, context_dim: {ctx}, use_checkpoint: false, legacy: false}}}},
     first_stage_config: {{target: ldm.models.autoencoder.AutoencoderKL, params: {{
       embed_dim: {z}, monitor: val/rec_loss, lossconfig: {{target: torch.nn.Identity}}, ddconfig: {{
         double_z: true, z_channels: {z}, resolution: 256, in_channels: 3, out_ch: 3, ch: {vch},
         ch_mult: {vmult}, num_res_blocks: 1, attn_resolutions: [], dropout: 0.0}}}}}},
     cond_stage_config: {{target: ldm.modules.encoders.modules.FrozenCLIPEmbedder, params: {{version: "{clip}"}}}}}}
"""


def make_tiny_checkpoint(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the checkpoint, its YAML and CLIP folder into ``out_dir``; return the checkpoint path."""
    out_dir = pathlib.Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_dir = out_dir / f"{STEM}-clip"
    text_config = write_clip_folder(clip_dir)
    gen = torch.Generator().manual_seed(seed)
    state = _random(unet_shapes(), "model.diffusion_model.", gen)
    state |= _random(vae_shapes(), "first_stage_model.", gen)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_model = CLIPTextModel(text_config)
    state |= {f"cond_stage_model.transformer.{k}": v for k, v in text_model.state_dict().items()}
    ckpt = out_dir / f"{STEM}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    text = _YAML.format(
        z=LATENT,
        mc=UNET_CHANNELS,
        mult=list(UNET_MULT),
        head=HEAD_WIDTH,
        ctx=TEXT_WIDTH,
        vch=VAE_CHANNELS,
        vmult=list(VAE_MULT),
        clip=clip_dir.as_posix(),
    )
    OmegaConf.create(text)  # fail here, not in the webui, if the template is broken
    (out_dir / f"{STEM}.yaml").write_text(text, encoding="utf-8")
    return ckpt


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    print(make_tiny_checkpoint(pathlib.Path(sys.argv[1])))
