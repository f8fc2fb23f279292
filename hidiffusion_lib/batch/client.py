"""Client for the webui API (``--api``): pre-flight check, and generation with retries and backoff.

Connection drops, refused connections and 502/503/504 (a proxy in front of a restarting webui)
are retried with exponential backoff. A read timeout is not: the webui queues requests, so
sending the job again would pile a second copy behind the first.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests

from ..script_args import ARGS
from .jobfile import SCRIPT_TITLE, url_problem

_TRANSIENT_STATUS = (502, 503, 504)
_TRANSIENT_ERRORS = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


class WebuiError(Exception):
    """The webui cannot be used: the run stops. The message says what to do."""


class JobError(Exception):
    """The webui refused or botched one job: it is recorded as failed and the run goes on."""


class _Unreachable(Exception):
    """Connection attempts failed ``attempts`` times."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(reason)
        self.attempts = attempts


@dataclass(frozen=True)
class Backoff:
    """Retry policy: up to ``retries`` more attempts, waiting ``base``, ``2*base``, ... at most ``cap`` seconds."""

    retries: int = 8
    base: float = 2.0
    cap: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.cap, self.base * 2**attempt)


@dataclass(frozen=True)
class Generation:
    """One job's result: images (as returned, usually PNG) with their seeds and infotexts, and timings."""

    images: list[bytes]
    seeds: list[int | None]
    infotexts: list[str | None]
    info: dict
    seconds: float
    server_seconds: float | None
    attempts: int


def parse_auth(text: str) -> tuple[str, str]:
    """``user:pass`` as given to the webui's ``--api-auth`` (the password may hold colons)."""
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ValueError("--api-auth must be USER:PASS, as given to the webui's --api-auth")
    return user, password


def _reason(error: Exception) -> str:
    """A short cause of a requests error (urllib3's MaxRetryError keeps it in ``reason``)."""
    cause = error.args[0] if error.args else error
    text = str(getattr(cause, "reason", cause))
    return text if len(text) <= 160 else text[:157] + "..."


