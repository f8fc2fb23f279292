"""The job file: its schema, validation that names each bad field and its position, grid expansion.

A job file (YAML or JSON) is a mapping with ``jobs`` (a list of entries), optional ``defaults``
(fields applied under every entry), optional ``servers`` (webui addresses that share the jobs) and
optional ``version: 1``. An entry sets fields of FIELDS
and may hold ``grid``, a mapping from field name to a list of values: the entry expands to the
cartesian product, in the order the axes are written, the last varying fastest.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from ..script_args import ARG_NAMES, MODES, ArgError, parse, to_positional

SCRIPT_TITLE = "HiDiffusion"
GENERATION_MODES = ("txt2img", "img2img")
# Job fields the report does not group by: a sweep compares cells that differ only in these.
SWEEP_AXES = ("size", "hidiffusion", "hires")
_DEFAULT_SETTINGS = parse([]).as_dict()
# The modes of the X/Y/Z axis, by a forgiving key: "rau_net", "RAU-Net" and "raunet" are one.
_MODE_KEYS = {re.sub(r"[\s_-]", "", mode.lower()): mode for mode in MODES} | {
    "on": "full", "none": "off", "false": "off", "true": "full",
}
_SIZE = re.compile(r"(\d+)\s*[x×]\s*(\d+)", re.IGNORECASE)
_TOP_KEYS = ("version", "defaults", "servers", "jobs")


class JobFileError(ValueError):
    """The job file is invalid; ``problems`` holds one message per bad field."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        super().__init__("\n  ".join([f"{source}: invalid job file", *problems]))


class _Bad(ValueError):
    """A value is invalid; ``sub`` is the path below the field that holds the bad part."""

    def __init__(self, message: str, sub: tuple = ()):
        super().__init__(message)
        self.sub = sub


def _text(value: object) -> str:
    if not isinstance(value, str):
        # YAML reads bare yes/no/on/off as booleans and digits as numbers.
        raise _Bad(f"must be text (put it in quotes), got {value!r}")
    return value


def _name(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"must be non-empty text, got {value!r}")
    return value.strip()


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false, got {value!r}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(low: int, high: int | None = None) -> Callable[[object], int]:
    accepted = f">= {low}" if high is None else f"in [{low}, {high}]"

    def check(value: object) -> int:
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise _Bad(f"must be an integer {accepted}, got {value!r}")
        return value

    return check


def _number(low: float, high: float) -> Callable[[object], float]:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            raise _Bad(f"must be a number in [{low:g}, {high:g}], got {value!r}")
        return float(value)

    return check


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if value not in options:
            raise _Bad(f"must be one of {', '.join(options)}, got {value!r}")
        return value

    return check


def _mapping(value: object) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _Bad(f"must be a mapping of webui option names to values, got {value!r}")
    return value


def _size(value: object) -> list[int]:
    if _is_int(value):
        pair = [value, value]
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        pair = [int(match[1]), int(match[2])]
    elif isinstance(value, list) and len(value) == 2 and all(map(_is_int, value)):
        pair = list(value)
    else:
        raise _Bad(f'must be "WIDTHxHEIGHT" (e.g. "1024x1024"), [width, height] or one number, got {value!r}')
    if not all(64 <= v <= 8192 and v % 8 == 0 for v in pair):
        raise _Bad(f"width and height must be multiples of 8 in [64, 8192], got {pair[0]}x{pair[1]}")
    return pair


_HIRES_FIELDS: dict[str, tuple[Callable[[object], object], object]] = {
    "scale": (_number(1, 8), 2.0),
    "upscaler": (_text, "Latent"),
    "steps": (_integer(0, 1000), 0),
    "denoising_strength": (_number(0, 1), 0.7),
}


def _hires(value: object) -> dict | None:
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("off", "none")):
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise _Bad(f"must be false, true or a mapping of {', '.join(_HIRES_FIELDS)}, got {value!r}")
    hires = {}
    for key, (check, default) in _HIRES_FIELDS.items():
        try:
            hires[key] = check(value[key]) if key in value else default
        except _Bad as bad:
            raise _Bad(str(bad), (key,)) from None
    for key in value:
        if key not in _HIRES_FIELDS:
            raise _Bad(_unknown(key, _HIRES_FIELDS), (key,))
    return hires


