"""Shared fixtures of the end-to-end tests: a real AUTOMATIC1111 webui (v1.10.x) started on a
free loopback port, with this extension linked into it and tiny random-weight checkpoints.

Environment: WEBUI_DIR (a webui checkout with its repositories/; without it every e2e test
skips), WEBUI_PYTHON (its venv's python, default WEBUI_DIR/venv/bin/python), CONTROLNET_DIR (a
checkout of sd-webui-controlnet whose requirements are in that venv; tests marked
``needs_controlnet`` skip without it), MULTIDIFFUSION_DIR (a checkout of
multidiffusion-upscaler-for-automatic1111: Tiled Diffusion and Tiled VAE; ``needs_multidiffusion``),
WEBUI_MODELS (a folder for the big tiny checkpoints, reused across runs; default a folder in the
temp directory: see ``webui_checkpoint``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
WEBUI_DIR = os.environ.get("WEBUI_DIR")
needs_webui = pytest.mark.skipif(not WEBUI_DIR, reason="WEBUI_DIR is not set: no webui to test against")
CONTROLNET_DIR = os.environ.get("CONTROLNET_DIR")
needs_controlnet = pytest.mark.skipif(not CONTROLNET_DIR, reason="CONTROLNET_DIR is not set")
MULTIDIFFUSION_DIR = os.environ.get("MULTIDIFFUSION_DIR")
needs_multidiffusion = pytest.mark.skipif(not MULTIDIFFUSION_DIR, reason="MULTIDIFFUSION_DIR is not set")
# The webui's flags for a CPU-only, offline machine (see the README's "Tests").
CPU_FLAGS = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-version-check", "--use-cpu", "all",
             "--no-half", "--precision", "full", "--disable-nan-check", "--opt-sdp-attention"]
START_TIMEOUT = 300


class Webui:
    """A client of one running webui."""

    def __init__(self, url: str, log: Path | None = None, process: subprocess.Popen | None = None):
        self.url = url
        self.log = log
        self.process = process  # the launcher, leader of its process group (kill_group() ends it)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the webui's whole process group (launch.py and the server it runs)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def call(self, route: str, payload: dict | None = None, timeout: float = 900) -> tuple[int, dict]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def generate(self, route: str, base: dict, args: list | None = None, **overrides) -> dict:
        payload = {**base, **overrides}
        if args is not None:
            payload.setdefault("alwayson_scripts", {})["HiDiffusion"] = {"args": args}
        status, body = self.call(route, payload)
        assert status == 200, body
        return body

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""


def digest(body: dict, index: int = 0) -> str:
    return hashlib.sha256(base64.b64decode(body["images"][index])).hexdigest()


def png_base64(image) -> str:
    """A PIL image as the API takes images: a base64 PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def control_image(width: int, height: int, shift: int = 0) -> str:
    """A synthetic control map: white bars on black, as a base64 PNG."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for x in range(shift, width, width // 8):
        draw.rectangle([x, 0, x + width // 32, height], fill="white")
    return png_base64(image)


def pixels(body: dict, index: int = 0):
    """Image ``index`` of an API answer, decoded to an (h, w, 3) int array."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][index]))).convert("RGB"), dtype=int)


