"""SDXL end to end against a real AUTOMATIC1111 webui (v1.10.x), skipped unless WEBUI_DIR is set.

The module writes two tiny random-weight SDXL base checkpoints (tests/e2e/tiny_checkpoint.py
``sdxl``, seeds 0 and 1, side by side so that the webui can switch to the second as a
refiner), starts one webui API-only with the first and runs every scenario against it.

Cost: the tiny U-Net keeps SDXL's layout, so at 2048x2048 its level-1 self-attention sees
16384 tokens: a vanilla step takes about a minute on a 2-core CPU, a HiDiffusion step about
20 s (windows), the VAE another 10-20 s. So only the schedule test runs 2048x2048 for 7 steps;
the off/on comparisons run at 1024x2048 (twice SDXL's native area) for 2 steps with ratios
that put every patch into them; the other 2048 px passes run 1-2 steps; the webui skips the
negative prompt (``skip_early_cond`` 1: batch 1 instead of the CFG pair). About 8 minutes.
Live previews are off in the settings file, so the webui never needs the SDXL preview
approximation (models/VAE-approx/vaeapprox-sdxl.pt, which it would download on first use).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, Webui, digest, infotexts, needs_webui, running_webui, webui_python, write_checkpoint

pytestmark = needs_webui

SETTINGS = {"live_previews_enable": False, "skip_early_cond": 1.0}
BASE = dict(prompt="a red cube", negative_prompt="", steps=2, width=1024, height=2048, sampler_name="Euler", seed=1,
            cfg_scale=7)
# Every patch within 2 steps: the CA pool (T1) and the extra RAD (T2) both run at step 0
# (int(2 * 0.5) = 1, not aggressive), MSW-MSA at both steps.
ON = [True, True, True, "Auto", 0.5, 0.5, "Off"]
REFINER_SEED = 1
# The webui's infotext pattern (modules/infotext_utils.py).
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def image(body: dict, index: int = 0):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(body["images"][index])))


def pixels(body: dict, index: int = 0) -> str:
    """Digest of the decoded pixels: unlike ``digest`` (the PNG), blind to the infotext."""
    decoded = image(body, index)
    return hashlib.sha256(f"{decoded.mode} {decoded.size}".encode() + decoded.tobytes()).hexdigest()


def params(infotext: str) -> dict[str, str]:
    """Key -> value of the infotext's parameter line (quoted values keep their quotes)."""
    return {key.strip(): value for key, value in PARAM.findall(infotext.splitlines()[-1])}


class Sdxl(Webui):
    def __init__(self, url: str, log=None):
        super().__init__(url, log)
        self.made: dict[str, dict] = {}

    def txt2img(self, args: list | None = None, **overrides) -> dict:
        return self.generate("/sdapi/v1/txt2img", BASE, args, **overrides)

    def once(self, key: str, args: list | None = None, **overrides) -> dict:
        """txt2img made once per module: tests that need the same image share it."""
        if key not in self.made:
            self.made[key] = self.txt2img(args, **overrides)
        return self.made[key]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("webui-sdxl")
    (workdir / "config.json").write_text(json.dumps(SETTINGS))
    refiner = subprocess.Popen([webui_python(), str(ROOT / "tests" / "e2e" / "tiny_checkpoint.py"),
                                str(workdir / "ckpt"), "sdxl", str(REFINER_SEED)], stdout=subprocess.DEVNULL)
    ckpt = write_checkpoint(workdir / "ckpt", "sdxl")
    assert refiner.wait() == 0, "writing the refiner checkpoint failed"
    with running_webui(workdir, ckpt) as client:
        print(f"webui log: {client.log}")
        yield Sdxl(client.url, client.log)


def test_off_is_untouched_and_on_is_reproducible(webui):
    off = webui.once("off")
    on = webui.once("on", ON)
    assert "HiDiffusion: True" in infotexts(on)[0] and "HiDiffusion" not in infotexts(off)[0]
    assert pixels(on) != pixels(off)
    assert digest(webui.txt2img()) == digest(off)
    assert digest(webui.txt2img(ON)) == digest(on)


