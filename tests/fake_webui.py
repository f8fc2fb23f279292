"""A stand-in for the AUTOMATIC1111 webui v1.10.1 API on 127.0.0.1, for the batch client's tests.

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
- modules/processing.py ``Processed.js()``: the ``info`` JSON string.
Without ``api`` every route is FastAPI's 404 ``{"detail": "Not Found"}``, as a webui without --api.
The error bodies were compared with a real webui v1.10.1 (``--api --nowebui --api-auth``).

Fault knobs for generation requests: ``faults`` is a queue consumed one per request: "drop" (close
the connection without an answer), "slow" (answer after ``slow_seconds``), "503" (as a proxy in
front of a webui that is down), "malformed"
(200 with a body that is not JSON), "no-images" (200 without ``images``), "cut-png" (200 with
each PNG cut short, its base64 still valid), "restart" (drop, stop
the server, start it again on the same port after ``restart_seconds``). ``hold``, when set to an
Event, makes generation requests after the first ``hold_after`` wait for it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, PngImagePlugin

from hidiffusion_lib.batch.client import Backoff, WebuiClient
from hidiffusion_lib.script_args import ARGS, ArgError, parse

SAMPLERS = ("DPM++ 2M", "Euler a", "Euler", "LMS", "Heun", "DDIM")
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


@dataclass
class Received:
    method: str
    path: str
    headers: dict
    body: object


class FakeWebui:
    """The fake server; use as a context manager or call start()/stop()."""

    def __init__(self, *, auth: tuple[str, str] | None = None, api: bool = True, installed: bool = True,
                 labels: list[str] | None = None, image_format: str = "PNG"):
        self.auth = auth
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

    def _restart(self) -> None:
        self.stop()
        time.sleep(self.restart_seconds)
        self.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn: a restart breaks pooled connections

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                fake._serve(self, "GET")

            def do_POST(self) -> None:
                fake._serve(self, "POST")

        return Handler

    def _serve(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        started = time.monotonic()
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
            if fault in ("drop", "restart"):
                handler.close_connection = True
                if fault == "restart":
                    threading.Thread(target=self._restart, daemon=True).start()
                return
            if fault == "slow":
                time.sleep(self.slow_seconds)
            if fault == "malformed":
                return self._send(handler, 200, b"<html>Internal proxy page</html>", "text/html")
            if fault == "503":
                return self._send(handler, 503, b"Service Unavailable", "text/plain")
            if self.hold is not None and len(self.generations()) > self.hold_after:
                self.hold.wait()
            status, payload = self._route(method, handler.path, handler.headers, body)
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

    def _processed(self, request: dict, sampler: str, hidiffusion: bool) -> dict:
        count = request["batch_size"] * request["n_iter"]
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
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": "fake", "sd_model_hash": None,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": request["denoising_strength"],
            "extra_generation_params": {"HiDiffusion": True} if hidiffusion else {},
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "job_timestamp": "20240101000000",
            "clip_skip": 1, "is_using_inpainting_conditioning": False, "version": "v1.10.1",
        }
        return {"images": images, "parameters": request, "info": json.dumps(info)}


def client_for(fake: FakeWebui, **options) -> WebuiClient:
    """A client of ``fake`` with tiny backoff that ignores proxy settings: traffic stays on 127.0.0.1."""
    options.setdefault("backoff", Backoff(retries=3, base=0.01, cap=0.05))
    client = WebuiClient(fake.url, **options)
    client.session.trust_env = False
    return client
