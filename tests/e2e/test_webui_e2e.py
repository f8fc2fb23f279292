"""End to end against a real AUTOMATIC1111 webui (v1.10.x), skipped unless WEBUI_DIR is set.

WEBUI_DIR: an existing webui checkout (with its repositories/). WEBUI_PYTHON: its venv's
python (default WEBUI_DIR/venv/bin/python). The fixture links this extension into
WEBUI_DIR/extensions (and unlinks it after), writes a tiny random-weight SD 1.x checkpoint
with tests/e2e/tiny_checkpoint.py, starts the webui API-only on a free loopback port and
stops it at the end. A run takes a few minutes on a CPU.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hidiffusion_lib import script_args as sa

ROOT = Path(__file__).parents[2]
WEBUI_DIR = os.environ.get("WEBUI_DIR")
pytestmark = pytest.mark.skipif(not WEBUI_DIR, reason="WEBUI_DIR is not set: no webui to test against")
BASE = dict(prompt="a red cube", negative_prompt="", steps=4, width=768, height=768, sampler_name="Euler", seed=1,
            cfg_scale=7)


class Webui:
    def __init__(self, url: str):
        self.url = url

    def call(self, route: str, payload: dict | None = None, timeout: float = 900) -> tuple[int, dict]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def txt2img(self, args: list | None = None, **overrides) -> dict:
        payload = {**BASE, **overrides}
        if args is not None:
            payload["alwayson_scripts"] = {"HiDiffusion": {"args": args}}
        status, body = self.call("/sdapi/v1/txt2img", payload)
        assert status == 200, body
        return body


def digest(body: dict, index: int = 0) -> str:
    return hashlib.sha256(base64.b64decode(body["images"][index])).hexdigest()


def infotexts(body: dict) -> list[str]:
    return json.loads(body["info"])["infotexts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    webui_dir = Path(WEBUI_DIR)
    python = os.environ.get("WEBUI_PYTHON", str(webui_dir / "venv" / "bin" / "python"))
    ckpt_dir = tmp_path_factory.mktemp("ckpt")
    subprocess.run([python, str(ROOT / "tests" / "e2e" / "tiny_checkpoint.py"), str(ckpt_dir)], check=True)
    link = webui_dir / "extensions" / "sd-webui-hidiffusion-e2e"
    linked = [p for p in (webui_dir / "extensions").iterdir() if p.resolve() == ROOT.resolve()]
    if not linked:
        link.symlink_to(ROOT, target_is_directory=True)
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = open(tmp_path_factory.mktemp("log") / "webui.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [python, "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check",
         "--use-cpu", "all", "--no-half", "--precision", "full", "--disable-nan-check", "--opt-sdp-attention",
         "--api", "--nowebui", "--server-name", "127.0.0.1", "--port", str(port),
         "--ckpt", str(ckpt_dir / "tiny-sd1.safetensors")],
        cwd=webui_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    client = Webui(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"webui exited with {process.returncode}; see {log.name}")
            try:
                if client.call("/sdapi/v1/script-info", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"webui did not answer in 300 s; see {log.name}")
            time.sleep(2)
        yield client
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()
        if not linked:
            link.unlink()


def test_script_info_lists_every_argument(webui):
    status, scripts = webui.call("/sdapi/v1/script-info")
    assert status == 200
    entries = [s for s in scripts if s["name"] == "hidiffusion"]
    assert {s["is_img2img"] for s in entries} == {False, True}
    for entry in entries:
        assert [a["label"] for a in entry["args"]] == [a.label for a in sa.ARGS]


def test_off_is_untouched_and_on_is_reproducible(webui):
    off = webui.txt2img()
    on = webui.txt2img([True])
    assert digest(on) != digest(off)
    assert "HiDiffusion: True" in infotexts(on)[0] and "HiDiffusion" not in infotexts(off)[0]
    assert digest(webui.txt2img()) == digest(off)
    assert digest(webui.txt2img([True])) == digest(on)


def test_bad_argument_is_a_422_naming_it(webui):
    bad = {"HiDiffusion": {"args": [True, True, True, "Auto", 1.5]}}
    status, body = webui.call("/sdapi/v1/txt2img", {**BASE, "alwayson_scripts": bad})
    assert status == 422 and "'t1'" in body["errors"] and "[0, 1]" in body["errors"]


def test_xyz_modes_by_size(webui):
    _, scripts = webui.call("/sdapi/v1/script-info")
    choices = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])["args"][0]["choices"]
    args = [choices.index("[HiDiffusion] Mode"), "", ["off", "RAU-Net", "full"], choices.index("Size"),
            "640x640, 768x640", [], 0, "", [], True, True, False, False, False, False, False, 0, False]
    body = webui.txt2img(steps=2, width=640, height=640, script_name="x/y/z plot", script_args=args)
    cells = infotexts(body)[1:]
    assert len(cells) == 6
    for index, text in enumerate(cells):
        mode = ("off", "RAU-Net", "full")[index % 3]
        assert ("HiDiffusion: True" in text) == (mode != "off")
        assert ("HiDiffusion MSW-MSA: False" in text) == (mode == "RAU-Net")


def test_hires_heun_and_img2img(webui):
    hires = webui.txt2img([True], width=384, height=384, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                          hr_second_pass_steps=3, denoising_strength=0.5)
    assert "HiDiffusion: True" in infotexts(hires)[0]
    assert "HiDiffusion: True" in infotexts(webui.txt2img([True], sampler_name="Heun"))[0]
    status, body = webui.call("/sdapi/v1/img2img", {**BASE, "init_images": [hires["images"][0]],
                                                     "denoising_strength": 0.5,
                                                     "alwayson_scripts": {"HiDiffusion": {"args": [True]}}})
    assert status == 200 and "HiDiffusion: True" in infotexts(body)[0]


def test_interrupted_generation_then_a_clean_one(webui):
    off, on = digest(webui.txt2img()), digest(webui.txt2img([True]))
    thread = threading.Thread(target=webui.txt2img, args=([True],), kwargs={"steps": 30})
    thread.start()
    time.sleep(3)
    webui.call("/sdapi/v1/interrupt", {})
    thread.join()
    assert digest(webui.txt2img()) == off
    assert digest(webui.txt2img([True])) == on


def test_batch_job_file_runs_and_resumes(webui, tmp_path):
    from PIL import Image

    from hidiffusion_lib.batch.__main__ import main

    job = tmp_path / "jobs.yaml"
    job.write_text("jobs:\n  - prompt: a red cube\n    steps: 2\n    seed: 3\n    grid:\n"
                   "      hidiffusion: [off, full]\n      size: [640x640, 768x768]\n")
    out = tmp_path / "out"
    assert main(["run", str(job), "--url", webui.url, "--out", str(out)]) == 0
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 4
    assert any("HiDiffusion: True" in Image.open(io.BytesIO(p.read_bytes())).info.get("parameters", "") for p in pngs)
    mtimes = [p.stat().st_mtime for p in pngs]
    assert main(["run", str(job), "--url", webui.url, "--out", str(out)]) == 0
    assert [p.stat().st_mtime for p in pngs] == mtimes
    assert main(["report", str(out)]) == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
