"""Mirrors scripts/xyz_grid.py: AxisOption(label, type, apply, format_value, confirm, cost,
choices, prepare) and the module-level `axis_options` list the X/Y/Z script reads."""

from __future__ import annotations

from copy import copy


def format_value_add_label(p, opt, x):
    return f"{opt.label}: {x}"


class AxisOption:
    def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0,
                 choices=None, prepare=None):
        self.label, self.type, self.apply = label, type, apply
        self.format_value, self.confirm, self.cost = format_value, confirm, cost
        self.choices, self.prepare = choices, prepare


axis_options: list[AxisOption] = [AxisOption("Nothing", str, lambda p, x, xs: None)]


def cells(p, option: AxisOption, values: list):
    """As xyz_grid's cell(): each value applied to a shallow copy of p, after confirm."""
    values = [option.type(v) for v in values]
    if option.confirm:
        option.confirm(p, values)
    for value in values:
        pc = copy(p)
        option.apply(pc, value, values)
        yield pc