def _hidiffusion(value: object) -> dict:
    if isinstance(value, bool | str):
        mode = _MODE_KEYS.get(re.sub(r"[\s_-]", "", str(value).lower()))
        if mode is None:
            raise _Bad(f"must be off, RAU-Net, MSW-MSA, full or a mapping of settings, got {value!r}")
        return _setting(MODES[mode], mode)
    if not isinstance(value, dict):
        raise _Bad(f"must be off, RAU-Net, MSW-MSA, full or a mapping of settings, got {value!r}")
    label = value.get("label")
    if label is not None and not (isinstance(label, str) and label.strip()):
        raise _Bad(f"must be non-empty text, got {label!r}", ("label",))
    named = {"enabled": True}
    for key, item in value.items():
        if key == "label":
            continue
        if key not in ARG_NAMES:
            raise _Bad(_unknown(key, ("label", *ARG_NAMES)), (key,))
        try:  # one at a time, so that an error names its own key
            named[key] = getattr(parse(to_positional({key: item})), key)
        except ArgError as error:
            raise _Bad(str(error), (key,)) from None
    return _setting(named, label.strip() if label else None)


def _setting(named: dict, label: str | None) -> dict:
    """The normalised form: settings that differ from the extension's defaults (so that ids stay the same
    for the same request) and a label, derived from them unless given."""
    typed = parse(to_positional(named)).as_dict()
    settings = {k: v for k, v in typed.items() if k == "enabled" or v != _DEFAULT_SETTINGS[k]}
    if label is None:
        parts = {(True, True): "full", (True, False): "RAU-Net", (False, True): "MSW-MSA", (False, False): "no-op"}
        extra = [f"{k}={v}" for k, v in settings.items() if k not in ("enabled", "raunet", "mswmsa")]
        label = " ".join([parts[typed["raunet"], typed["mswmsa"]], *extra]) if typed["enabled"] else "off"
    return {"label": label, "settings": settings}


# name -> (check, default). The defaults are the values a job gets when neither it nor ``defaults`` sets them.
FIELDS: dict[str, tuple[Callable[[object], object], object]] = {
    "name": (_name, None),
    "mode": (_choice(GENERATION_MODES), "txt2img"),
    "prompt": (_text, None),
    "negative_prompt": (_text, ""),
    "size": (_size, [1024, 1024]),
    "seed": (_integer(-1), -1),
    "steps": (_integer(1, 1000), 20),
    "sampler": (_text, None),
    "scheduler": (_text, None),
    "cfg_scale": (_number(0, 100), 7.0),
    "batch_size": (_integer(1, 64), 1),
    "n_iter": (_integer(1, 1000), 1),
    "init_image": (_text, None),
    "denoising_strength": (_number(0, 1), 0.75),
    "hires": (_hires, None),
    "hidiffusion": (_hidiffusion, _hidiffusion("full")),
    "override_settings": (_mapping, {}),
    "save_images": (_flag, False),
}
_DEFAULTS = {key: default for key, (_, default) in FIELDS.items()}
GRID_AXES = tuple(k for k in FIELDS if k != "name")


def _unknown(key: object, known) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field {key!r}: {hint}known: {', '.join(known)}"


def url_problem(url: object) -> str | None:
    """Why ``url`` is not a webui address (``must be ...``), or None when it is one."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// address such as http://127.0.0.1:7860, got {url!r}"
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        return f"must have a port number in [0, 65535], got {url!r}"
    return None


def server_key(url: str) -> tuple:
    """What makes two addresses one webui: scheme, host and port (the default one when left out), and path."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def setting_label(spec: dict) -> str:
    """The column of a job in a sweep: its HiDiffusion setting, plus hires fix when on."""
    label = spec["hidiffusion"]["label"]
    return f"{label} + hires x{spec['hires']['scale']:g}" if spec.get("hires") else label


def output_size(spec: dict) -> tuple[int, int]:
    """The size of the images a job produces (after the hires fix upscale)."""
    width, height = spec["size"]
    if spec.get("hires"):
        scale = spec["hires"]["scale"]
        return int(width * scale), int(height * scale)
    return width, height


