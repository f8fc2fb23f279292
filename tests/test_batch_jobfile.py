"""The batch job file: validation messages, defaults, grid expansion, the webui request body."""

import base64
import json
from pathlib import Path

import pytest
from PIL import Image

from hidiffusion_lib.batch.jobfile import JobFileError, expand, load, output_size, setting_label
from hidiffusion_lib.script_args import ARGS, parse

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str, name: str = "jobs.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(JobFileError) as caught:
        load(_write(tmp_path, text))
    return caught.value.problems


def test_example_sweep_expands_to_three_settings_by_two_sizes():
    jobs = load(ROOT / "examples" / "sweep.yaml")
    cells = [(setting_label(j.spec), tuple(j.spec["size"])) for j in jobs]
    assert cells == [
        ("off", (1024, 1024)), ("RAU-Net", (1024, 1024)), ("full", (1024, 1024)),
        ("off", (1536, 1536)), ("RAU-Net", (1536, 1536)), ("full", (1536, 1536)),
    ]
    assert all(j.spec["steps"] == 20 and j.spec["sampler"] == "Euler a" for j in jobs)  # from defaults
    assert len({j.id for j in jobs}) == 6


def test_messages_name_the_field_its_position_and_line(tmp_path):
    problems = _problems(tmp_path, """\
jobs:
  - prompt: a cat
    stpes: 20
  - prompt: a dog
    grid:
      size: [1024x1024, 1001x1000, big]
      hidiffusion: [off, turbo]
  - prompt: yes
    hires: {scale: 9}
""")
    assert problems[0].startswith("jobs[0].stpes (line 3): unknown field 'stpes': did you mean 'steps'? known: name, ")
    assert problems[1:] == [
        "jobs[1].grid.size[1] (line 6): width and height must be multiples of 8 in [64, 8192], got 1001x1000",
        'jobs[1].grid.size[2] (line 6): must be "WIDTHxHEIGHT" (e.g. "1024x1024"), [width, height] or one number, '
        "got 'big'",
        "jobs[1].grid.hidiffusion[1] (line 7): must be off, RAU-Net, MSW-MSA, full or a mapping of settings, "
        "got 'turbo'",
        "jobs[2].prompt (line 8): must be text (put it in quotes), got True",
        "jobs[2].hires.scale (line 9): must be a number in [1, 8], got 9",
    ]


def test_str_of_the_error_lists_every_problem_under_the_file(tmp_path):
    path = _write(tmp_path, "jobs: []\nextra: 1\n")
    with pytest.raises(JobFileError) as caught:
        load(path)
    text = str(caught.value)
    assert text.startswith(f"{path}: invalid job file\n")
    assert "extra (line 2): unknown field 'extra'" in text
    assert "jobs (line 1): must be a non-empty list of jobs" in text


def test_the_error_names_the_file_when_a_job_is_bad(tmp_path):
    path = _write(tmp_path, "jobs:\n  - {prompt: a, stpes: 2}\n")
    with pytest.raises(JobFileError) as caught:
        load(path)
    assert str(caught.value).startswith(f"{path}: invalid job file\n  jobs[0].stpes (line 2): unknown field")


def test_a_bad_default_is_reported_once_not_for_every_job(tmp_path):
    problems = _problems(tmp_path, "defaults: {steps: x}\njobs: [{prompt: a}, {prompt: b}]\n")
    assert problems == ["defaults.steps (line 1): must be an integer in [1, 1000], got 'x'"]


def test_hidiffusion_settings_by_name_report_their_key(tmp_path):
    (problem,) = _problems(tmp_path, "jobs:\n  - prompt: a\n    hidiffusion: {t1: 2, raunet: true}\n")
    assert problem.startswith("jobs[0].hidiffusion.t1 (line 3): HiDiffusion 'T1 ratio' ")  # then script_args' words
    assert "'t1'" in problem and problem.endswith("got 2")
    assert _problems(tmp_path, "jobs:\n  - prompt: a\n    hidiffusion: {speed: 2}\n")[0].startswith(
        "jobs[0].hidiffusion.speed (line 3): unknown field 'speed'")


def test_cross_field_problems_name_the_job(tmp_path):
    problems = _problems(tmp_path, """\
jobs:
  - prompt: a
    mode: img2img
  - prompt: b
    mode: img2img
    init_image: missing.png
    hires: true
  - negative_prompt: c
""")
    assert problems[0] == "jobs[0] (line 2): mode: img2img needs 'init_image' (a path relative to the job file)"
    assert problems[1] == "jobs[1] (line 4): 'hires' (hires fix) applies to mode: txt2img only"
    assert problems[2].startswith("jobs[1].init_image (line 6): file not found: ")
    assert problems[3] == "jobs[2] (line 8): 'prompt' is required (in the entry, its grid or defaults)"


