"""How this engine's instance forwards and hooks are marked, chained and found again.

Everything installed carries the MARK attribute, so a stale patch (left by a failed run
or an earlier copy of this module) is always found and removed, never wrapped again.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MARK = "_hidiffusion"


def marked(fn: Callable, state: object, previous: Callable | None = None) -> Callable:
    """Tag ``fn`` as installed for ``state``; ``previous`` is the instance forward (or other
    instance method, set as a module attribute of the same name) it shadows."""
    setattr(fn, MARK, True)
    fn.state = state
    fn.previous = previous
    return fn


def is_ours(fn: object) -> bool:
    return getattr(fn, MARK, False) is True


def call_original(module: nn.Module, previous: Callable | None, *args, **kwargs):
    """Call what ran before us: the shadowed instance forward (e.g. Hypertile's), else the
    class's forward as it is now (hosts swap attention implementations at class level)."""
    if previous is not None:
        return previous(*args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def _switch_off(fn: Callable) -> None:
    if fn.state is not None:
        fn.state.alive = False


def _buried(fn: object):
    """Our forwards hidden under someone else's wrapper (functools.wraps' __wrapped__)."""
    seen = 0
    while fn is not None and seen < 16:
        if is_ours(fn):
            yield fn
        fn = getattr(fn, "previous", None) if is_ours(fn) else getattr(fn, "__wrapped__", None)
        seen += 1


def _unpatch_method(module: nn.Module, name: str, state: object | None) -> int:
    current = module.__dict__.get(name)
    for fn in _buried(current):
        if state is None or fn.state is state:
            _switch_off(fn)
    if not is_ours(current) or (state is not None and current.state is not state):
        return 0
    previous = current.previous
    while is_ours(previous):
        previous = previous.previous
    if previous is None:
        del module.__dict__[name]
    else:
        setattr(module, name, previous)
    return 1


def unpatch(root: nn.Module, state: object | None = None) -> int:
    """Remove the forwards (and other instance methods: see :func:`marked`) and hooks
    installed for ``state`` (every state: None) below ``root``; return how many. A method of
    ours that another wrapper captured cannot be taken out: its state is switched off
    instead, so it passes every call through."""
    removed = 0
    for module in root.modules():
        names = ["forward", *(name for name, fn in module.__dict__.items() if name != "forward" and is_ours(fn))]
        for name in names:
            removed += _unpatch_method(module, name, state)
        for hooks, companions in (
            (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
            (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        ):
            for key, fn in list(hooks.items()):
                if is_ours(fn) and (state is None or fn.state is state):
                    _switch_off(fn)
                    del hooks[key]
                    for companion in companions:
                        companion.pop(key, None)
                    removed += 1
    return removed
