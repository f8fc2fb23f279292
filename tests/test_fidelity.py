"""Fidelity: the engine on ldm U-Nets, and on Forge's U-Net class with the same weights (when
FORGE_DIR names a Forge checkout), against the authors' package on diffusers twins.

Every step of a sampling pass is compared, with both sides pinned to the same ratios and
window shifts (see hidiffusion_lib/bench/reference.py). The twins agree unpatched to ~1e-7 relative, so a patched
difference above TOLERANCE is a behavioural difference, not rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import hidiffusion.hidiffusion as hd
import pytest
import torch
from controlnet_host import forward_with_residuals
from reference import LAYOUT, VANILLA_TOLERANCE, make_pair, run_ldm
from unets import make_forge_unet, make_inputs

import hidiffusion_lib
from hidiffusion_lib import Settings
from hidiffusion_lib.bench.reference import ReferenceRun, max_diff, run_diffusers
from hidiffusion_lib.controlnet import fit_residuals

STEPS = 10
TOLERANCE = 1e-4  # max abs difference relative to the output's max magnitude
# Both sides warn that odd token maps are resized for the window partition, as intended here.
pytestmark = pytest.mark.filterwarnings("ignore:HiDiffusion Warning:UserWarning")


@dataclass(frozen=True)
class Case:
    """One sampling pass. preset: the reference's ratios to use; aggressive None = its choice.
    auto: the engine resolves arch, ratios and aggressive itself (the preset must be the one
    the reference picks at this size)."""

    arch: str
    preset: str
    size: tuple[int, int] = (16, 24)
    raunet: bool = True
    mswmsa: bool = True
    shift: str = "fixed"
    shift_index: int = 0
    aggressive: bool | None = None
    auto: bool = False
    steps: int = STEPS

    @property
    def id(self) -> str:
        parts = {(True, True): "both", (True, False): "raunet", (False, True): "mswmsa"}[self.raunet, self.mswmsa]
        split = {None: "", True: "-aggressive", False: "-plain"}[self.aggressive]
        shift = f"{self.shift}{self.shift_index if self.shift == 'fixed' else ''}"
        auto = "-auto" if self.auto else ""
        steps = "" if self.steps == STEPS else f"-{self.steps}steps"
        return f"{self.arch}-{self.preset}{split}{auto}-{self.size[0]}x{self.size[1]}-{parts}-{shift}{steps}"

    def ratios(self) -> tuple[float, float, bool]:
        """(T1, T2, aggressive) from the reference's own table and rule."""
        table = hd.switching_threshold_ratio_dict[self.preset]
        aggressive = self.preset == "sdxl_2048" if self.aggressive is None else self.aggressive
        return table["T1_ratio"], table["T2_ratio"], aggressive

    def settings(self) -> Settings:
        settings = Settings(raunet=self.raunet, mswmsa=self.mswmsa, shift=self.shift, shift_index=self.shift_index)
        if self.auto:
            return settings
        t1, t2, aggressive = self.ratios()
        return replace(settings, t1=t1, t2=t2, aggressive=aggressive, arch=self.arch)


def _cases() -> list[Case]:
    cases = []
    for arch, presets in (("sd1", ("sd15_1024", "sd15_2048")), ("sdxl", ("sdxl_2048", "sdxl_4096"))):
        for i, preset in enumerate(presets):
            cases += [Case(arch, preset, raunet=r, mswmsa=m, shift_index=i + 1)
                      for r, m in ((True, True), (True, False), (False, True))]
        # Shifts need windows of 4+ rows: the SDXL layout windows after one downsampling.
        big = presets[1]
        size = (16, 32) if arch == "sd1" else (32, 48)
        cases += [Case(arch, big, size, shift_index=k) for k in range(4)]
        cases += [Case(arch, big, size, shift=policy) for policy in ("cycle", "random")]
        cases += [Case(arch, big, hw, shift_index=3) for hw in ((24, 40), (27, 45))]
    cases += [
        Case("sd1", "sd15_1024", (24, 16), shift_index=2, auto=True),
        Case("sdxl", "sdxl_2048", (32, 24), shift_index=3, auto=True),
        Case("sdxl", "sdxl_2048", aggressive=False, shift_index=2),  # the reference's inpainting schedule
        Case("sd2", "sd15_2048", shift_index=1),
        Case("sdxl_turbo", "sdxl_turbo_1024", (32, 48), shift_index=2),
        # other schedule lengths: int(8/50 * 13) = 2 steps of extra RAD; int(7 * 0.3) = 2
        Case("sdxl", "sdxl_2048", shift_index=1, steps=13),
        Case("sd1", "sd15_2048", shift_index=3, steps=7),
        # few-step models: the aggressive hand-over at int(8/50 * 4) = 0 and int(8/50 * 8) = 1
        *(Case("sdxl", "sdxl_2048", shift_index=1, steps=n) for n in (2, 4, 8)),
        *(Case("sd1", "sd15_2048", shift_index=3, steps=n) for n in (2, 4)),
    ]
    return cases


