"""The webui's built-in Hypertile, loaded from a webui checkout and run as its script runs it.

Nothing of Hypertile is copied here. Its engine, extensions-builtin/hypertile/hypertile.py (it
imports no webui code), is loaded from the checkout at run time; its U-Net defaults are read
from the settings its script declares (scripts/hypertile_script.py, parsed with ``ast``: the
script itself imports the webui). As the script does in ``process``, a run seeds the engine's
tile draws with the image's seed, then calls ``hypertile_hook_model`` on the model that holds
the U-Net (the webui's ``sd_model.model``, whose ``diffusion_model`` is the U-Net) with the image
size and those settings; afterwards it calls it again with ``enable=False``, as the script does
when the option is off. Hypertile keeps its wrappers on a model for good; :func:`unhook` takes
them off, so every other configuration of a benchmark runs the untouched U-Net.

Hypertile draws each tiled layer's tile grid at random on every call (``swap_size`` choices per
side), from one generator that the seed restarts. :func:`draws` and :func:`restore_draws` read
and set that generator's position, so a forward can be timed with the draws of a chosen step.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from torch import nn

ENGINE = Path("extensions-builtin/hypertile/hypertile.py")
SCRIPT = Path("extensions-builtin/hypertile/scripts/hypertile_script.py")
# hypertile_hook_model keyword -> the webui option the script passes for it (configure_hypertile)
OPTIONS = {"max_depth": "hypertile_max_depth_unet", "tile_size_max": "hypertile_max_tile_unet",
           "swap_size": "hypertile_swap_size_unet"}
# What the engine leaves on a hooked model and on each wrapped layer.
LAYERS_ATTR, PARAMS_ATTR = "__webui_hypertile_layers", "__webui_hypertile_params"
_MODULE_NAME = "hidiffusion_bench_webui_hypertile"


@dataclass(frozen=True)
class Hypertile:
    """The loaded engine (``module``, from ``path``) and the U-Net settings a run passes it."""

    module: ModuleType
    path: Path
    max_depth: int
    tile_size_max: int
    swap_size: int

    def settings(self) -> dict[str, int]:
        return {"max_depth": self.max_depth, "tile_size_max": self.tile_size_max, "swap_size": self.swap_size}


class Holder(nn.Module):
    """Stands where the webui's ``sd_model.model`` stands: the module holding the U-Net, so
    Hypertile's layer names are the webui's (``diffusion_model.input_blocks.1...``)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = unet


def find(webui_dir: str | Path) -> Path | None:
    """The Hypertile engine of a webui checkout, or None."""
    path = Path(webui_dir) / ENGINE
    return path if path.is_file() else None


def read_defaults(script: str | Path) -> dict[str, int]:
    """The U-Net defaults the Hypertile script declares: ``shared.OptionInfo(DEFAULT, ...)`` per
    option of :data:`OPTIONS`, keyed by hypertile_hook_model keyword."""
    tree = ast.parse(Path(script).read_text(), str(script))
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values, strict=True):
            if isinstance(key, ast.Constant) and key.value in OPTIONS.values():
                found[key.value] = _option_default(value)
    missing = [name for name in OPTIONS.values() if name not in found]
    if missing:
        raise ValueError(f"{script}: no default found for {', '.join(missing)}; has the webui changed?")
    return {keyword: found[name] for keyword, name in OPTIONS.items()}


def _option_default(node: ast.expr) -> int:
    # shared.OptionInfo(3, "...", ...).info("...") : down the call chain to OptionInfo's first argument
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr != "OptionInfo":
        node = node.func.value
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, int)):
        raise ValueError(f"line {node.lineno}: not an OptionInfo with a whole-number default")
    return node.args[0].value


def load(webui_dir: str | Path) -> Hypertile:
    """Load the Hypertile engine of a webui checkout with the defaults of its script.
    FileNotFoundError when the checkout has no Hypertile."""
    path = find(webui_dir)
    if path is None:
        raise FileNotFoundError(f"no Hypertile engine at {Path(webui_dir) / ENGINE}")
    defaults = read_defaults(Path(webui_dir) / SCRIPT)
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE_NAME] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return Hypertile(module, path.resolve(), **defaults)


def draws(engine: Hypertile) -> object:
    """Where the engine's tile draws stand now."""
    return engine.module.RNG_INSTANCE.getstate()


def restore_draws(engine: Hypertile, state: object) -> None:
    engine.module.RNG_INSTANCE.setstate(state)


@contextmanager
def tiled(engine: Hypertile, holder: Holder, width: int, height: int, seed: int, is_sdxl: bool = False,
          state: object | None = None) -> Iterator[None]:
    """Within the block, Hypertile tiles ``holder``'s U-Net for a width x height image, seeded
    with ``seed`` as the webui seeds it; ``state`` (from :func:`draws`): continue the draws from
    there instead. On exit: disabled as the webui disables it, then unhooked."""
    engine.module.set_hypertile_seed(seed)
    _hook(engine, holder, width, height, True, is_sdxl)
    if state is not None:
        restore_draws(engine, state)
    try:
        yield
    finally:
        _hook(engine, holder, width, height, False, is_sdxl)
        unhook(holder)


def _hook(engine: Hypertile, holder: Holder, width: int, height: int, enable: bool, is_sdxl: bool) -> None:
    engine.module.hypertile_hook_model(holder, width, height, enable=enable, is_sdxl=is_sdxl, **engine.settings())


def unhook(model: nn.Module) -> int:
    """Take Hypertile's wrappers off ``model``'s layers (each gets back the forward it had);
    returns how many."""
    removed = 0
    for module in model.modules():
        params = module.__dict__.pop(PARAMS_ATTR, None)
        if params is None:
            continue
        previous = params.forward
        if inspect.ismethod(previous) and previous.__self__ is module:
            module.__dict__.pop("forward", None)  # it wrapped the class's forward
        else:
            module.forward = previous
        removed += 1
    model.__dict__.pop(LAYERS_ATTR, None)
    return removed


def hooked(model: nn.Module) -> list[str]:
    """Names of the layers that carry a Hypertile wrapper now."""
    return [name for name, module in model.named_modules() if PARAMS_ATTR in module.__dict__]