@dataclass(frozen=True)
class Job:
    """One webui request. ``id`` hashes ``spec``; ``source`` is the entry's position, e.g. ``jobs[2]``."""

    id: str
    source: str
    spec: dict
    init_path: Path | None = None

    @property
    def mode(self) -> str:
        return self.spec["mode"]

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint the job pins (``override_settings.sd_model_checkpoint``), or None."""
        name = self.spec["override_settings"].get("sd_model_checkpoint")
        return name if isinstance(name, str) and name.strip() else None

    def cost(self) -> int:
        """Relative work (pixel-steps), for the progress bar's ETA."""
        s = self.spec
        width, height = s["size"]
        steps = s["steps"] * (s["denoising_strength"] if s["mode"] == "img2img" else 1)
        work = width * height * steps
        if s["hires"]:
            out_w, out_h = output_size(s)
            work += out_w * out_h * (s["hires"]["steps"] or s["steps"]) * s["hires"]["denoising_strength"]
        return round(work * s["batch_size"] * s["n_iter"])

    def request(self) -> dict:
        """The JSON body of ``POST /sdapi/v1/{mode}`` (webui v1.10 field names)."""
        s = self.spec
        body = {
            "prompt": s["prompt"],
            "negative_prompt": s["negative_prompt"],
            "seed": s["seed"],
            "steps": s["steps"],
            "cfg_scale": s["cfg_scale"],
            "width": s["size"][0],
            "height": s["size"][1],
            "batch_size": s["batch_size"],
            "n_iter": s["n_iter"],
            "send_images": True,
            "save_images": s["save_images"],
            "override_settings": s["override_settings"],
            "alwayson_scripts": {SCRIPT_TITLE: {"args": to_positional(s["hidiffusion"]["settings"])}},
        }
        for field, key in (("sampler", "sampler_name"), ("scheduler", "scheduler")):
            if s[field] is not None:
                body[key] = s[field]
        if s["hires"]:
            hires = s["hires"]
            body |= {
                "enable_hr": True,
                "hr_scale": hires["scale"],
                "hr_upscaler": hires["upscaler"],
                "hr_second_pass_steps": hires["steps"],
                "denoising_strength": hires["denoising_strength"],
            }
        if s["mode"] == "img2img":
            body["init_images"] = [base64.b64encode(self.init_path.read_bytes()).decode("ascii")]
            body["denoising_strength"] = s["denoising_strength"]
        return body


class _Problems:
    """Collects messages, each prefixed with the field's path and, when known, its line."""

    def __init__(self, lines: dict[tuple, int]):
        self.lines = lines
        self.items: dict[str, None] = {}  # ordered and de-duplicated: grid cells repeat problems

    def add(self, path: tuple, message: str) -> None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"
        line = next((self.lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in self.lines), None)
        self.items[f"{where}{f' (line {line})' if line else ''}: {message}"] = None


_INVALID = object()


def _field(key: str, value: object, path: tuple, problems: _Problems) -> object:
    try:
        return FIELDS[key][0](value)
    except _Bad as bad:
        problems.add((*path, *bad.sub), str(bad))
        return _INVALID


def _entry(raw: object, path: tuple, problems: _Problems) -> tuple[dict, dict]:
    """Fields and grid axes of one entry (or of ``defaults``), checked."""
    fields, grid = {}, {}
    if not isinstance(raw, dict):
        problems.add(path, f"must be a mapping of job fields, got {raw!r}")
        return fields, grid
    for key, value in raw.items():
        if key == "grid":
            grid = _grid(value, (*path, key), problems)
        elif key in FIELDS:
            if (checked := _field(key, value, (*path, key), problems)) is not _INVALID:
                fields[key] = checked
        else:
            problems.add((*path, key), _unknown(key, (*FIELDS, "grid")))
    return fields, grid


def _grid(raw: object, path: tuple, problems: _Problems) -> dict[str, list]:
    if not isinstance(raw, dict):
        problems.add(path, f"must be a mapping from field name to a list of values, got {raw!r}")
        return {}
    axes = {}
    for key, values in raw.items():
        if key not in GRID_AXES:
            problems.add((*path, key), _unknown(key, GRID_AXES))
        elif not isinstance(values, list) or not values:
            problems.add((*path, key), f"must be a non-empty list of values, got {values!r}")
        else:
            checked = [_field(key, v, (*path, key, i), problems) for i, v in enumerate(values)]
            if _INVALID not in checked:
                axes[key] = checked
    return axes


def _cross_check(spec: dict, path: tuple, base: Path, problems: _Problems) -> Path | None:
    """Checks between fields of one expanded job; returns the resolved init image."""
    if spec["prompt"] is None:
        problems.add(path, "'prompt' is required (in the entry, its grid or defaults)")
    if spec["mode"] == "txt2img":
        if spec["init_image"] is not None:
            problems.add(path, "'init_image' is only used with mode: img2img")
        return None
    if spec["hires"]:
        problems.add(path, "'hires' (hires fix) applies to mode: txt2img only")
    if spec["init_image"] is None:
        problems.add(path, "mode: img2img needs 'init_image' (a path relative to the job file)")
        return None
    init_path = (base / spec["init_image"]).resolve()
    if not init_path.is_file():
        problems.add((*path, "init_image"), f"file not found: {init_path}")
    return init_path


