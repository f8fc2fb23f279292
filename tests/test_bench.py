"""The benchmark: end to end on narrow copies of the real architectures, its FLOP counts against
hand-computed attention savings, its memory measurement, schedule phases and target checks."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from ldm.modules.attention import CrossAttention
from PIL import Image

import hidiffusion_lib as hd
from hidiffusion_lib.bench.__main__ import main
from hidiffusion_lib.bench.attention import ldm_attention, sdp_forward
from hidiffusion_lib.bench.flops import count_flops
from hidiffusion_lib.bench.measure import measure
from hidiffusion_lib.bench.models import build_unet, example_inputs
from hidiffusion_lib.bench.plan import configs, phases, step_ranges
from hidiffusion_lib.bench.reference import diffusers_config
from hidiffusion_lib.bench.report import checks
from hidiffusion_lib.bench.results import ConfigResult, SizeResult, Timing

pytestmark = pytest.mark.filterwarnings("ignore:HiDiffusion Warning:UserWarning")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["--arch", "sd15", "sdxl", "--channels", "32", "--size", "128x192", "--steps", "10",
            "--compare-reference", "--threads", "1", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    return out


def test_end_to_end_outputs(bench_run, capsys):
    data = json.loads((bench_run / "bench.json").read_text())
    sd15, sdxl = data["sizes"]
    assert [c["key"] for c in sd15["configs"]] == ["vanilla", "idle", "mswmsa", "raunet"]
    assert [c["key"] for c in sdxl["configs"]] == ["vanilla", "idle", "mswmsa", "raunet", "raunet_extra"]
    assert sd15["preset"] == "sd15_1024" and sd15["t1"] == 0.4
    for size in (sd15, sdxl):
        for config in size["configs"]:
            assert config["engine"]["seconds"] and config["engine"]["flops"] > 0
            assert config["engine"]["peak_bytes"] > 0
            if config["key"] == "idle":
                assert config["reference"] is None
                continue
            # Same weights, inputs and window shifts: the authors' package computes the same thing,
            # with the same FLOPs but for the RAU upsampler's conv, which runs on a x3 map, not x4.
            assert config["max_diff"] < 1e-4, config
            ours, theirs = config["engine"]["flops"], config["reference"]["flops"]
            rad = config["switches"][1 if size["arch"] == "sdxl" else 0]  # the switch that upsamples x4
            assert ours < theirs if rad else ours == theirs, config["key"]
        vanilla, hidiffusion = size["generation"]["engine"]
        assert vanilla > 0 and hidiffusion > 0
        assert size["checks"]
    # 10 steps at T1 0.4: 4 RAU-Net steps, 6 MSW-MSA-only steps
    assert sd15["configs"][3]["steps"] == [0, 1, 2, 3] and sd15["configs"][2]["steps"] == [4, 5, 6, 7, 8, 9]

    with (bench_run / "bench.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 + 3 + 5 + 4  # engine rows, reference rows (no idle)
    assert {r["implementation"] for r in rows} == {"engine", "reference"}
    assert all(float(r["seconds_best"]) > 0 for r in rows)

    with Image.open(bench_run / "bench.png") as chart:
        assert chart.format == "PNG" and chart.width >= 800 and chart.height >= 300
        assert len(chart.convert("RGB").getcolors(maxcolors=1 << 16)) > 3  # bars were drawn


def test_table_is_printed(tmp_path, capsys):
    assert main(["--channels", "32", "--size", "64x64", "--no-idle", "--no-memory", "--threads", "1",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vanilla (unpatched)" in out and "RAU-Net + MSW-MSA" in out and "whole generation, 20 steps" in out
    assert "steps 0-7" in out and "n/a" in out  # --no-memory


def test_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "1000x1001", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "multiples of 8" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran, nothing written


def _flops(unet, inputs, settings=None, step=0, steps=10):
    x, t, context = inputs
    with ldm_attention("sdp"), torch.no_grad():
        if settings is None:
            return count_flops(lambda: unet(x, timesteps=t, context=context))
        with hd.apply(unet, settings) as handle:
            handle.set_step(step, steps)
            return count_flops(lambda: unet(x, timesteps=t, context=context))


@pytest.mark.parametrize(("arch", "level", "blocks"), [("sd15", 0, 5), ("sdxl", 1, 10)])
def test_mswmsa_saves_exactly_three_quarters_of_windowed_attention(arch, level, blocks):
    """Self-attention over N tokens costs 4*B*C*N^2 (QK^T and AV); four windows of N/4 tokens
    cost a quarter of it. Nothing else may change."""
    unet = build_unet(arch, None, "meta", channels=32)
    batch, h, w = 2, 16, 24
    inputs = example_inputs(unet, batch, h, w)
    vanilla = _flops(unet, inputs)
    windowed = _flops(unet, inputs, hd.Settings(raunet=False))
    tokens = (h >> level) * (w >> level)
    width = 32 * unet.channel_mult[level]
    assert vanilla - windowed == blocks * 3 * batch * width * tokens**2
    assert _flops(unet, inputs, hd.Settings(mswmsa=False, t1=0.0, t2=0.0, aggressive=False)) == vanilla
    assert _flops(unet, inputs, hd.Settings()) < windowed  # step 0: a RAU-Net switch is on


def test_cpu_count_equals_meta_count():
    """The CPU's fused attention kernel is counted (PyTorch's counter alone gives it 0)."""
    meta = build_unet("sd15", None, "meta", channels=32)
    cpu = build_unet("sd15", 0, channels=32)
    assert _flops(cpu, example_inputs(cpu, 2, 16, 16)) == _flops(meta, example_inputs(meta, 2, 16, 16)) > 0


def test_sdp_swap_matches_ldm_attention_and_is_restored():
    unet = build_unet("sd15", 0, channels=32)
    x, t, context = example_inputs(unet, 2, 16, 16)
    original = CrossAttention.forward
    with torch.no_grad():
        plain = unet(x, timesteps=t, context=context)
        with ldm_attention("sdp"):
            assert CrossAttention.forward is sdp_forward
            sdp = unet(x, timesteps=t, context=context)
    assert CrossAttention.forward is original
    assert ((sdp - plain).abs().max() / plain.abs().max()).item() < 1e-5
    with pytest.raises(ValueError, match="unknown attention"), ldm_attention("xformers"):
        pass


def test_real_architectures():
    """Parameter counts of the released U-Nets (SDXL's without its 5,245,440-parameter label_emb)."""
    counts = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684 - 5_245_440}
    for arch, count in counts.items():
        unet = build_unet(arch, None, "meta")
        assert sum(p.numel() for p in unet.parameters()) == count, arch
        assert hd.detect(unet).arch == {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[arch]
    config = diffusers_config(build_unet("sdxl", None, "meta"))
    assert config["transformer_layers_per_block"][1:] == [2, 10] and config["attention_head_dim"] == [20, 10, 20]
    assert config["cross_attention_dim"] == 2048 and config["use_linear_projection"]
    assert diffusers_config(build_unet("sd15", None, "meta"))["attention_head_dim"] == [8, 8, 8, 8]


def test_cpu_peak_memory_follows_allocations():
    a = torch.randn(512, 512)  # 1 MiB

    def work():
        b = a @ a  # +1 MiB
        c = b + 1  # +1 MiB: 2 MiB live
        del b
        return c * 2  # b freed first: still 2 MiB at most

    sample, _ = measure(work, torch.device("cpu"))
    assert 2 * 2**20 <= sample.peak_bytes < 2 * 2**20 + 4096
    assert sample.profiled and sample.seconds > 0
    assert measure(work, torch.device("cpu"), memory=False)[0].peak_bytes is None


def test_phases_of_the_presets():
    sd2048 = hd.resolve(hd.Settings(), "sd1", 256, 256)
    assert phases(sd2048, 20) == {(True, True): tuple(range(6)), (True, False): tuple(range(6, 14)),
                                  (False, False): tuple(range(14, 20))}
    xl = hd.resolve(hd.Settings(), "sdxl", 256, 256)  # aggressive: extra RAD first, then the pool
    assert [c.key for c in configs(xl, 50, hd.Settings())] == [
        "vanilla", "idle", "mswmsa", "raunet", "raunet_extra"]
    assert phases(xl, 50)[(False, True)] == tuple(range(8))
    assert step_ranges((0, 1, 2, 5, 7, 8)) == "0-2, 5, 7-8"


def _size(ours: dict, theirs: dict, flops: dict, peaks: dict, idle_cost: float) -> SizeResult:
    size = SizeResult("sd15", 1024, 1024, 2, 20, "sd15_1024", 0.4, 0.0, False, idle_cost=idle_cost)
    for key, switches in (("vanilla", (False, False)), ("idle", (False, False)), ("mswmsa", (False, False)),
                          ("raunet", (True, False))):
        reference = None if key == "idle" else Timing([theirs[key]], peaks[key], flops[key])
        size.configs.append(ConfigResult(key, key, (), switches, Timing([ours[key]], peaks[key], flops[key]),
                                         reference))
    return size


def test_checks_can_fail():
    flops = {"vanilla": 100, "idle": 100, "mswmsa": 70, "raunet": 40}
    peaks = {"vanilla": 10, "idle": 10, "mswmsa": 10, "raunet": 9}
    good = _size({"vanilla": 10.0, "idle": 10.05, "mswmsa": 7.0, "raunet": 4.0},
                 {"vanilla": 10.0, "mswmsa": 7.5, "raunet": 4.4}, flops, peaks, idle_cost=0.05)
    assert all(ok for _, ok in checks(good))
    bad = _size({"vanilla": 10.0, "idle": 10.2, "mswmsa": 8.0, "raunet": 5.0},
                {"vanilla": 10.0, "mswmsa": 7.5, "raunet": 4.4}, flops, dict(peaks, mswmsa=11), idle_cost=0.2)
    failed = [name for name, ok in checks(bad) if not ok]
    assert len(failed) == 5, failed  # idle overhead, both speed-ups, FLOP ratio, memory
