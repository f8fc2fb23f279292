"""Mirrors modules/ui_components.py: InputAccordion is a (hidden) Checkbox whose value is
the accordion's open state, used as a context manager (`with InputAccordion(...) as x`)."""

import gradio as gr


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        super().__init__(value, **kwargs)
        self.accordion = gr.Accordion(label=kwargs.get("label", "Accordion"), open=value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