CASES = _cases()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The cores are shared: a second torch thread mostly spins and makes timings erratic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs():
    """Build each (ldm U-Net, diffusers twin) once; check both are left unpatched at the end."""
    built: dict[str, tuple] = {}

    def get(layout: str):
        if layout not in built:
            built[layout] = make_pair(layout, *make_inputs(layout, 2, 16, 24))
        return built[layout]

    yield get
    for layout, (ldm_unet, twin) in built.items():
        x, t, context = make_inputs(layout, 2, 16, 24)
        assert max_diff(run_ldm(ldm_unet, x, t, context), run_diffusers(twin, x, t, context)) <= VANILLA_TOLERANCE


@pytest.fixture(scope="module")
def forge_pairs(pairs):
    """(Forge's IntegratedUNet2DConditionModel with the ldm U-Net's weights, the same twin);
    checks the Forge U-Net unpatched agrees with the twin, and is left unpatched."""
    built: dict[str, tuple] = {}

    def get(layout: str):
        if layout not in built:
            _, twin = pairs(layout)
            forge_unet = make_forge_unet(layout)
            x, t, context = make_inputs(layout, 2, 16, 24)
            diff = max_diff(run_ldm(forge_unet, x, t, context), run_diffusers(twin, x, t, context))
            assert diff <= VANILLA_TOLERANCE, f"{layout}: vanilla Forge and diffusers U-Nets differ by {diff:.2e}"
            built[layout] = (forge_unet, twin)
        return built[layout]

    yield get
    for layout, (forge_unet, twin) in built.items():
        x, t, context = make_inputs(layout, 2, 16, 24)
        assert max_diff(run_ldm(forge_unet, x, t, context), run_diffusers(twin, x, t, context)) <= VANILLA_TOLERANCE


def compare(pairs, case: Case, settings: Settings | None = None, step_offset: int = 0) -> list[float]:
    """Per step, the relative max difference between the engine (with ``settings``, default the
    case's, told step + ``step_offset``) and the reference running ``case``."""
    layout = LAYOUT[case.arch]
    ldm_unet, twin = pairs(layout)
    x, _, context = make_inputs(layout, 2, *case.size)
    t1, t2, aggressive = case.ratios()
    handle = hidiffusion_lib.apply(ldm_unet, settings or case.settings())
    diffs = []
    try:
        with ReferenceRun(twin, case.arch, case.steps, raunet=case.raunet, mswmsa=case.mswmsa,
                          t1=t1, t2=t2, aggressive=aggressive) as reference:
            for step in range(case.steps):
                t = torch.full((2,), 999.0 * (1 - step / case.steps))
                handle.set_step(min(step + step_offset, case.steps - 1), case.steps)
                ours = run_ldm(ldm_unet, x, t, context)
                if not case.mswmsa:
                    shifts = []
                elif case.shift == "fixed":
                    shifts = [case.shift_index] * reference.windowed
                else:
                    shifts = handle.state.shift_indices  # what the engine drew for this step
                diffs.append(max_diff(ours, reference(x, t, context, shifts)))
    finally:
        handle.remove()
    return diffs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_engine_matches_reference(pairs, case: Case) -> None:
    diffs = compare(pairs, case)
    print(f"{case.id}: max {max(diffs):.1e}")
    assert max(diffs) <= TOLERANCE, [f"{d:.1e}" for d in diffs]


# Forge: every preset and part, a shift of each kind and the odd sizes, on its own U-Net class
FORGE_CASES = [case for case in CASES if case.shift == "fixed" and case.shift_index in (1, 3)] + [
    case for case in CASES if case.shift != "fixed"][:2]


@pytest.mark.parametrize("case", FORGE_CASES, ids=[c.id for c in FORGE_CASES])
def test_engine_on_forge_unet_matches_reference(forge_pairs, case: Case) -> None:
    """Forge's U-Net calls Upsample with the skip's shape and attn1 with ``value`` and
    ``transformer_options``, and its attention is Forge's own function."""
    diffs = compare(forge_pairs, case)
    print(f"forge {case.id}: max {max(diffs):.1e}")
    assert max(diffs) <= TOLERANCE, [f"{d:.1e}" for d in diffs]


