"""A stand-in for the AUTOMATIC1111 webui v1.10.1 API on 127.0.0.1, for the batch client's tests
(``tests/fake_webui.py``) and its scaling benchmark (``scale.py``). Each instance listens on its own
loopback port, so several can stand for several webuis.

Shapes follow the webui's source:
- modules/api/api.py: the routes; ``auth`` (HTTP Basic when started with ``--api-auth``, 401 otherwise);
  ``api_middleware``'s error body ``{"error", "detail", "body", "errors"}``; ``script_name_to_index`` /
  ``init_script_args`` (always-on scripts matched by ``title().lower()``, an unknown one is a 422);
  ``img2imgapi`` (404 "Init image not found", 500 "Invalid encoded image"); ``encode_pil_to_base64``
  (PNG with the "parameters" text chunk).
- modules/sd_samplers.py ``get_sampler_and_scheduler``: an unknown sampler falls back to the default.
- modules/api/models.py: ``ScriptInfo`` / ``ScriptArg``, ``TextToImageResponse`` (images, parameters,
  info), and FastAPI's 422 validation body ``{"detail": [{"loc", "msg", "type"}]}``.
- modules/scripts.py ``create_script_ui_inner``: script-info entries (name = title().lower()).
- modules/processing.py ``Processed.js()``: the ``info`` JSON string; ``process_images`` skips an
  ``override_settings.sd_model_checkpoint`` that names no known checkpoint, without an error.
- modules/sd_models.py ``CheckpointInfo``: a checkpoint's title ``name [shorthash]`` and the ids it is
  found by; modules/api/api.py ``get_sd_models`` / ``get_config``: ``/sdapi/v1/sd-models``, ``/sdapi/v1/options``.
Without ``api`` every route is FastAPI's 404 ``{"detail": "Not Found"}``, as a webui without --api.
The error bodies were compared with a real webui v1.10.1 (``--api --nowebui --api-auth``).

Fault knobs for generation requests: ``faults`` is a queue consumed one per request: "drop" (close
the connection without an answer), "slow" (answer after ``slow_seconds``), "503" (as a proxy in
front of a webui that is down), "malformed"
(200 with a body that is not JSON), "no-images" (200 without ``images``), "cut-png" (200 with
each PNG cut short, its base64 still valid), "restart" (drop, stop
the server, start it again on the same port after ``restart_seconds``), "die" (drop and stop for
good, as a webui that crashed or a machine that went away; ``die()`` does it from outside, and a
generation in flight then gets no answer). ``hold``, when set to an Event, makes generation requests
after the first ``hold_after`` wait for it. ``latency`` delays every generation by that many seconds
(a GPU's time), ``checkpoint`` is the loaded checkpoint's title and ``checkpoints`` the titles listed.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, PngImagePlugin

from ..script_args import ARGS, ArgError, parse
from .client import WebuiClient

SAMPLERS = ("DPM++ 2M", "Euler a", "Euler", "LMS", "Heun", "DDIM")
CHECKPOINT = "fake.safetensors [0123456789]"
# Defaults of StableDiffusionProcessingTxt2Img / Img2Img and the API models, for "parameters".
_DEFAULTS = {
    "prompt": "", "negative_prompt": "", "seed": -1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512,
    "batch_size": 1, "n_iter": 1, "sampler_name": None, "sampler_index": "Euler", "scheduler": None,
    "enable_hr": False, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "denoising_strength": 0.75,
    "send_images": True, "save_images": False, "alwayson_scripts": {}, "override_settings": None,
}
_TYPES = {  # pydantic v1 field types of the request models (those the client sends)
    int: ("seed", "steps", "width", "height", "batch_size", "n_iter", "hr_second_pass_steps"),
    float: ("cfg_scale", "hr_scale", "denoising_strength"),
    str: ("prompt", "negative_prompt", "sampler_name", "scheduler", "hr_upscaler"),
    bool: ("enable_hr", "send_images", "save_images"),
    dict: ("alwayson_scripts", "override_settings"),
    list: ("init_images",),
}
_TYPE_ERRORS = {  # pydantic v1's message and type; it also coerces e.g. "20" to 20, which this fake refuses
    int: ("value is not a valid integer", "type_error.integer"),
    float: ("value is not a valid float", "type_error.float"),
    str: ("str type expected", "type_error.str"),
    bool: ("value could not be parsed to a boolean", "type_error.bool"),
    dict: ("value is not a valid dict", "type_error.dict"),
    list: ("value is not a valid list", "type_error.list"),
}


def script_info_entry(is_img2img: bool, labels: list[str] | None = None) -> dict:
    """The script-info entry the extension's ui() produces (ScriptInfo / ScriptArg)."""
    args = []
    for arg in ARGS:
        item = {"label": arg.label, "value": arg.default, "minimum": None, "maximum": None, "step": None,
                "choices": list(arg.choices) if arg.kind == "choice" else None}
        if arg.kind in ("ratio", "int"):
            item |= {"minimum": arg.low, "maximum": arg.high, "step": 0.01 if arg.kind == "ratio" else 1}
        args.append(item)
    if labels is not None:
        args = [{"label": label, "value": None, "minimum": None, "maximum": None, "step": None, "choices": None}
                for label in labels]
    return {"name": "hidiffusion", "is_alwayson": True, "is_img2img": is_img2img, "args": args}


