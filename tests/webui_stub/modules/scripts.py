"""Mirrors modules/scripts.py: the Script base class with its hook signatures (title, show,
ui, process, process_before_every_sampling, before_hr, postprocess), AlwaysVisible, and
`scripts_data` entries (ScriptClassData: script_class, path, basedir, module)."""

from __future__ import annotations

from collections import namedtuple

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list = []


class Script:
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass
