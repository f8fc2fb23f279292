"""The webui script's positional arguments: one table for the UI, the API and the batch client.

The order of ARGS is the order of the script's ``ui()`` components and so of
``alwayson_scripts["HiDiffusion"]["args"]`` in the webui API. Append new arguments at
the end only: API callers pass them by position.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from .schedule import Schedule
from .settings import RAU_MODES, SHIFT_POLICIES, Settings

AUTO_RATIO = -1.0
AUTO = "auto"
# What the ratio dropdowns list: every one is a value the script accepts. They take typed and
# pasted values too (e.g. 0.45), which parse() checks like an API value.
RATIO_CHOICES = (AUTO, *(f"{tenth / 10:g}" for tenth in range(11)))
MODEL_CHOICES = {"Auto": None, "SD 1.x": "sd1", "SD 2.x": "sd2", "SDXL": "sdxl", "SDXL-Turbo/Lightning": "sdxl_turbo"}
MODEL_LABELS = {arch: label for label, arch in MODEL_CHOICES.items() if arch}
AGGRESSIVE_CHOICES = {"Auto": None, "On": True, "Off": False}


@dataclass(frozen=True)
class Arg:
    """One control. kind: "bool", "choice", "ratio" (0..1 or -1 for auto) or "int"."""

    name: str
    label: str
    kind: str
    default: object
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    infotext: str = ""
    hint: str = ""
    in_settings: bool = False

    def ui_choices(self) -> tuple:
        """The values the UI control offers (none for a checkbox)."""
        if self.kind == "ratio":
            return RATIO_CHOICES
        if self.kind == "int":
            return tuple(range(int(self.low), int(self.high) + 1))
        return self.choices

    def accepted(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(map(repr, self.choices))
        if self.kind == "ratio":
            return 'a number in [0, 1], or -1 / "auto" for the preset'
        return f"an integer in [{self.low:g}, {self.high:g}]"


ARGS: tuple[Arg, ...] = (
    Arg("enabled", "HiDiffusion", "bool", False, infotext="HiDiffusion",
        hint="Generate above the model's training size without duplicated objects, and faster."),
    Arg("raunet", "RAU-Net", "bool", True, infotext="HiDiffusion RAU-Net",
        hint="Resolution-aware down/upsampling in the early steps: stops duplicated objects."),
    Arg("mswmsa", "MSW-MSA", "bool", True, infotext="HiDiffusion MSW-MSA",
        hint="Shifted-window self-attention in the top blocks: faster at high resolution (SD 1.5, measured: a step"
             " 1.5x faster at 1024 px, 2.2x at 2048). At 2048 px the webui's Hypertile (not part of the paper) is"
             " faster still; with its U-Net option on, MSW-MSA steps aside."),
    Arg("model", "Model preset", "choice", "Auto", tuple(MODEL_CHOICES), infotext="HiDiffusion model",
        hint="Block map and ratios; Auto reads the loaded model. SDXL-Turbo/Lightning cannot be detected."),
    Arg("t1", "T1 ratio", "ratio", AUTO, infotext="HiDiffusion T1",
        hint="Fraction of the steps with the main RAU-Net switch on; auto takes the authors' preset. Type any"
             " value in [0, 1], e.g. 0.45."),
    Arg("t2", "T2 ratio", "ratio", AUTO, infotext="HiDiffusion T2",
        hint="Fraction of the steps with the extra RAU-Net switch on (2048+ px); auto takes the preset. Type any"
             " value in [0, 1]."),
    Arg("aggressive", "Aggressive (SDXL)", "choice", "Auto", tuple(AGGRESSIVE_CHOICES),
        infotext="HiDiffusion aggressive",
        hint="SDXL below 4096 px: the extra switch first, then the main one. Auto follows the authors."),
    Arg("shift", "Window shift", "choice", "random", SHIFT_POLICIES, infotext="HiDiffusion shift",
        hint="random: a pseudo-random shift per step, the same for every image; cycle: by step; fixed: the index"
             " below.", in_settings=True),
    Arg("shift_index", "Fixed shift index", "int", 0, low=0, high=3, infotext="HiDiffusion shift index",
        hint="Shift in quarters of a window, used with the fixed policy."),
    Arg("rau_mode", "RAU interpolation", "choice", "nearest", RAU_MODES, infotext="HiDiffusion RAU mode",
        hint="How the resolution-aware upsampler interpolates while active (authors: nearest).", in_settings=True),
    Arg("hires", "Apply to hires fix pass", "bool", True, infotext="HiDiffusion hires",
        hint="Also run HiDiffusion in the hires fix second pass.", in_settings=True),
    Arg("native_gate", "Skip at native resolution", "bool", True, infotext="HiDiffusion native gate",
        hint="Do nothing when the image's area is not larger than the model's training size (512x512 for SD 1.x/2.x,"
             " 768x768 for SD 2.x 768-v, 1024x1024 for SDXL, whose buckets such as 832x1216 count too).",
        in_settings=True),
    Arg("controlnet_recipe", "ControlNet recipe", "bool", True, infotext="HiDiffusion ControlNet recipe",
        hint="With a ControlNet unit on: run it at the model's training size and, unless you moved the unit's"
             " Ending Control Step, for the first 60% of the steps, as the authors do (faster, follows the"
             " control as well). Off: it runs at full size on the unit's own steps.", in_settings=True),
)
ARG_NAMES = tuple(a.name for a in ARGS)


@dataclass(frozen=True)
class ScriptArgs:
    """The script's arguments, validated and typed (ratios None = auto)."""

    enabled: bool
    raunet: bool
    mswmsa: bool
    model: str
    t1: float | None
    t2: float | None
    aggressive: str
    shift: str
    shift_index: int
    rau_mode: str
    hires: bool
    native_gate: bool
    controlnet_recipe: bool

    def settings(self, seed: int = 0) -> Settings:
        """Engine settings; ``seed`` seeds the random window shift. The webui script leaves it at
        0, so the shifts depend on the step alone and every image of a batch can be made again
        alone from its own seed."""
        return Settings(
            raunet=self.raunet, mswmsa=self.mswmsa, t1=self.t1, t2=self.t2,
            aggressive=AGGRESSIVE_CHOICES[self.aggressive], shift=self.shift,
            shift_index=self.shift_index, seed=int(seed) % (1 << 63), rau_mode=self.rau_mode,
            arch=MODEL_CHOICES[self.model], native_gate=self.native_gate,
        )

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ArgError(ValueError):
    """A script argument is out of range or of the wrong type.

    Carries ``status_code`` 422 as an instance attribute: the webui API answers an
    exception that reaches it with that code and the message as its body.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.status_code = 422


def defaults() -> list:
    return [a.default for a in ARGS]


def _parse_one(arg: Arg, position: int, value: object) -> object:
    where = f"HiDiffusion {arg.label!r} (API argument {arg.name!r}, args[{position}])"
    if arg.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ArgError(f"{where} must be {arg.accepted()}, got {value!r}")
    if arg.kind == "choice":
        for choice in arg.choices:
            if isinstance(value, str) and value.strip().lower() == choice.lower():
                return choice
        raise ArgError(f"{where} must be {arg.accepted()}, got {value!r}")
    if arg.kind == "ratio":
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        number = _number(value)
        if number is None or not (number == AUTO_RATIO or 0.0 <= number <= 1.0):
            raise ArgError(f"{where} must be {arg.accepted()}, got {value!r}")
        return None if number == AUTO_RATIO else number
    number = _number(value)
    if number is None or number != int(number) or not arg.low <= number <= arg.high:
        raise ArgError(f"{where} must be {arg.accepted()}, got {value!r}")
    return int(number)


def _number(value: object) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def parse(values: Sequence) -> ScriptArgs:
    """Validate positional args in ``ui()`` order; missing trailing ones take defaults.

    Raises ArgError naming the argument, its position and what it accepts.
    """
    values = list(values)
    if len(values) > len(ARGS):
        raise ArgError(f"HiDiffusion takes at most {len(ARGS)} arguments ({', '.join(ARG_NAMES)}), got {len(values)}")
    values += [a.default for a in ARGS[len(values):]]
    return ScriptArgs(*(_parse_one(a, i, v) for i, (a, v) in enumerate(zip(ARGS, values, strict=True))))


def to_positional(named: Mapping[str, object]) -> list:
    """Positional args from a mapping by name (the batch client's job files)."""
    unknown = sorted(set(named) - set(ARG_NAMES))
    if unknown:
        raise ArgError(f"unknown HiDiffusion setting(s) {unknown}; known: {', '.join(ARG_NAMES)}")
    values = [named.get(a.name, a.default) for a in ARGS]
    parse(values)
    return values


def infotext(args: ScriptArgs, schedule: Schedule | None = None) -> dict[str, object]:
    """PNG-info entries for an image made with ``args``: ``HiDiffusion: True``, every
    control that differs from its default, and the schedule that was resolved."""
    params: dict[str, object] = {"HiDiffusion": True}
    default_args = parse(defaults())
    for arg in ARGS[1:]:
        value = getattr(args, arg.name)
        if value != getattr(default_args, arg.name):
            params[arg.infotext] = "auto" if value is None else value
    if schedule is not None:
        aggressive = ", aggressive" if schedule.aggressive else ""
        params["HiDiffusion schedule"] = f"{schedule.preset}: T1 {schedule.t1:g}, T2 {schedule.t2:g}{aggressive}"
    return params


def ui_value(arg: Arg, value: object) -> object:
    """A parsed value as its control shows it (ratios: "auto", "0.5", "0.45", exactly the value:
    a listed choice where it is one, never rounded to one)."""
    if arg.kind == "ratio":
        if value is None:
            return AUTO
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return value


def from_infotext(arg: Arg, params: Mapping[str, object]) -> object | None:
    """The control value to paste from parsed infotext ``params``. Without HiDiffusion in
    the infotext it is switched off and the other controls are left alone (None); a missing
    or unreadable entry takes the default, so old and partial infotexts paste."""
    if "HiDiffusion" not in params:
        return False if arg.name == "enabled" else None
    raw = params.get(arg.infotext)
    if raw is None:
        return arg.default
    try:
        return ui_value(arg, _parse_one(arg, ARGS.index(arg), raw))
    except ArgError:
        return arg.default


def normalize_pasted(params: dict) -> None:
    """Rewrite parsed infotext ``params`` in place so that the webui, reading each control's
    value by its infotext key, pastes what :func:`from_infotext` says (None: left alone)."""
    values = [from_infotext(arg, params) for arg in ARGS]
    for arg, value in zip(ARGS, values, strict=True):
        if value is None:
            params.pop(arg.infotext, None)
        else:
            params[arg.infotext] = value


# Infotext entries that say what HiDiffusion did not do, in the user's words.
SKIPPED_KEY = "HiDiffusion skipped"
REFINER_KEY = "HiDiffusion refiner"
REFINER_NOTE = "off: the refiner's steps ran without HiDiffusion"
CONTROLNET_KEY = "HiDiffusion ControlNet"
# Model families, as the host adapters report them (hidiffusion_lib.hosts.family_of) or as the
# engine's architecture names them: (the user's name, the side in px of the square it was trained
# at, the engine architecture; None: not a U-Net HiDiffusion has a block map for). SD 2.x 768-v
# takes the SD 2.x block map and presets, as the authors' package takes SD 2.1 768-v (by its
# module names, as SD 1.5, at the same latent-size thresholds); only its training size differs.
FAMILIES: dict[str, tuple[str, int, str | None]] = {
    "sd1": ("SD 1.x", 512, "sd1"),
    "sd2": ("SD 2.x", 512, "sd2"),
    "sd2_768v": ("SD 2.x 768-v", 768, "sd2"),
    "sdxl": ("SDXL", 1024, "sdxl"),
    "sdxl_turbo": ("SDXL", 1024, "sdxl_turbo"),
    "sd3": ("SD3 (MMDiT)", 1024, None),
}


def skipped_note(pass_name: str, width: int, height: int, family: str) -> str:
    """Why a pass ran without HiDiffusion at the model's training size; ``family``: a key of FAMILIES."""
    name, side, _ = FAMILIES[family]
    return (f"{pass_name} at {width}x{height}: not larger than {name}'s training size ({side}x{side} in area),"
            " so it ran unchanged")


def unsupported_name(error: Exception, family: str | None, unet: object) -> str:
    """How the notes name a loaded model the engine refused (``error``, an UnsupportedUNet);
    ``family``: what the host reported, ``unet``: the module it handed over."""
    from .detection import RefinerUNet  # torch only where a model is at hand

    if isinstance(error, RefinerUNet):
        return "the SDXL refiner"
    if family in FAMILIES and FAMILIES[family][2] is None:
        return FAMILIES[family][0]
    if hasattr(unet, "input_blocks"):  # a U-Net whose blocks are not where a block map wants them
        return f"this {type(unet).__name__} ({error})"
    return f"this {type(unet).__name__}"


def unsupported_note(pass_name: str, name: str) -> str:
    """Why a pass ran without HiDiffusion on a model it has no block map for (Model preset Auto)."""
    return f"{pass_name}: {name} is not a U-Net HiDiffusion has a block map for; it ran unchanged"


def controlnet_note(units: int, recipe: bool, control_size: tuple[int, int] | None, shares: list[bool]) -> str:
    """What HiDiffusion did with ``units`` ControlNet units in a pass. control_size: the latent
    size the recipe ran them at (None: full size); shares: per unit, whether the recipe's 60% of
    the steps applied (False: the unit's own Ending Control Step did)."""
    fitted = "residuals resized bicubic to the U-Net's levels"
    if not recipe:
        return f"{units} unit(s): recipe off, control at full size; {fitted}"
    where = f"control at {8 * control_size[1]}x{8 * control_size[0]}" if control_size else "control at full size"
    steps = ", ".join("first 60% of steps" if share else "unit's own steps" for share in shares)
    return f"{units} unit(s): recipe, {where} ({steps}); {fitted}"


def adapter_note(adapters: int) -> str:
    """What HiDiffusion did with ``adapters`` T2I-Adapter units in a pass: their features fitted,
    on every step the host adds them; the recipe (native size, 60% of the steps) is the
    authors' for ControlNets and does not apply to them."""
    return (f"{adapters} T2I-Adapter unit(s): features resized bicubic to the U-Net's levels "
            "(no recipe: it is for ControlNets)")


def region_mask_note(units: int) -> str:
    """What HiDiffusion did with ``units`` IP-Adapter units that have a region mask: each mask
    resized to the grid of the tokens it multiplies, on the shrunk levels too."""
    return f"{units} IP-Adapter region mask(s): resized to each level's tokens"


def unsupported_message(error: Exception, model: str, name: str) -> str:
    """Why a generation is refused: the Model preset ``model`` the user chose does not fit the
    loaded model (with Auto, a model without a block map is skipped instead: unsupported_note);
    ``name``: the model as unsupported_name names it."""
    from .detection import ArchMismatch, UnsupportedUNet  # torch only where a model is at hand

    if isinstance(error, ArchMismatch):
        allowed = [MODEL_LABELS[arch] for arch in error.allowed]
        return (f'HiDiffusion: Model preset "{model}" does not fit the loaded model, which is {error.family}; '
                f"choose Auto, {', '.join(allowed[:-1])} or {allowed[-1]}")
    if isinstance(error, UnsupportedUNet):
        return (f'HiDiffusion: Model preset "{model}" does not fit the loaded model: {name} is not a U-Net '
                "HiDiffusion has a block map for; choose Auto (the generation then runs without HiDiffusion) "
                "or untick HiDiffusion")
    return f"HiDiffusion cannot run on this model: {error}"


# X/Y/Z plot axes: label, value type, closed choices, the named args a value sets.
MODES = {
    "off": {"enabled": False},
    "RAU-Net": {"enabled": True, "raunet": True, "mswmsa": False},
    "MSW-MSA": {"enabled": True, "raunet": False, "mswmsa": True},
    "full": {"enabled": True, "raunet": True, "mswmsa": True},
}


@dataclass(frozen=True)
class Axis:
    label: str
    kind: str  # "choice" or "float"
    choices: tuple[str, ...]
    arg: str  # the argument it sets, or "mode"

    def updates(self, value: object) -> dict[str, object]:
        """Named args for one cell; raises ArgError for a value the argument refuses."""
        if self.arg == "mode":
            if value not in MODES:
                raise ArgError(f"HiDiffusion mode must be one of {', '.join(MODES)}, got {value!r}")
            return dict(MODES[value])
        arg = ARGS[ARG_NAMES.index(self.arg)]
        parsed = _parse_one(arg, ARGS.index(arg), value)
        return {self.arg: AUTO_RATIO if arg.kind == "ratio" and parsed is None else parsed}


AXES: tuple[Axis, ...] = (
    Axis("[HiDiffusion] Mode", "choice", tuple(MODES), "mode"),
    Axis("[HiDiffusion] Enabled", "choice", ("True", "False"), "enabled"),
    Axis("[HiDiffusion] RAU-Net", "choice", ("True", "False"), "raunet"),
    Axis("[HiDiffusion] MSW-MSA", "choice", ("True", "False"), "mswmsa"),
    Axis("[HiDiffusion] T1 ratio", "float", (), "t1"),
    Axis("[HiDiffusion] T2 ratio", "float", (), "t2"),
    Axis("[HiDiffusion] Model preset", "choice", tuple(MODEL_CHOICES), "model"),
    Axis("[HiDiffusion] Window shift", "choice", SHIFT_POLICIES, "shift"),
    Axis("[HiDiffusion] ControlNet recipe", "choice", ("True", "False"), "controlnet_recipe"),
)


def merge_axis_values(ui_args: Sequence, axis_values: Mapping[str, object]) -> list:
    """UI args overridden by X/Y/Z cell values (by name). A cell that sets any HiDiffusion
    value but not "enabled" turns HiDiffusion on: sweeping T1 with it off would be a no-op."""
    named = dict(zip(ARG_NAMES, list(ui_args) + defaults()[len(ui_args):], strict=True))
    named.update(axis_values)
    if axis_values and "enabled" not in axis_values:
        named["enabled"] = True
    return [named[name] for name in ARG_NAMES]