def _error(status: int, detail: str) -> tuple[int, dict]:
    """api_middleware's body for an HTTPException (the real webui v1.10.1 sends "errors": "")."""
    return status, {"error": "HTTPException", "detail": detail, "body": "", "errors": ""}


def _checkpoint(title: str) -> dict:
    """A /sdapi/v1/sd-models entry, and the ids the webui finds it by (CheckpointInfo.ids), of a title
    ``name [shorthash]`` (``name`` alone: not hashed)."""
    name, _, rest = title.partition(" [")
    shorthash = rest.rstrip("]") or None
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    model_name = name.replace("/", "_").rsplit(".", 1)[0]
    sha256 = shorthash and (shorthash * 7)[:64]
    entry = {"title": title, "model_name": model_name, "hash": shorthash, "sha256": sha256,
             "filename": f"/webui/models/Stable-diffusion/{name}", "config": None}
    ids = {model_name, title, name, stem}
    if shorthash:
        ids |= {shorthash, sha256, f"{name} [{shorthash}]", f"{stem} [{shorthash}]"}
    return entry | {"ids": ids}


@dataclass
class Received:
    method: str
    path: str
    headers: dict
    body: object


class FakeWebui:
    """The fake server; use as a context manager or call start()/stop()."""

    def __init__(self, *, auth: tuple[str, str] | None = None, api: bool = True, installed: bool = True,
                 labels: list[str] | None = None, image_format: str = "PNG", latency: float = 0.0,
                 checkpoint: str = CHECKPOINT, checkpoints: list[str] | None = None):
        self.auth = auth
        self.latency = latency
        self.checkpoint = checkpoint
        self.checkpoints = checkpoints if checkpoints is not None else [checkpoint]
        self.dead = False
        self.made: list[dict] = []  # bodies of the generations answered with images
        self.api = api
        self.installed = installed
        self.labels = labels
        self.image_format = image_format
        self.faults: list[str] = []
        self.fail_prompts: set[str] = set()  # a prompt here makes generation raise (HTTP 500)
        self.process_time = None  # callable(body) -> X-Process-Time of a generation; default: measured
        self.hold: threading.Event | None = None
        self.hold_after = 0
        self.slow_seconds = 1.0
        self.restart_seconds = 0.3
        self.requests: list[Received] = []
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def generations(self) -> list[Received]:
        return [r for r in self.requests if r.method == "POST"]

    def start(self) -> FakeWebui:
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        with self._stopping:  # die() from a handler and __exit__ may race
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None

    def __enter__(self) -> FakeWebui:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.hold is not None:
            self.hold.set()
        self.stop()

    def die(self) -> None:
        """Stop for good: connections are refused, a generation in flight gets no answer."""
        self.dead = True
        self.stop()

    def _restart(self) -> None:
        self.stop()
        time.sleep(self.restart_seconds)
        self.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn: a restart breaks pooled connections
            # As uvicorn (TCP_NODELAY): else the body, written after the headers, waits for the client's
            # delayed ACK, 40 ms on Linux, on every answer of a kept-alive connection.
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                fake._serve(self, "GET")

            def do_POST(self) -> None:
                fake._serve(self, "POST")

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        started = time.monotonic()
        if self.dead:  # a request that got in while the server was going down
            handler.close_connection = True
            return
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw
        with self._lock:
            self.requests.append(Received(method, handler.path, dict(handler.headers), body))
        if method == "POST" and self.api:
            fault = self.faults.pop(0) if self.faults else None
            if fault in ("drop", "restart", "die"):
                handler.close_connection = True
                if fault == "restart":
                    threading.Thread(target=self._restart, daemon=True).start()
                if fault == "die":
                    self.die()  # stopped before this connection closes: the client's retries are refused
                return
            if fault == "slow":
                time.sleep(self.slow_seconds)
            if fault == "malformed":
                return self._send(handler, 200, b"<html>Internal proxy page</html>", "text/html")
            if fault == "503":
                return self._send(handler, 503, b"Service Unavailable", "text/plain")
            if self.hold is not None and len(self.generations()) > self.hold_after:
                self.hold.wait()
            if self.latency:
                time.sleep(self.latency)
            if self.dead:  # died while working on it
                handler.close_connection = True
                return
            status, payload = self._route(method, handler.path, handler.headers, body)
            if status == 200:
                with self._lock:
                    self.made.append(body)
            if fault == "no-images" and status == 200:
                del payload["images"]
            if fault == "cut-png" and status == 200:
                payload["images"] = [base64.b64encode(base64.b64decode(i)[:200]).decode() for i in payload["images"]]
        else:
            status, payload = self._route(method, handler.path, handler.headers, body)
        simulated = self.process_time and method == "POST" and status == 200
        seconds = self.process_time(body) if simulated else time.monotonic() - started
        self._send_json(handler, status, payload, {"X-Process-Time": str(round(seconds, 4))})

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, data: bytes, kind: str, headers: dict | None = None):
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", kind)
            handler.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): nothing to answer
            pass

    def _send_json(self, handler: BaseHTTPRequestHandler, status: int, payload: object, headers: dict | None = None):
        self._send(handler, status, json.dumps(payload).encode(), "application/json", headers)

    def _route(self, method: str, path: str, headers, body) -> tuple[int, object]:
        if not self.api or not path.startswith("/sdapi/v1/"):
            return 404, {"detail": "Not Found"}
        if self.auth is not None:
            expected = "Basic " + base64.b64encode(":".join(self.auth).encode()).decode()
            given = headers.get("Authorization")
            if given is None:
                return _error(401, "Not authenticated")
            if given != expected:
                return _error(401, "Incorrect username or password")
        if method == "GET" and path == "/sdapi/v1/options":
            return 200, {"sd_model_checkpoint": self.checkpoint, "samples_format": "png", "sd_vae": "Automatic"}
        if method == "GET" and path == "/sdapi/v1/sd-models":
            return 200, [{k: v for k, v in _checkpoint(title).items() if k != "ids"} for title in self.checkpoints]
        if method == "GET" and path == "/sdapi/v1/script-info":
            entries = [{"name": "prompt matrix", "is_alwayson": False, "is_img2img": False, "args": []}]
            if self.installed:
                entries += [script_info_entry(False, self.labels), script_info_entry(True, self.labels)]
            return 200, entries
        if method == "POST" and path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
            return self._generate(path.rsplit("/", 1)[1], body)
        return 404, {"detail": "Not Found"}

    def _generate(self, mode: str, body: object) -> tuple[int, object]:
        if not isinstance(body, dict):
            return 422, {"detail": [{"loc": ["body"], "msg": _TYPE_ERRORS[dict][0], "type": _TYPE_ERRORS[dict][1]}]}
        invalid = [
            {"loc": ["body", key], "msg": _TYPE_ERRORS[kind][0], "type": _TYPE_ERRORS[kind][1]}
            for kind, keys in _TYPES.items() for key in keys
            if body.get(key) is not None and not isinstance(body[key], kind)
            and not (kind is float and isinstance(body[key], int))
        ]
        if invalid:
            return 422, {"detail": invalid}
        request = _DEFAULTS | body
        for name in request["alwayson_scripts"]:
            if name.lower() != "hidiffusion" or not self.installed:
                return _error(422, f"Script '{name}' not found")  # from script_name_to_index
        # sd_samplers.get_sampler_and_scheduler: an unknown name silently becomes the default sampler.
        sampler = request["sampler_name"] or request["sampler_index"]
        sampler = sampler if sampler in SAMPLERS else SAMPLERS[0]
        if mode == "img2img":
            if request.get("init_images") is None:
                return _error(404, "Init image not found")
            try:
                for encoded in request["init_images"]:
                    Image.open(io.BytesIO(base64.b64decode(encoded, validate=True))).load()
            except (OSError, binascii.Error):
                return _error(500, "Invalid encoded image")
        args = request["alwayson_scripts"].get("HiDiffusion", {}).get("args", [])
        try:
            hidiffusion = parse(args)
        except ArgError as error:  # the extension raises; api_middleware answers vars(e).get("status_code", 500)
            body = {"error": "ArgError", "detail": "", "body": "", "errors": str(error)}
            return getattr(error, "status_code", 500), body
        if request["prompt"] in self.fail_prompts:
            return 500, {"error": "RuntimeError", "detail": "", "body": "", "errors": "CUDA out of memory (fake)"}
        return 200, self._processed(request, sampler, hidiffusion.enabled)

    def _model(self, request: dict) -> dict:
        """The checkpoint a generation runs on: the one its override_settings names, else the loaded one."""
        wanted = (request["override_settings"] or {}).get("sd_model_checkpoint")
        listed = [_checkpoint(title) for title in self.checkpoints]
        return next((c for c in listed if wanted in c["ids"]), _checkpoint(self.checkpoint))

    def _processed(self, request: dict, sampler: str, hidiffusion: bool) -> dict:
        count = request["batch_size"] * request["n_iter"]
        model = self._model(request)
        seed = request["seed"] if request["seed"] != -1 else random.randrange(2**32)
        seeds = [seed + i for i in range(count)]
        width, height = request["width"], request["height"]
        if request["enable_hr"]:
            width, height = int(width * request["hr_scale"]), int(height * request["hr_scale"])
        infotexts, images = [], []
        for s in seeds:
            text = (f"{request['prompt']}\nNegative prompt: {request['negative_prompt']}\n"
                    f"Steps: {request['steps']}, Sampler: {sampler}, CFG scale: {request['cfg_scale']}, "
                    f"Seed: {s}, Size: {width}x{height}" + (", HiDiffusion: True" if hidiffusion else ""))
            infotexts.append(text)
            image = Image.new("RGB", (width, height), ((s * 37) % 256, (s * 91) % 256, 128 if hidiffusion else 0))
            data = io.BytesIO()
            if self.image_format == "PNG":
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", text)
                image.save(data, format="PNG", pnginfo=info)
            else:
                image.save(data, format=self.image_format)
            images.append(base64.b64encode(data.getvalue()).decode())
        info = {
            "prompt": request["prompt"], "all_prompts": [request["prompt"]] * count,
            "negative_prompt": request["negative_prompt"], "all_negative_prompts": [request["negative_prompt"]] * count,
            "seed": seed, "all_seeds": seeds, "subseed": seed, "all_subseeds": seeds, "subseed_strength": 0,
            "width": request["width"], "height": request["height"], "sampler_name": sampler,
            "cfg_scale": request["cfg_scale"], "steps": request["steps"], "batch_size": request["batch_size"],
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": model["model_name"],
            "sd_model_hash": model["hash"],
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": request["denoising_strength"],
            "extra_generation_params": {"HiDiffusion": True} if hidiffusion else {},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": "20240101000000",
            "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": "v1.10.1",
        }
        return {"images": images, "parameters": request, "info": json.dumps(info)}


def loopback_client(url: str, **options) -> WebuiClient:
    """A WebuiClient of ``url`` (``options``: WebuiClient's) that ignores proxy settings: traffic stays
    on 127.0.0.1 even where HTTP_PROXY is set."""
    client = WebuiClient(url, **options)
    client.session.trust_env = False
    return client


@contextmanager
def fleet(count: int, **options) -> Iterator[list[FakeWebui]]:
    """``count`` started fakes, each on its own loopback port (``options``: FakeWebui's), stopped on exit."""
    with ExitStack() as stack:
        yield [stack.enter_context(FakeWebui(**options)) for _ in range(count)]
