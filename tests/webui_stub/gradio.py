"""Stand-in for gradio 3.41.2 (the webui's pin): components keep their constructor keywords,
layout blocks are context managers. Only what scripts/hidiffusion.py builds."""

from __future__ import annotations


class Component:
    def __init__(self, value=None, label=None, elem_id=None, **kwargs):
        self.value, self.label, self.elem_id, self.kwargs = value, label, elem_id, kwargs

    def change(self, fn=None, _js=None, inputs=None, outputs=None):
        return None


class Checkbox(Component):
    pass


class Dropdown(Component):
    """gradio/components/dropdown.py: keyword-only after ``choices``, which it keeps as strings;
    ``allow_custom_value`` lets the user type a value that is not a choice (not with multiselect)."""

    def __init__(self, choices=None, *, value=None, multiselect=None, allow_custom_value=False, label=None,
                 **kwargs):
        self.choices = [str(choice) for choice in choices] if choices else []
        self.multiselect, self.allow_custom_value = multiselect, allow_custom_value
        if multiselect and allow_custom_value:
            raise ValueError("Custom values are not supported when `multiselect` is True.")
        super().__init__(value=value, label=label, **kwargs)


class Radio(Component):
    def __init__(self, choices=None, value=None, label=None, **kwargs):
        super().__init__(value=value, label=label, **kwargs)
        self.choices = choices


class Slider(Component):
    def __init__(self, minimum=0, maximum=100, value=None, step=None, label=None, **kwargs):
        super().__init__(value=value, label=label, **kwargs)
        self.minimum, self.maximum, self.step = minimum, maximum, step


class Block:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Row(Block):
    pass


class Accordion(Block):
    pass