def test_duplicate_jobs_across_entries_are_refused(tmp_path):
    problems = _problems(tmp_path, "jobs:\n  - {prompt: a, name: x}\n  - {prompt: a, name: x}\n")
    assert problems == ["jobs[1] (line 3): repeats an image of jobs[0] (same fields after defaults and grid)"]


def test_json_job_file_is_read_with_positions(tmp_path):
    path = _write(tmp_path, json.dumps({"jobs": [{"prompt": "a", "steps": 0}]}, indent=1), "jobs.json")
    with pytest.raises(JobFileError) as caught:
        load(path)
    assert caught.value.problems == ["jobs[0].steps (line 5): must be an integer in [1, 1000], got 0"]
    assert _problems(tmp_path, "jobs: [")[0].startswith("not valid YAML")


def test_grid_is_a_cartesian_product_last_axis_fastest_and_merges_with_defaults(tmp_path):
    jobs = load(_write(tmp_path, """\
defaults:
  seed: 7
  grid: {seed: [1, 2], hidiffusion: [full]}
jobs:
  - prompt: a
    grid:
      hidiffusion: [off, raunet, mswmsa]
      size: [512, [768, 512]]
  - prompt: b
"""))
    cells = [(j.source, j.spec["seed"], j.spec["hidiffusion"]["label"], tuple(j.spec["size"])) for j in jobs]
    assert cells == [
        ("jobs[0]", s, h, size)
        for s in (1, 2) for h in ("off", "RAU-Net", "MSW-MSA") for size in ((512, 512), (768, 512))
    ] + [("jobs[1]", 1, "full", (1024, 1024)), ("jobs[1]", 2, "full", (1024, 1024))]


def test_hidiffusion_forms_and_labels(tmp_path):
    jobs = load(_write(tmp_path, """\
jobs:
  - prompt: a
    grid:
      hidiffusion:
        - false
        - on
        - RAU-Net
        - msw_msa
        - {t1: 0.5, model: sdxl}
        - {label: mine, mswmsa: false}
        - {raunet: true}
"""))
    # {raunet: true} is the default: the same job as "on", kept once
    assert [j.spec["hidiffusion"]["label"] for j in jobs] == [
        "off", "full", "RAU-Net", "MSW-MSA", "full model=SDXL t1=0.5", "mine"
    ]
    positional = [j.request()["alwayson_scripts"]["HiDiffusion"]["args"] for j in jobs]
    assert all(len(args) == len(ARGS) for args in positional)
    parsed = [parse(args) for args in positional]
    assert [(p.enabled, p.raunet, p.mswmsa) for p in parsed] == [
        (False, True, True), (True, True, True), (True, True, False), (True, False, True), (True, True, True),
        (True, True, False),
    ]
    assert parsed[4].t1 == 0.5 and parsed[4].model == "SDXL"


def test_request_body_matches_the_webui_fields(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    jobs = load(_write(tmp_path, """\
jobs:
  - prompt: a
    negative_prompt: b
    size: 640x512
    seed: 3
    sampler: Euler
    hires: {scale: 1.5, steps: 10}
    override_settings: {CLIP_stop_at_last_layers: 2}
  - prompt: c
    mode: img2img
    init_image: init.png
    denoising_strength: 0.4
    hidiffusion: off
"""))
    hires, img2img = (j.request() for j in jobs)
    assert hires | {"alwayson_scripts": None} == {
        "prompt": "a", "negative_prompt": "b", "seed": 3, "steps": 20, "cfg_scale": 7.0, "width": 640,
        "height": 512, "batch_size": 1, "n_iter": 1, "send_images": True, "save_images": False,
        "override_settings": {"CLIP_stop_at_last_layers": 2}, "alwayson_scripts": None, "sampler_name": "Euler",
        "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 10,
        "denoising_strength": 0.7,
    }
    assert output_size(jobs[0].spec) == (960, 768) and setting_label(jobs[0].spec) == "full + hires x1.5"
    assert img2img["init_images"] == [base64.b64encode((tmp_path / "init.png").read_bytes()).decode()]
    assert img2img["denoising_strength"] == 0.4 and "enable_hr" not in img2img


def test_ids_are_stable_and_follow_the_fields(tmp_path):
    text = "jobs:\n  - {name: a, prompt: p, grid: {size: [512, 768]}}\n"
    ids = [j.id for j in load(_write(tmp_path, text))]
    assert ids == [j.id for j in load(_write(tmp_path, text))]
    changed = [j.id for j in load(_write(tmp_path, text.replace("768", "1024")))]
    assert changed[0] == ids[0] and changed[1] != ids[1]


def test_expand_refuses_a_non_mapping():
    with pytest.raises(JobFileError, match="must be a mapping with a 'jobs' list"):
        expand(["a"], "x.yaml", Path("."))