def test_forge_comparison_can_fail(forge_pairs) -> None:
    diffs = compare(forge_pairs, BASE, replace(BASE.settings(), shift_index=2))
    assert all(d > 100 * TOLERANCE for d in diffs), [f"{d:.1e}" for d in diffs]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_turbo_preset_as_resolved_matches_reference(pairs, steps: int) -> None:
    """The SDXL-Turbo/Lightning preset as the engine resolves it (only the arch given) against
    the reference's own Turbo: its table's T1 and its package default is_aggressive_raunet (True),
    which its Turbo blocks never read; at 1 step int(0.5) = 0 on both sides: no pool."""
    case = Case("sdxl_turbo", "sdxl_turbo_1024", (32, 48), shift_index=2, aggressive=hd.is_aggressive_raunet,
                steps=steps)
    assert case.ratios() == (0.5, 0.0, True)
    diffs = compare(pairs, case, Settings(arch="sdxl_turbo", shift="fixed", shift_index=2))
    print(f"{case.id}: max {max(diffs):.1e}")
    assert max(diffs) <= TOLERANCE, [f"{d:.1e}" for d in diffs]


def test_turbo_block_map_is_the_references() -> None:
    """hidiffusion.py sdxl_turbo_hidiffusion_key(): SDXL's main switch (the pool in down_blocks.1 /
    up_blocks.1) and MSW-MSA blocks, no extra switch; its blocks never set aggressive_raunet,
    so they keep the class default False (make_diffusers_cross_attn_down_block)."""
    turbo, sdxl = hd.sdxl_turbo_hidiffusion_key(), hd.sdxl_hidiffusion_key()
    assert set(turbo) == {"down_module_key", "up_module_key", "windown_attn_module_key"}
    assert all(turbo[key] == sdxl[key] for key in turbo)
    assert hd.make_diffusers_cross_attn_down_block(torch.nn.Module).aggressive_raunet is False
    block_map = hidiffusion_lib.BLOCK_MAPS["sdxl_turbo"]
    assert block_map.extra is None and block_map.main == hidiffusion_lib.BLOCK_MAPS["sdxl"].main
    assert block_map.windowed == hidiffusion_lib.BLOCK_MAPS["sdxl"].windowed


def test_presets_are_the_references() -> None:
    for name, (t1, t2) in hidiffusion_lib.PRESETS.items():
        assert hd.switching_threshold_ratio_dict[name] == {"T1_ratio": t1, "T2_ratio": t2}


BASE = Case("sd1", "sd15_2048", shift_index=1)
XL_BASE = Case("sdxl", "sdxl_2048", (32, 48), shift_index=1)


@pytest.mark.parametrize(
    ("case", "wrong", "step_offset", "bad_steps"),
    [
        (BASE, {"shift_index": 2}, 0, range(STEPS)),
        (XL_BASE, {"shift_index": 0}, 0, range(STEPS)),
        (BASE, {}, 1, (2, 6)),  # off by one: the T2 and T1 switches turn off one step early
        (XL_BASE, {}, 1, (0, 3)),  # the aggressive hand-over and the end of the pool
        (BASE, {"rau_mode": "bicubic"}, 0, range(7)),
        (XL_BASE, {"aggressive": False}, 0, (0,)),
    ],
    ids=["shift", "xl-shift", "step", "xl-step", "rau-mode", "xl-not-aggressive"],
)
def test_comparison_can_fail(pairs, case: Case, wrong: dict, step_offset: int, bad_steps) -> None:
    """A deliberately wrong engine setting or step must show above tolerance where it matters."""
    diffs = compare(pairs, case, replace(case.settings(), **wrong), step_offset)
    print(f"{case.id} wrong {wrong or 'step'}: " + " ".join(f"{d:.0e}" for d in diffs))
    assert all(diffs[s] > 100 * TOLERANCE for s in bad_steps), [f"{d:.1e}" for d in diffs]


def _encoder_shapes(unet, size: tuple[int, int]) -> list[torch.Size]:
    """The shape of every input block's output and the middle block's, unpatched: a ControlNet's
    residuals at that latent size."""
    shapes = []
    blocks = [*unet.input_blocks, unet.middle_block]
    hooks = [block.register_forward_hook(lambda module, args, out: shapes.append(out.shape)) for block in blocks]
    try:
        run_ldm(unet, *make_inputs("sdxl", 2, *size))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def forge_forward_with_residuals(unet, x, t, context, residuals: list) -> torch.Tensor:
    """Forge's own U-Net forward with residuals as its ControlNet hands them over
    (backend/patcher/controlnet.py ``control_merge``: the last is the middle block's, the rest
    are popped from the end onto the skips by backend/nn/unet.py ``apply_control``)."""
    with torch.no_grad():
        return unet(x, timesteps=t, context=context, control={"output": list(residuals[:-1]),
                                                                "middle": [residuals[-1]]})