def same(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def infotexts(body: dict) -> list[str]:
    return json.loads(body["info"])["infotexts"]


def no_traceback(webui: Webui) -> None:
    """No traceback in the log but the one the webui prints per linked extension that is not a
    git checkout (it reads each extension's git data at start)."""
    text = webui.log_text()
    assert text.count("Traceback (most recent call last)") <= text.count(
        "Failed reading extension data from Git repository"), webui.log


def webui_python() -> str:
    return os.environ.get("WEBUI_PYTHON", str(Path(WEBUI_DIR) / "venv" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(out_dir: Path, kind: str = "sd1") -> Path:
    """Write a tiny random-weight checkpoint with the webui's python; returns its path."""
    subprocess.run([webui_python(), str(ROOT / "tests" / "e2e" / "tiny_checkpoint.py"), str(out_dir), kind],
                   check=True, stdout=subprocess.PIPE)
    return out_dir / f"tiny-{kind}.safetensors"


def checkpoint_name(kind: str, seed: int = 0) -> str:
    return f"tiny-{kind}.safetensors" if seed == 0 else f"tiny-{kind}-seed{seed}.safetensors"


def cached_model(folder: Path, name: str, python: str, writer: str, kind: str, seed: int = 0) -> Path:
    """``folder/name``, written there first by ``python tests/e2e/WRITER OUT_DIR KIND SEED`` if it
    is not yet: for the big files (seconds to write, GiBs), reused across runs; several test
    processes may ask at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".write.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / name).exists():  # written aside and moved in: never a half file
            with tempfile.TemporaryDirectory(dir=folder) as partial:
                subprocess.run([python, str(ROOT / "tests" / "e2e" / writer), partial, kind, str(seed)],
                               check=True, stdout=subprocess.PIPE)
                # what the writer made beside the file (sd3: its HF home) first, the file last
                for entry in sorted(Path(partial).iterdir(), key=lambda entry: entry.name == name):
                    if (folder / entry.name).is_dir():  # left by a write that was killed before its file
                        shutil.rmtree(folder / entry.name)
                    os.replace(entry, folder / entry.name)
    return folder / name


def webui_models() -> Path:
    """WEBUI_MODELS, where the big tiny models for the webui are kept (default a folder in the
    temp directory)."""
    return Path(os.environ.get("WEBUI_MODELS") or Path(tempfile.gettempdir()) / "sd-webui-hidiffusion-e2e-webui")


def webui_checkpoint(kind: str, seed: int = 0) -> Path:
    """A big tiny checkpoint for the webui (tiny_checkpoint.py's ``sd3``: 1.7 GiB, ~20 s to write)
    in webui_models(), written there first if it is not yet."""
    return cached_model(webui_models(), checkpoint_name(kind, seed), webui_python(), "tiny_checkpoint.py", kind, seed)


def write_controlnet(out_dir: Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random-weight ControlNet model for the tiny checkpoint of ``kind`` with the
    webui's python (tiny_controlnet.py); returns its path. Pass ``out_dir`` as ``running_webui``'s
    ``controlnet_models``."""
    out = subprocess.run([webui_python(), str(ROOT / "tests" / "e2e" / "tiny_controlnet.py"), str(out_dir), kind,
                          str(seed)], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


@contextlib.contextmanager
def _in_extensions(name: str, target: Path) -> Iterator[None]:
    """``target`` linked as WEBUI_DIR/extensions/NAME for the duration (unless an extension
    there already is ``target``).

    Runs that share WEBUI_DIR hold a shared lock on a file beside the link; the last one to
    end (the only one that can take the lock exclusively) removes the link.
    """
    extensions = Path(WEBUI_DIR) / "extensions"
    link = extensions / name
    with open(extensions / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        if not any(p.resolve() == target.resolve() for p in extensions.iterdir() if p.is_dir()):
            try:
                link.symlink_to(target, target_is_directory=True)
            except FileExistsError:  # another run made it meanwhile: fine if it is the same
                if link.resolve() != target.resolve():
                    raise
        try:
            yield
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another run still uses it
            else:
                if link.is_symlink() and link.resolve() == target.resolve():
                    link.unlink()


def linked_extension() -> contextlib.AbstractContextManager[None]:
    """This checkout in WEBUI_DIR/extensions for the duration (unless it is already there)."""
    return _in_extensions("sd-webui-hidiffusion-e2e", ROOT)


def _tiny_controlnet_extension() -> Path:
    """A one-script extension whose script is tiny_controlnet.py (a link to it): in the webui it
    fits sd-webui-controlnet's loader to the tiny models (see that file). One folder per
    checkout, outside it, made again if gone."""
    key = hashlib.sha256(str(ROOT.resolve()).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"sd-webui-hidiffusion-e2e-tiny-controlnet-{key}"
    script = folder / "scripts" / "tiny_controlnet.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    if not script.is_symlink():
        with contextlib.suppress(FileExistsError):
            script.symlink_to(ROOT / "tests" / "e2e" / "tiny_controlnet.py")
    return folder


@contextlib.contextmanager
def linked_controlnet() -> Iterator[None]:
    """CONTROLNET_DIR in WEBUI_DIR/extensions for the duration (unless it is already there),
    with the extension that lets it load tiny_controlnet.py's models."""
    if not CONTROLNET_DIR:
        pytest.skip("CONTROLNET_DIR is not set")
    with _in_extensions("sd-webui-controlnet-e2e", Path(CONTROLNET_DIR)), \
            _in_extensions("sd-webui-hidiffusion-e2e-tiny-controlnet", _tiny_controlnet_extension()):
        yield


@contextlib.contextmanager
def running_webui(workdir: Path, ckpt: Path, ui: bool = False, extra_args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None, controlnet_models: Path | None = None,
                  extensions: dict[str, Path] | None = None) -> Iterator[Webui]:
    """Start the webui on a free loopback port (API only unless ``ui``) with ``ckpt`` loaded.

    Its settings, ui-config and cache files live in ``workdir``, so each run starts from the
    webui's defaults and leaves WEBUI_DIR's own files alone. With ``controlnet_models`` (a
    folder of write_controlnet's models) sd-webui-controlnet (CONTROLNET_DIR) runs too, with
    that folder as its ``--controlnet-dir`` (its preprocessor folder in ``workdir``).
    ``extensions``: other extensions to link in for the run (name -> checkout). Stops it at
    the end.
    """
    port = free_port()
    log_path = workdir / "webui.log"
    flags = [*CPU_FLAGS, "--api", "--server-name", "127.0.0.1", "--port", str(port), "--ckpt", str(ckpt),
             "--ckpt-dir", str(ckpt.parent), "--ui-settings-file", str(workdir / "config.json"),
             "--ui-config-file", str(workdir / "ui-config.json"), *extra_args]
    if not ui:
        flags.append("--nowebui")
    if controlnet_models is not None:
        flags += ["--controlnet-dir", str(controlnet_models),
                  "--controlnet-annotator-models-path", str(workdir / "controlnet-annotators")]
    # SD_WEBUI_CACHE_DIR: the webui's hash caches (sqlite) in workdir, not WEBUI_DIR/cache, which
    # copies of one webui made with hard links share (one database, a WAL per folder: corrupted)
    process_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_OFFLINE": "1", "SD_WEBUI_CACHE_DIR": str(workdir / "cache"), **(env or {})}
    with contextlib.ExitStack() as stack:
        if controlnet_models is not None:
            stack.enter_context(linked_controlnet())
        for name, folder in (extensions or {}).items():
            stack.enter_context(_in_extensions(name, folder))
        stack.enter_context(linked_extension())
        yield stack.enter_context(started("webui", webui_python(), flags, WEBUI_DIR, process_env, log_path, port))


@contextlib.contextmanager
def started(name: str, python: str, flags: list[str], cwd: str, env: dict[str, str], log_path: Path,
            port: int) -> Iterator[Webui]:
    """Run ``python launch.py *flags`` in ``cwd`` (its output to ``log_path``), wait until its API
    on ``port`` answers, yield its client; stop its process group at the end."""
    with open(log_path, "w") as log:
        process = subprocess.Popen([python, "launch.py", *flags], cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    client = Webui(f"http://127.0.0.1:{port}", log_path, process)
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with {process.returncode}; see {log_path}")
            try:
                if client.call("/sdapi/v1/script-info", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"{name} did not answer in {START_TIMEOUT} s; see {log_path}")
            time.sleep(2)
        yield client
    finally:
        client.kill_group(signal.SIGTERM)  # a test may have killed it already
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            client.kill_group(signal.SIGKILL)
            process.wait()


# --- Forge (lllyasviel/stable-diffusion-webui-forge main, the Forge 2 backend/) ---------------
#
# Environment: FORGE_DIR (a Forge checkout with its repositories/ and venv; without it the Forge
# tests skip), FORGE_PYTHON (its python, default FORGE_DIR/venv/bin/python), FORGE_MODELS (a
# folder for the tiny checkpoints, reused across runs; default a folder in the temp directory;
# missing checkpoints are written there with FORGE_PYTHON, ~18 s and ~600 MB each),
# FORGE_FULL_VAE=1 (decode with the checkpoint's full-size VAE instead of the tiny TAESD below:
# 2-3x slower on a CPU).
#
# Each Forge runs with --data-dir in a folder of the test's own: its config.json, ui-config.json,
# cache.json, models/ and outputs/ go there, and so does its extensions folder (Forge reads
# extensions from DATA_DIR/extensions), where this checkout is linked. FORGE_DIR is only read.

FORGE_DIR = os.environ.get("FORGE_DIR")
needs_forge = pytest.mark.skipif(not FORGE_DIR, reason="FORGE_DIR is not set: no Forge to test against")
# Forge's flags for a CPU-only, offline machine (its --use-cpu / --no-half are gone)
FORGE_FLAGS = ["--always-cpu", "--skip-torch-cuda-test", "--attention-pytorch", "--skip-prepare-environment",
               "--skip-install"]


def forge_python() -> str:
    return os.environ.get("FORGE_PYTHON", str(Path(FORGE_DIR) / "venv" / "bin" / "python"))




def forge_checkpoint(seed: int = 0, kind: str = "forge-sd1") -> Path:
    """A tiny random-weight checkpoint for Forge (tiny_checkpoint.py's ``kind``: ``forge-sd1`` or
    ``forge-sdxl``; ``seed`` 0 or another) in FORGE_MODELS, written there first if it is not yet."""
    folder = Path(os.environ.get("FORGE_MODELS") or Path(tempfile.gettempdir()) / "sd-webui-hidiffusion-e2e-forge")
    return cached_model(folder, checkpoint_name(kind, seed), forge_python(), "tiny_checkpoint.py", kind, seed)


def write_taesd(folder: Path) -> None:
    """taesd_decoder.pth and taesd_encoder.pth for Forge's "TAESD" VAE type (modules/sd_vae_taesd.py's
    layout), and the same as taesdxl_*.pth (which Forge loads for SDXL), with hand-set weights
    instead of the trained ones (not available offline): the decoder paints latent channels 0-2 as
    colours (0.5 + 0.12 * channel, +-0.04 * channel 3, per 8x8 block: every latent change shows,
    nothing saturates), the encoder samples every 8th pixel into latent channels 0-2. A second for
    the decode instead of the full VAE's half minute. taesd3_*.pth (16 latent channels, which the
    AUTOMATIC1111 webui loads for SD3): the decoder paints each channel c into colour c % 3
    (0.5 +- 0.05 * channel)."""
    import torch

    def center(n_out: int, n_in: int, taps: list[tuple[int, int, float]]) -> torch.Tensor:
        weight = torch.zeros(n_out, n_in, 3, 3)
        for out, inp, value in taps:
            weight[out, inp, 1, 1] = value
        return weight

    def state(layout: list) -> dict[str, torch.Tensor]:
        tensors = {}
        for index, item in enumerate(layout):
            if item == "block":  # its conv branch 0: relu(0 + x) = x for the x >= 0 it gets
                for j in (0, 2, 4):
                    tensors[f"{index}.conv.{j}.weight"] = torch.zeros(64, 64, 3, 3)
                    tensors[f"{index}.conv.{j}.bias"] = torch.zeros(64)
            elif isinstance(item, tuple):
                tensors[f"{index}.weight"] = item[0]
                if item[1] is not None:
                    tensors[f"{index}.bias"] = item[1]
        return tensors

    def layouts(latent: int, mix: list[tuple[int, int, float]]) -> tuple[list, list]:
        split = [(2 * c, c, 1.0) for c in range(latent)] + [(2 * c + 1, c, -1.0) for c in range(latent)]  # relu(+-x)
        rgb = [(o, 2 * c, v) for o, c, v in mix] + [(o, 2 * c + 1, -v) for o, c, v in mix]
        up = (center(64, 64, [(c, c, 1.0) for c in range(2 * latent)]), None)
        blocks = ["block"] * 3
        # clamp, conv, relu, 3 blocks, (upsample, conv, 3 blocks) x 2, upsample, conv, block, conv
        decoder = [None, (center(64, latent, split), torch.zeros(64)), None, *blocks, None, up, *blocks, None, up,
                   *blocks, None, up, "block", (center(3, 64, rgb), torch.full((3,), 0.5))]
        copy = [(c, c, 1.0) for c in range(3)]
        down = (center(64, 64, copy), None)
        bias = torch.zeros(latent)
        bias[:3] = -2.0
        encoder = [(center(64, 3, copy), torch.zeros(64)), "block", down, *blocks, down, *blocks, down, *blocks,
                   (center(latent, 64, [(c, c, 4.0) for c in range(3)]), bias)]
        return decoder, encoder

    mix4 = [(0, 0, 0.12), (1, 1, 0.12), (2, 2, 0.12), (0, 3, 0.04), (1, 3, 0.04), (2, 3, -0.04)]
    mix16 = [(c % 3, c, 0.05 if c % 2 == 0 else -0.05) for c in range(16)]
    folder.mkdir(parents=True, exist_ok=True)
    for names, latent, mix in ((("taesd", "taesdxl"), 4, mix4), (("taesd3",), 16, mix16)):
        decoder, encoder = layouts(latent, mix)
        for name in names:
            # the pre-zip format: the AUTOMATIC1111 webui's safe unpickler (modules/safe.py) refuses the
            # .format_version entry that newer torch writes into the zip
            torch.save(state(decoder), folder / f"{name}_decoder.pth", _use_new_zipfile_serialization=False)
            torch.save(state(encoder), folder / f"{name}_encoder.pth", _use_new_zipfile_serialization=False)


@contextlib.contextmanager
def running_forge(data_dir: Path, ckpt: Path, extension: bool = True, env: dict[str, str] | None = None,
                  extra_args: tuple[str, ...] = (), ui: bool = False) -> Iterator[Webui]:
    """Start Forge (API-only, or with its UI) on a free loopback port with ``ckpt`` selected (loaded at the first
    generation) and ``data_dir`` as its --data-dir; with ``extension`` this checkout is in its
    extensions folder. Unless FORGE_FULL_VAE is set, images are decoded (and img2img encoded)
    by write_taesd's tiny VAE. Stops it at the end."""
    port = free_port()
    log_path = data_dir / "forge.log"
    if extension:
        (data_dir / "extensions").mkdir(parents=True, exist_ok=True)
        link = data_dir / "extensions" / "sd-webui-hidiffusion"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
    if not os.environ.get("FORGE_FULL_VAE"):
        write_taesd(data_dir / "models" / "VAE-taesd")
        config = data_dir / "config.json"
        if not config.exists():
            config.write_text(json.dumps({"sd_vae_decode_method": "TAESD", "sd_vae_encode_method": "TAESD"}))
    # Gradio 4 serves files only from allowed paths, the data dir by default: the webui's own
    # javascript/ and this checkout's (resolved through the link) must be added
    served = ["--gradio-allowed-path", str(FORGE_DIR), "--gradio-allowed-path", str(ROOT)] if ui else ["--nowebui"]
    flags = [*FORGE_FLAGS, "--api", *served, "--server-name", "127.0.0.1", "--port", str(port),
             "--ckpt-dir", str(ckpt.parent), "--ckpt", str(ckpt), "--data-dir", str(data_dir), *extra_args]
    # unbuffered: Forge's print()s (e.g. "control could not be applied") reach the log before a request returns
    process_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                   **(env or {})}
    with started("Forge", forge_python(), flags, FORGE_DIR, process_env, log_path, port) as client:
        yield client
