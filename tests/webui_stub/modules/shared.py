"""Mirrors modules/shared.py + modules/options.py: `opts` with `data`, `add_option`, attribute
access to values and defaults; `OptionInfo(default, label, component, component_args,
section=...)` with `.info()` and `.needs_reload_ui()`."""

from __future__ import annotations


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before="", comment_after="", infotext=None,
                 restrict_api=False, category_id=None):
        self.default, self.label, self.component = default, label, component
        self.component_args, self.section = component_args, section
        self.comment_after = comment_after

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def needs_reload_ui(self):
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


class Options:
    def __init__(self):
        super().__setattr__("data", {})
        super().__setattr__("data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        return super().__getattribute__(item)

    def __setattr__(self, key, value):
        self.data[key] = value


opts = Options()
sd_model = None
