"""The benchmark: end to end on narrow copies of the real architectures, its FLOP counts against
hand-computed attention savings, its memory measurement, schedule phases and target checks."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from ldm.modules.attention import CrossAttention
from PIL import Image

import hidiffusion_lib as hd
from hidiffusion_lib.bench import hypertile as ht
from hidiffusion_lib.bench.__main__ import main
from hidiffusion_lib.bench.attention import ldm_attention, sdp_forward
from hidiffusion_lib.bench.flops import count_flops
from hidiffusion_lib.bench.hires import Hires, second_pass
from hidiffusion_lib.bench.hires import plan as hires_plan
from hidiffusion_lib.bench.measure import measure
from hidiffusion_lib.bench.models import build_unet, example_inputs
from hidiffusion_lib.bench.plan import configs, phases, step_ranges
from hidiffusion_lib.bench.progress import Progress
from hidiffusion_lib.bench.reference import diffusers_config
from hidiffusion_lib.bench.report import checks
from hidiffusion_lib.bench.results import ConfigResult, HypertileRun, SizeResult, Timing
from hidiffusion_lib.bench.runner import Options, _count_size, _Sides, run
from hidiffusion_lib.bench.summary import rows as summary_rows
from hidiffusion_lib.wrapping import is_ours

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


# --- the routes a webui user chooses between: Hypertile, both, hires fix -------------------------

WEBUI_DIR = os.environ.get("WEBUI_DIR")
needs_webui = pytest.mark.skipif(not WEBUI_DIR, reason="WEBUI_DIR is not set: no webui Hypertile to run")


def test_hires_second_pass_follows_the_webui():
    """sample_hr_pass passes its steps, so setup_img2img_steps stretches the schedule instead of
    cutting the steps: 20 steps at 0.7 run sigmas 8..28 of 28 steps, 20 U-Net steps."""
    assert second_pass(20) == (20, 28, 8)
    assert second_pass(20, denoising=0.75) == (20, 26, 6)  # the API's default strength
    assert second_pass(20, hr_second_pass_steps=30) == (30, 42, 12)
    assert second_pass(20, denoising=1.0) == (20, 20, 0)
    with pytest.raises(ValueError, match="denoising"):
        second_pass(20, denoising=0)
    at_1024, at_2048 = hires_plan("sd15", 1024, 1024, 20), hires_plan("sd15", 2048, 2048, 20)
    assert (at_1024.first, at_1024.scale, at_2048.first, at_2048.scale) == ((512, 512), 2, (512, 512), 4)
    assert hires_plan("sdxl", 2048, 2048, 20).first == (1024, 1024)
    assert hires_plan("sd15", 512, 512, 20) is None  # nothing to upscale from
    assert hires_plan("sd15", 256, 384, 20, scale=2).first == (128, 192)
    assert hires_plan("sd15", 64, 64, 20, scale=2) is None  # a 32 px first pass: too small for the U-Net


def _routes_size() -> SizeResult:
    size = SizeResult("sd15", 1024, 1024, 1, 4, "sd15_1024", 0.5, 0.0, False,
                      hires=Hires((512, 512), 2.0, 4, 4, 5, 1, 0.7))
    rows = [("vanilla", (0, 1, 2, 3), (False, False), 10.0, 100, None, 0),
            ("mswmsa", (2, 3), (False, False), 8.0, 80, None, 2),
            ("raunet", (0, 1), (True, False), 4.0, 40, None, 0),
            ("hypertile", (0, 1, 2, 3), (False, False), 7.0, 70, "hypertile", 1),
            ("raunet_hypertile", (0, 1), (True, False), 3.0, 30, "both", 1),
            ("hires_first", (0, 1, 2, 3), (False, False), 2.0, 20, "hires", 0)]
    for key, steps, switches, seconds, flops, route, step in rows:
        size.configs.append(ConfigResult(key, key, steps, switches, Timing([seconds, seconds + 1], None, flops),
                                         route=route, step=step, pixels=(512, 512) if route == "hires" else None))
    size.hypertile = HypertileRun("hypertile.py", 3, 256, 3, 0, {"hypertile": [60, 70, 80, 70],
                                                                 "both": [30, 30, 75, 65]})
    return size


def test_route_totals_from_timed_forwards():
    size = _routes_size()
    assert size.route_total("vanilla") == 40.0
    assert size.route_total("hidiffusion") == 2 * 8.0 + 2 * 4.0
    assert size.route_total("hires") == 4 * 2.0 + 4 * 10.0 and size.route_total("hires", what="flops") == 480
    # Hypertile's tiling saves (10 - 7) s for (100 - 70) FLOPs here: 0.1 s per FLOP
    assert size.hypertile_slope() == pytest.approx(0.1)
    assert size.route_total("hypertile") == pytest.approx(7 + 0.1 * -10 + 7 + 7 + 0.1 * 10 + 7)
    assert size.route_total("hypertile", what="flops") == 280
    # both: steps 0-1 are the RAU-Net state (timed at 30 FLOPs), steps 2-3 Hypertile alone (timed at 70)
    assert size.route_total("both") == pytest.approx(3 + 3 + (7 + 0.1 * 5) + (7 - 0.1 * 5))
    assert size.routes() == ["hidiffusion", "hypertile", "both", "hires"]
    assert size.speedup("hires_first") is None and size.flop_ratio("hires_first") is None  # another size
    assert [c.key for c in size.phases()] == ["mswmsa", "raunet"]
    assert size.routes("reference") == []  # nothing timed on the authors' side here
    table = summary_rows([size])
    labels = [r[0] for r in table]
    assert "whole generation: hires fix from 512x512 (4 + 4 steps)" in labels
    assert "one step: HiDiffusion: raunet" in labels and "one step: raunet_hypertile" in labels


def test_progress_covers_every_planned_forward():
    class Recorder(Progress):
        def __init__(self):
            self.planned_args, self.done = None, []

        def planned(self, flops, seconds, forwards):
            self.planned_args = (flops, seconds, forwards)

        def did(self, flops):
            self.done.append(flops)

    recorder = Recorder()
    options = Options(sizes=[(128, 128)], batch=1, steps=3, memory=False, channels=32, threads=1, hires_scale=2)
    result = run(options, recorder)
    flops, seconds, forwards = recorder.planned_args
    assert flops == sum(recorder.done) > 0 and forwards == len(recorder.done) == 1 + options.forwards()
    assert seconds > 0 and result.meta["expected_seconds"] == seconds
    assert [c.key for c in result.sizes[0].configs] == ["vanilla", "idle", "mswmsa", "raunet", "hires_first"]


def test_without_a_webui_the_hypertile_rows_are_skipped(tmp_path, capsys):
    missing = tmp_path / "no-webui"
    assert main(["--channels", "32", "--size", "64x64", "--steps", "3", "--no-idle", "--no-memory", "--no-hires",
                 "--threads", "1", "--device", "cpu", "--hypertile", str(missing), "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"no webui Hypertile at {missing}" in captured.err and "skipping the Hypertile rows" in captured.err
    assert "Hypertile: not run (no webui Hypertile at" in captured.out
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [c["key"] for c in data["sizes"][0]["configs"]] == ["vanilla", "mswmsa", "raunet"]
    assert list(data["sizes"][0]["routes"]) == ["vanilla", "hidiffusion"]
    assert data["meta"]["complete"] is True and data["meta"]["elapsed_seconds"] > 0


def test_hypertile_defaults_are_read_from_the_script(tmp_path):
    script = tmp_path / "hypertile_script.py"
    script.write_text('options = {\n'
                      '  "hypertile_max_depth_unet": shared.OptionInfo(2, "d", gr.Slider, {}).info("x"),\n'
                      '  "hypertile_max_tile_unet": shared.OptionInfo(192, "t"),\n'
                      '  "hypertile_swap_size_unet": shared.OptionInfo(5, "s", infotext="s").info("a").info("b"),\n'
                      '  "hypertile_max_tile_vae": shared.OptionInfo(128, "v"),\n}\n')
    assert ht.read_defaults(script) == {"max_depth": 2, "tile_size_max": 192, "swap_size": 5}
    script.write_text('options = {"hypertile_max_depth_unet": shared.OptionInfo(3, "d")}\n')
    with pytest.raises(ValueError, match="hypertile_max_tile_unet, hypertile_swap_size_unet"):
        ht.read_defaults(script)
    with pytest.raises(FileNotFoundError, match="no Hypertile engine"):
        ht.load(tmp_path)


@needs_webui
def test_hypertile_rows_end_to_end(tmp_path, capsys):
    args = ["--channels", "32", "--size", "256x384", "--steps", "5", "--hires-scale", "2", "--threads", "1",
            "--device", "cpu", "--hypertile", WEBUI_DIR, "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    size = json.loads((tmp_path / "bench.json").read_text())["sizes"][0]
    configs = {c["key"]: c for c in size["configs"]}
    assert list(configs) == ["vanilla", "idle", "mswmsa", "raunet", "hypertile", "raunet_hypertile", "hires_first"]
    run_ = size["hypertile"]
    assert (run_["max_depth"], run_["tile_size_max"], run_["swap_size"]) == (3, 256, 3)  # the webui's defaults
    assert run_["path"] == str((Path(WEBUI_DIR) / ht.ENGINE).resolve())
    vanilla = configs["vanilla"]["engine"]["flops"]
    for route, key in (("hypertile", "hypertile"), ("both", "raunet_hypertile")):
        flops, config = run_["pass_flops"][route], configs[key]
        assert len(flops) == 5 and config["route"] == route
        steps = config["steps"]
        mean = sum(flops[s] for s in steps) / len(steps)
        assert config["step"] == min(steps, key=lambda s: abs(flops[s] - mean))  # the timed step
        assert config["engine"]["flops"] == flops[config["step"]] and config["engine"]["seconds"]
    assert sum(run_["pass_flops"]["hypertile"]) < 5 * vanilla  # it tiled
    both = run_["pass_flops"]["both"]
    assert max(both[:2]) < min(both[2:])  # RAU-Net's steps 0-1 (T1 0.4), then Hypertile alone
    assert configs["raunet_hypertile"]["steps"] == configs["raunet"]["steps"] == [0, 1]
    assert set(size["routes"]) == {"vanilla", "hidiffusion", "hypertile", "both", "hires"}
    first, vanilla_seconds = configs["hires_first"]["engine"]["seconds"][0], configs["vanilla"]["engine"]["seconds"][0]
    assert size["routes"]["hires"]["seconds"] == pytest.approx(5 * first + 5 * vanilla_seconds)
    with (tmp_path / "bench.csv").open() as handle:
        rows = {r["config"]: r for r in csv.DictReader(handle)}
    assert rows["hires_first"]["forward_px"] == "128x192" and rows["hires_first"]["speedup"] == ""
    for text in ("Hypertile (webui defaults)", "RAU-Net + Hypertile", "hires fix from 128x192 (5 + 5 steps)",
                 "whole generation: RAU-Net + Hypertile"):
        assert text in out
    assert "| whole generation: Hypertile (webui defaults) |" in (tmp_path / "bench.md").read_text()


@needs_webui
def test_hypertile_runs_on_the_unet_as_the_webui_runs_it():
    """The real engine, hooked on the holder of the U-Net, under RAU-Net with MSW-MSA aside; the
    replayed draws are the ones a real forward makes; afterwards the U-Net is untouched."""
    options = Options(sizes=[(256, 384)], batch=1, steps=5, channels=32, hypertile_dir=WEBUI_DIR, hires=False)
    engine = ht.load(WEBUI_DIR)
    sides = _Sides.build("sd15", options, torch.device("cpu"), torch.float32, engine)
    with ldm_attention("sdp"), torch.no_grad():
        size, plan = _count_size("sd15", 256, 384, options, sides, Progress())
        inputs = example_inputs(sides.unet, 1, 48, 32)
        x, t, context = inputs
        plain = sides.unet(x, timesteps=t, context=context)
        for config in (c for c in plan if c.hypertile):
            with sides.engine(config, inputs, options.steps) as call:
                names = ht.hooked(sides.holders[False])
                assert len(names) == 16 and all(n.startswith("diffusion_model.") for n in names)
                attn = sides.unet.input_blocks[1][1].transformer_blocks[0].attn1
                assert not is_ours(attn.__dict__["forward"]) and not is_ours(attn.__dict__["forward"].__wrapped__)
                marks = sum(is_ours(h) for m in sides.unet.modules() for h in m._forward_pre_hooks.values())
                assert (marks > 0) == (config.route == "both")  # RAU-Net runs, MSW-MSA stepped aside
                flops = count_flops(call)  # on the CPU, with the draws of the step it stands for
                tiled = call()
            assert flops == size.hypertile.pass_flops[config.route][config.step]
            assert (tiled - plain).abs().max() > 0
    assert ht.hooked(sides.holders[False]) == []
    assert not any("forward" in m.__dict__ for m in sides.unet.modules())
    assert not hasattr(sides.holders[False], ht.LAYERS_ATTR)


def test_estimate_says_how_long_and_times_nothing(tmp_path, capsys):
    assert main(["--channels", "32", "--size", "64x64", "128x128", "--steps", "5", "--hires-scale", "2",
                 "--threads", "1", "--device", "cpu", "--estimate", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["sd15 64x64", "sd15 128x128", "in all"]
    # 64x64: warm-up + vanilla, idle, 2 states; 128x128 adds the hires fix's first pass at 64x64
    assert "for 5 forwards" in lines[0] and "for 6 forwards" in lines[1] and "for 11 forwards" in lines[2]
    assert not any(tmp_path.iterdir())


def test_controlnet_cost_rows(tmp_path, capsys):
    """The control model's cost at a tiny width: one row per size, the recipe at the native
    latent (64 for SD 1.5: 1024 px -> 512 px) for ceil(0.6 * steps) calls, its residuals one per
    input block and the middle one."""
    from hidiffusion_lib.bench import controlnet as cn

    out = tmp_path / "cn.json"
    assert cn.main(["--size", "1024x1024", "768x512", "--channels", "32", "--steps", "10", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["width"], r["height"], r["recipe_latent"]) for r in rows] == [(1024, 1024, [64, 64]),
                                                                             (768, 512, [40, 64])]
    for row, area_ratio in zip(rows, (4, 64 * 96 / (40 * 64)), strict=True):
        assert row["recipe_steps"] == 6
        # convolutions scale with the area, attention faster
        assert row["full_flops"] / row["recipe_flops"] >= 0.99 * area_ratio
        assert row["full_generation_seconds"] == pytest.approx(10 * row["full_seconds"])
    assert "| 1024x1024 |" in capsys.readouterr().out
    model = cn.build_controlnet("sd15", channels=32)
    x, t, context = example_inputs(model, 1, 16, 24)
    residuals = model(x, torch.rand(1, 3, 128, 192), t, context)
    assert len(residuals) == 13 and residuals[-1].shape[-2:] == (2, 3) and residuals[0].shape[-2:] == (16, 24)