def _detail(response: requests.Response) -> str:
    """The webui's error message from an error response."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason or ""
    if not isinstance(body, dict):
        return str(body)[:200]
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI's request validation (422)
        return "; ".join(
            f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}" if isinstance(d, dict) else str(d) for d in detail
        )
    if detail:
        return str(detail)
    return ": ".join(str(body[k]) for k in ("error", "errors") if body.get(k)) or json.dumps(body)[:200]


class WebuiClient:
    """Talks to one webui. ``verify=False`` accepts a self-signed HTTPS certificate."""

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        verify: bool = True,
        timeout: float = 3600.0,
        connect_timeout: float = 10.0,
        backoff: Backoff = Backoff(),
        on_retry: Callable[[str], None] = lambda message: None,
    ):
        if problem := url_problem(url):
            raise ValueError(f"--url {problem}")
        self.url = url.strip().rstrip("/")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.backoff = backoff
        self.on_retry = on_retry
        self.session = requests.Session()
        self.session.auth = auth
        self.session.verify = verify

    @property
    def label(self) -> str:
        """The address without its scheme, for progress lines: ``127.0.0.1:7861``."""
        parts = urlsplit(self.url)
        return parts.netloc + parts.path

    def _send(
        self, method: str, path: str, body: dict | None, read_timeout: float, retries: int
    ) -> tuple[requests.Response, float, int]:
        """(response, seconds, attempts); raises _Unreachable, WebuiError (TLS) or requests' ReadTimeout."""
        for attempt in itertools.count():
            started = time.monotonic()
            try:
                response = self.session.request(
                    method, self.url + path, json=body, timeout=(self.connect_timeout, read_timeout)
                )
            except requests.exceptions.SSLError as error:
                raise WebuiError(
                    f"TLS with {self.url} failed ({_reason(error)}): pass --insecure for a self-signed certificate, "
                    "or use http:// if the webui does not serve HTTPS."
                ) from error
            except _TRANSIENT_ERRORS as error:
                reason = _reason(error)
            else:
                if response.status_code not in _TRANSIENT_STATUS:
                    return response, time.monotonic() - started, attempt + 1
                reason = f"HTTP {response.status_code}"
            if attempt >= retries:
                raise _Unreachable(reason, attempt + 1)
            delay = self.backoff.delay(attempt)
            self.on_retry(f"webui at {self.url} unavailable ({reason}); retry {attempt + 1}/{retries} in {delay:g} s")
            time.sleep(delay)

    def _auth_error(self) -> WebuiError:
        if self.session.auth is None:
            return WebuiError(
                f"The webui at {self.url} requires API credentials: pass --api-auth USER:PASS "
                "as set by its --api-auth flag."
            )
        return WebuiError(
            f"The webui at {self.url} rejected the --api-auth credentials: "
            "use a USER:PASS pair from its --api-auth flag."
        )

    def _get(self, path: str, kind: type) -> object:
        """The JSON of a GET before the first job, of type ``kind``; one attempt, WebuiError saying what to do."""
        try:
            response, _, _ = self._send("GET", path, None, 60.0, retries=0)
        except _Unreachable as error:
            raise WebuiError(
                f"Cannot reach the webui at {self.url} ({error}): start it with --api "
                "(and --listen to reach it from another machine), or correct --url."
            ) from None
        except requests.exceptions.ReadTimeout:
            raise WebuiError(
                f"The webui at {self.url} accepted the connection but did not answer: restart it."
            ) from None
        if response.status_code == 401:
            raise self._auth_error()
        if response.status_code == 404:
            raise WebuiError(f"The webui at {self.url} answers but its API is off: restart it with the --api flag.")
        try:
            data = response.json() if response.status_code == 200 else None
        except ValueError:
            data = None
        if not isinstance(data, kind):
            raise WebuiError(
                f"{self.url}{path} answered HTTP {response.status_code} and not like the webui API "
                f"({_detail(response)[:100]}): check --url."
            )
        return data

    def check(self, img2img: bool = False) -> None:
        """Before the first job: the webui answers, its API is on, and the extension takes the expected args."""
        entries = self._get("/sdapi/v1/script-info", list)
        for is_img2img in (False, True) if img2img else (False,):
            entry = next(
                (
                    e for e in entries
                    if isinstance(e, dict) and e.get("name") == SCRIPT_TITLE.lower()
                    and bool(e.get("is_img2img")) == is_img2img
                ),
                None,
            )
            if entry is None:
                raise WebuiError(
                    f"The HiDiffusion extension is not loaded in the webui at {self.url}"
                    f"{' for img2img' if is_img2img else ''}: install it in the webui's extensions folder, "
                    "restart the webui and check its console for errors."
                )
            self._check_args([a.get("label") if isinstance(a, dict) else a for a in entry.get("args") or []])

    def _check_args(self, labels: list) -> None:
        expected = [a.label for a in ARGS]
        if labels == expected:
            return
        if len(labels) != len(expected):
            difference = f"takes {len(labels)} arguments where this client sends {len(expected)}"
        else:
            index = next(i for i, (a, b) in enumerate(zip(labels, expected, strict=True)) if a != b)
            difference = f"names argument {index} {labels[index]!r} where this client expects {expected[index]!r}"
        raise WebuiError(
            f"At {self.url}, the webui's HiDiffusion extension {difference}: update the extension "
            "and this client to the same version."
        )

    def loaded_checkpoint(self) -> str | None:
        """The title of the checkpoint the webui has loaded (``sd_model_checkpoint``), None if it does not say."""
        name = self._get("/sdapi/v1/options", dict).get("sd_model_checkpoint")
        return name if isinstance(name, str) and name else None

    def checkpoints(self) -> list[dict]:
        """The webui's checkpoints (``/sdapi/v1/sd-models``: title, model_name, hash, sha256, filename)."""
        return [m for m in self._get("/sdapi/v1/sd-models", list) if isinstance(m, dict)]

    def generate(self, mode: str, payload: dict) -> Generation:
        """Run one job (``mode`` is txt2img or img2img); raises JobError or WebuiError."""
        try:
            response, seconds, attempts = self._send(
                "POST", f"/sdapi/v1/{mode}", payload, self.timeout, retries=self.backoff.retries
            )
        except _Unreachable as error:
            raise WebuiError(
                f"The webui at {self.url} stopped answering ({error}) and did not come back after "
                f"{error.attempts} attempts: start it again, then run the same command to resume."
            ) from None
        except requests.exceptions.ReadTimeout:
            raise JobError(f"no answer within {self.timeout:g} s (raise --timeout for slow jobs)") from None
        if response.status_code == 401:
            raise self._auth_error()
        if response.status_code != 200:
            raise JobError(f"HTTP {response.status_code}: {_detail(response)}")
        try:
            data = response.json()
            info = json.loads(data["info"])
            if not isinstance(info, dict):
                raise TypeError("info is not a JSON object")
            images = [base64.b64decode(image, validate=True) for image in data["images"]]
            # A returned grid comes first (index_of_first_image); extensions may append extra images.
            seeds = info.get("all_seeds") or []
            first = info.get("index_of_first_image") or 0
            images = images[first:first + len(seeds)] if seeds else images[first:]
            if not images:
                raise ValueError("no images")
        except (ValueError, TypeError, KeyError, binascii.Error) as error:
            raise JobError(f"malformed response from the webui: {type(error).__name__}: {error}") from None
        infotexts = (info.get("infotexts") or [])[first:]
        try:
            server_seconds = float(response.headers["X-Process-Time"])
        except (KeyError, ValueError):
            server_seconds = None
        return Generation(
            images=images,
            seeds=[seeds[i] if i < len(seeds) else None for i in range(len(images))],
            infotexts=[infotexts[i] if i < len(infotexts) else None for i in range(len(images))],
            info=info,
            seconds=seconds,
            server_seconds=server_seconds,
            attempts=attempts,
        )
