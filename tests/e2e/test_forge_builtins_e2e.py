"""End to end through the HTTP API of a real Forge (see conftest.py; skipped unless FORGE_DIR is
set): HiDiffusion beside each of Forge's built-in U-Net extensions, enabled through
``alwayson_scripts`` by their script titles.

hidiffusion_lib/hosts/forge.py reads what the built-ins leave on the generation's UnetPatcher and
steps aside where it cannot stack: Kohya HRFix (input block patch) turns RAU-Net off,
MultiDiffusion (model_function_wrapper) skips HiDiffusion for the pass, StyleAlign (attn1 replaced
in every block) turns MSW-MSA off. FreeU, SAG, PAG and Never OOM run beside it unchanged.

One Forge with this extension and the engine's trace (HIDIFFUSION_TRACE) serves the module.
576x576, 2 steps of Euler, seed 1, CFG 7, T1 0.5 so that RAU-Net runs on step 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import Webui, forge_checkpoint, infotexts, needs_forge, pixels, running_forge, same

from hidiffusion_lib import script_args as sa
from hidiffusion_lib.hosts.forge import ATTENTION_REPLACED, FEATURES_RESIZED, U_NET_WRAPPED

pytestmark = needs_forge
BASE = dict(prompt="a red cube", negative_prompt="", steps=2, width=576, height=576, sampler_name="Euler", seed=1,
            cfg_scale=7)
OFF = [False]
ON = sa.to_positional({"enabled": True, "t1": 0.5})

# Each built-in's title() (its alwayson_scripts key) and its ui() values, enabled
KOHYA = ("Kohya HRFix Integrated", [True, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic"])
MULTIDIFFUSION = ("MultiDiffusion Integrated", [True, "MultiDiffusion", 768, 768, 64, 4])
STYLEALIGN = ("StyleAlign Integrated", [True, 1.0])
FREEU = ("FreeU Integrated (SD 1.x, SD 2.x, SDXL)", [True, 1.5, 1.6, 0.9, 0.2, 0.0, 1.0])
SAG = ("SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)", [True, 0.5, 2.0, 1.0])
PAG = ("PerturbedAttentionGuidance Integrated", [True, 3.0, 0.0, 0.0, 1.0])
NEVER_OOM = ("Never OOM Integrated", [True, False])


class Forge(Webui):
    trace: Path

    def trace_size(self) -> int:
        return self.trace.stat().st_size if self.trace.exists() else 0

    def run(self, builtin: tuple[str, list], hidiffusion: list, **overrides) -> tuple[dict, list[dict], str]:
        """txt2img with ``builtin`` enabled: its body, the trace records it wrote, and its log."""
        title, args = builtin
        start, log_start = self.trace_size(), len(self.log_text())
        body = self.generate("/sdapi/v1/txt2img", BASE, hidiffusion,
                             **{"alwayson_scripts": {title: {"args": list(args)}}, **overrides})
        records = []
        if self.trace.exists():
            with open(self.trace, encoding="utf-8") as file:
                file.seek(start)
                records = [json.loads(line) for line in file]
        log = self.log_text()[log_start:]
        assert "Traceback" not in log, log[-3000:]
        assert "could not be applied" not in log, log[-3000:]
        return body, records, log


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("forge-builtins")
    trace = data_dir / "trace.jsonl"
    with running_forge(data_dir, forge_checkpoint(), env={"HIDIFFUSION_TRACE": str(trace)}) as client:
        forge = Forge(client.url, client.log)
        forge.trace = trace
        yield forge


def forwards_of(records: list[dict]) -> list[dict]:
    ran = [r for r in records if r["forwards"]]
    assert len(ran) == 1, records
    return ran[0]["forwards"]


def assert_no_step_aside(text: str) -> None:
    assert "HiDiffusion: True" in text, text
    assert "another extension" not in text and "HiDiffusion skipped" not in text, text


def test_kohya_hrfix_turns_raunet_off(forge):
    body, records, _ = forge.run(KOHYA, ON)
    text = infotexts(body)[0]
    assert "kohya_hrfix_enabled: True" in text, text
    assert "HiDiffusion RAU-Net:" in text and FEATURES_RESIZED in text, text
    forwards = forwards_of(records)
    assert [f["step"] for f in forwards] == [0, 1], forwards
    assert not any(f["main"] for f in forwards), forwards
    assert all(f["windows"] for f in forwards), forwards


def test_multidiffusion_skips_hidiffusion(forge):
    body, _, _ = forge.run(MULTIDIFFUSION, ON)
    text = infotexts(body)[0]
    assert "multidiffusion_enabled: True" in text, text
    assert "HiDiffusion skipped:" in text and f"first pass: {U_NET_WRAPPED}" in text, text
    off, _, _ = forge.run(MULTIDIFFUSION, OFF)
    assert "HiDiffusion" not in infotexts(off)[0]
    assert same(pixels(body), pixels(off))


def test_stylealign_turns_mswmsa_off(forge):
    body, records, _ = forge.run(STYLEALIGN, ON, batch_size=2)
    texts = infotexts(body)
    assert len(body["images"]) == 2, texts
    for text in texts:
        assert "stylealign_enabled: True" in text, text
        assert "HiDiffusion MSW-MSA:" in text and ATTENTION_REPLACED in text, text
    forwards = forwards_of(records)
    assert all(f["windows"] is None for f in forwards), forwards
    assert forwards[0]["step"] == 0 and forwards[0]["main"], forwards


@pytest.mark.parametrize("builtin, keys", [(FREEU, ["freeu_enabled: True"]), (SAG, ["sag_enabled: True"]),
                                           (PAG, ["pagi_enabled: True"]), (NEVER_OOM, [])],
                         ids=["freeu", "sag", "pag", "never_oom"])
def test_runs_beside_hidiffusion(forge, builtin, keys):
    body, records, log = forge.run(builtin, ON)
    text = infotexts(body)[0]
    assert_no_step_aside(text)
    assert all(key in text for key in keys), text
    if builtin is NEVER_OOM:
        assert "NeverOOM Enabled for UNet" in log, log[-3000:]
    forwards = forwards_of(records)
    assert forwards[0]["step"] == 0 and forwards[0]["main"], forwards
    assert all(f["windows"] for f in forwards), forwards
    off, _, _ = forge.run(builtin, OFF)
    assert "HiDiffusion" not in infotexts(off)[0]
    assert all(key in infotexts(off)[0] for key in keys)
    assert not same(pixels(body), pixels(off))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