def _servers(raw: object, problems: _Problems) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        problems.add(("servers",), f"must be a non-empty list of webui addresses, got {raw!r}")
        return []
    servers: list[str] = []
    seen: dict[tuple, int] = {}
    for index, url in enumerate(raw):
        if problem := url_problem(url):
            problems.add(("servers", index), problem)
            continue
        key = server_key(url)
        if key in seen:
            problems.add(("servers", index), f"repeats servers[{seen[key]}] ({raw[seen[key]]}): give each webui once")
            continue
        seen[key] = index
        servers.append(url.strip())
    return servers


@dataclass(frozen=True)
class JobFile:
    """A checked job file: its jobs in file order, and its ``servers`` (empty when it names none)."""

    jobs: list[Job]
    servers: list[str]


def expand(data: object, source: str, base: Path, lines: dict[tuple, int] | None = None) -> list[Job]:
    """Jobs of a parsed job file, in file order; raises JobFileError listing every problem."""
    return expand_file(data, source, base, lines).jobs


def expand_file(data: object, source: str, base: Path, lines: dict[tuple, int] | None = None) -> JobFile:
    """Jobs and servers of a parsed job file (``source`` names it in messages, ``base`` is the folder
    init images are relative to, ``lines`` the line of each path); raises JobFileError listing every problem."""
    problems = _Problems(lines or {})
    if not isinstance(data, dict):
        raise JobFileError(source, [f"(top level): must be a mapping with a 'jobs' list, got {data!r}"])
    for key in data:
        if key not in _TOP_KEYS:
            problems.add((key,), _unknown(key, _TOP_KEYS))
    if data.get("version", 1) != 1:
        problems.add(("version",), f"must be 1, got {data['version']!r}")
    defaults, default_grid = _entry(data.get("defaults", {}), ("defaults",), problems)
    defaults_valid = not problems.items
    entries = data.get("jobs")
    if not isinstance(entries, list) or not entries:
        problems.add(("jobs",), f"must be a non-empty list of jobs, got {entries!r}")
        entries = []
    jobs: dict[str, Job] = {}
    for index, raw in enumerate(entries):
        path, where = ("jobs", index), f"jobs[{index}]"
        known = len(problems.items)
        fields, grid = _entry(raw, path, problems)
        if len(problems.items) > known or not defaults_valid:  # checks between fields would repeat those problems
            continue
        fields = _DEFAULTS | {"name": f"job{index}"} | defaults | fields
        axes = default_grid | grid
        for cell in itertools.product(*axes.values()):
            spec = fields | dict(zip(axes, cell, strict=True))
            init_path = _cross_check(spec, path, base, problems)
            digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
            if digest in jobs and jobs[digest].source != where:
                problems.add(path, f"repeats an image of {jobs[digest].source} (same fields after defaults and grid)")
            jobs[digest] = Job(digest, where, spec, init_path)
    servers = _servers(data.get("servers"), problems)  # after the jobs: its problems do not hide theirs
    if problems.items:
        raise JobFileError(source, list(problems.items))
    return JobFile(list(jobs.values()), servers)


def _lines(node: yaml.Node | None, path: tuple = ()) -> dict[tuple, int]:
    """1-based line of every key and list item, by path."""
    if node is None:
        return {}
    found = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                found |= _lines(value, (*path, key.value))
                found[(*path, key.value)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found |= _lines(item, (*path, index))
    return found


def load(path: Path) -> list[Job]:
    """Read, validate and expand a job file (``.json``: JSON; anything else: YAML)."""
    return load_file(path).jobs


def load_file(path: Path) -> JobFile:
    """Read, validate and expand a job file, with its ``servers``."""
    is_json = path.suffix.lower() == ".json"
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if is_json else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as error:
        raise JobFileError(str(path), [f"not valid {'JSON' if is_json else 'YAML'}: {error}"]) from None
    try:  # JSON is (nearly always) YAML too: take line numbers from the YAML node tree
        lines = _lines(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        lines = {}
    return expand_file(data, str(path), path.parent, lines)