def test_detected_as_sdxl_base_with_the_2048_schedule(webui):
    # 7 steps: the aggressive schedule's stride-4 switch runs at step 0 (int(8/50 * 7) = 1),
    # then the CA pool at step 1 (int(0.4 * 7) = 2)
    body = webui.txt2img([True], steps=7, width=2048, height=2048)
    info = params(infotexts(body)[0])
    assert info["Model"] == "tiny-sdxl" and info["Size"] == "2048x2048"
    assert info["HiDiffusion"] == "True"
    assert info["HiDiffusion schedule"] == '"sdxl_2048: T1 0.4, T2 0, aggressive"'


def test_native_bucket_is_skipped_and_identical(webui):
    bucket = dict(width=832, height=1216, steps=1)
    off = webui.txt2img(**bucket)
    on = webui.txt2img([True], **bucket)
    skipped = [key for key in params(infotexts(on)[0]) if key.startswith("HiDiffusion skipped")]
    assert skipped, infotexts(on)[0]
    assert pixels(on) == pixels(off)


def test_hires_fix_to_2048(webui):
    # one step at 1024 (native: skipped), then one at 2048 (of int(1 / 0.5) = 2 scheduled, the last)
    body = webui.txt2img([True], steps=1, width=1024, height=1024, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                         hr_second_pass_steps=1, denoising_strength=0.5)
    assert image(body).size == (2048, 2048)
    info = params(infotexts(body)[0])
    assert info["HiDiffusion"] == "True" and info["Hires upscaler"] == "Latent"


def test_img2img_at_2048(webui):
    from PIL import Image

    gradient = bytes(range(256)) * (2048 * 2048 * 3 // 256)
    png = io.BytesIO()
    Image.frombytes("RGB", (2048, 2048), gradient).save(png, format="PNG")
    # 3 steps at 0.5: the last int(0.5 * 3) + 1 = 2 of the schedule run (fewer would denoise fully)
    payload = {**BASE, "width": 2048, "height": 2048, "steps": 3, "denoising_strength": 0.5,
               "init_images": [base64.b64encode(png.getvalue()).decode()]}
    body = webui.generate("/sdapi/v1/img2img", payload, [True])
    assert params(infotexts(body)[0])["HiDiffusion"] == "True"


def test_refiner_runs_without_hidiffusion_and_leaves_the_base_alone(webui):
    on = webui.once("on", ON)
    _, models = webui.call("/sdapi/v1/sd-models")
    refiner = next(m["title"] for m in models if m["model_name"] == f"tiny-sdxl-seed{REFINER_SEED}")
    body = webui.txt2img(ON, refiner_checkpoint=refiner, refiner_switch_at=0.5)
    info = params(infotexts(body)[0])
    assert info.get("Refiner", "").startswith(f"tiny-sdxl-seed{REFINER_SEED}"), infotexts(body)[0]
    assert info["HiDiffusion"] == "True"
    assert "without HiDiffusion" in info.get("HiDiffusion refiner", ""), infotexts(body)[0]
    assert digest(webui.txt2img(ON)) == digest(on)


def tracebacks(log: str) -> list[str]:
    """Each traceback in the log (the webui indents those it reports under a ``***`` line):
    the header, the lines indented deeper, and the exception line."""
    lines, found = log.splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() != "Traceback (most recent call last):":
            continue
        indent, j = len(line) - len(line.lstrip()), i + 1
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            j += 1
        start = i - 1 if i and lines[i - 1].lstrip().startswith("***") else i
        found.append("\n".join(lines[start : j + 1]))
    return found


def test_webui_log_has_no_hidiffusion_traceback(webui):
    # the script or the engine in a frame or in the webui's "*** Error running ...: <script>" line
    # (not the webui failing to read this checkout's git remote, which only names the folder)
    ours = [block for block in tracebacks(webui.log_text()) if re.search(r"hidiffusion_lib|hidiffusion\.py", block)]
    assert not ours, "\n\n".join(ours)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