def compare_controlnet(pairs, size: tuple[int, int], controlnet: bool = True, fit: bool = True,
                       forward=forward_with_residuals) -> list[float]:
    """Per step, the engine on the ldm U-Net in sd-webui-controlnet's loop (tests/controlnet_host.py)
    against the reference's ControlNet U-Net, both given the same random residuals at half the
    latent size (as a control model run at a smaller size gives them). controlnet: the engine
    resolves the ControlNet ratios; fit: the residuals are fitted to the skips (else the loop's
    nearest resize)."""
    ldm_unet, twin = pairs("sdxl")
    x, _, context = make_inputs("sdxl", 2, *size)
    # about half the size, as a control model run smaller gives them (sides that the vanilla U-Net takes)
    shapes = _encoder_shapes(ldm_unet, (size[0] // 2 // 4 * 4, size[1] // 2 // 4 * 4))
    generator = torch.Generator().manual_seed(11)
    handle = hidiffusion_lib.apply(ldm_unet, Settings(arch="sdxl", controlnet=controlnet, shift="fixed", shift_index=1))
    diffs = []
    try:
        with ReferenceRun(twin, "sdxl", STEPS, aggressive=True, controlnet=True) as reference:
            for step in range(STEPS):
                t = torch.full((2,), 999.0 * (1 - step / STEPS))
                residuals = [torch.randn(shape, generator=generator) for shape in shapes]
                handle.set_step(step, STEPS)
                skips = handle.state.skips_at(*size)
                fitted = fit_residuals(residuals, [*skips, skips[-1]]) if fit else residuals
                ours = forward(ldm_unet, x, t, context, fitted)
                theirs = reference(x, t, context, [1] * reference.windowed,
                                   down_block_additional_residuals=tuple(residuals[:-1]),
                                   mid_block_additional_residual=residuals[-1])
                diffs.append(max_diff(ours, theirs))
    finally:
        handle.remove()
    return diffs


@pytest.mark.parametrize("size", [(32, 48), (27, 45)])
def test_controlnet_matches_reference(pairs, size) -> None:
    """SDXL + ControlNet, the case the authors define: residuals resized bicubic onto the skips
    at every step (RAU-Net's shrunk ones too) and their text-to-image ControlNet T1 (0.5)."""
    diffs = compare_controlnet(pairs, size)
    print(f"controlnet {size}: max {max(diffs):.1e}")
    assert max(diffs) <= TOLERANCE, [f"{d:.1e}" for d in diffs]


@pytest.mark.parametrize(("wrong", "bad_steps"), [
    ({"controlnet": False}, (4,)),  # T1 0.4: the pool ends a step early
    ({"fit": False}, range(5)),  # the host's nearest resize on RAU-Net steps
])
def test_controlnet_comparison_can_fail(pairs, wrong: dict, bad_steps) -> None:
    diffs = compare_controlnet(pairs, (32, 48), **wrong)
    print(f"controlnet wrong {wrong}: " + " ".join(f"{d:.0e}" for d in diffs))
    assert all(diffs[s] > 100 * TOLERANCE for s in bad_steps), [f"{d:.1e}" for d in diffs]


@pytest.mark.parametrize("size", [(32, 48), (27, 45)])
def test_controlnet_on_forge_unet_matches_reference(forge_pairs, size) -> None:
    """Forge's apply_control drops a residual whose size differs from the skip; fitted, every
    residual lands, on RAU-Net steps too, as the authors' ControlNet U-Net adds them."""
    diffs = compare_controlnet(forge_pairs, size, forward=forge_forward_with_residuals)
    print(f"forge controlnet {size}: max {max(diffs):.1e}")
    assert max(diffs) <= TOLERANCE, [f"{d:.1e}" for d in diffs]


def test_controlnet_constants_are_the_references() -> None:
    assert hd.controlnet_apply_steps_rate == hidiffusion_lib.CONTROL_SHARE
    for name, (t1, t2) in hidiffusion_lib.CONTROLNET_PRESETS.items():
        assert hd.text_to_img_controlnet_switching_threshold_ratio_dict[name] == {"T1_ratio": t1, "T2_ratio": t2}
