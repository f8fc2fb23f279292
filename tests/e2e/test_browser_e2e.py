"""The extension in a real browser: a real AUTOMATIC1111 webui (v1.10.x) WITH its UI, driven by
Playwright in Debian's chromium. Skipped unless WEBUI_DIR is set, Python playwright is
importable and the browser exists.

Set-up: ``.venv/bin/pip install playwright`` and ``apt-get install chromium`` (never
``playwright install``: the system browser is used). E2E_CHROMIUM: the browser (default
/usr/bin/chromium). E2E_ARTIFACTS: where a failing test's full-page screenshot goes (default
the test's tmp dir); its path is printed in the failure report.

The module starts one webui with a tiny random-weight SD 1.x checkpoint (conftest.py) and one
browser; every test gets a fresh page. The browser may only talk to the loopback webui: every
other request is refused. Generations are 2 steps at 512-640 px (a few seconds a step on a CPU).

The DOM read here is Gradio 3.41's as the webui v1.10.1 builds it (modules/ui.py, ui_common.py,
ui_toprow.py, ui_components.py, ui_settings.py, javascript/*.js):
- an InputAccordion ``X`` is ``#X`` (the accordion; ``.label-wrap`` gets class ``open``), a
  hidden gradio checkbox ``#X-checkbox`` and a visible one ``#X-visible-checkbox`` in its label;
- controls: ``.gradio-checkbox`` (``label > span`` holds the label), ``.gradio-dropdown``,
  ``.gradio-slider``, ``fieldset.gradio-radio`` (``span[data-testid=block-info]`` holds the
  label); a dropdown's options are ``ul.options > li[data-value]`` once its input is clicked;
- hints.js sets ``title`` on the span whose text is a ``titles`` key (debounced, after render);
- results: ``#html_info_{tab}`` (infotext), ``#html_log_{tab}`` (``.error``; ``.performance``
  when a run ends), ``#{tab}_gallery .thumbnail-item.thumbnail-small``,
  ``#{tab}_send_to_img2img``; the paste button is ``#{tab}_tools #paste``;
- settings: ``#settings > div > button`` per section, ``#setting_{key}``, ``#settings_submit``,
  ``#settings_result``, ``#settings_restart_gradio`` (the page shows "Reloading..." and reloads).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import forge_checkpoint, needs_forge, needs_webui, running_forge, running_webui, write_checkpoint

from hidiffusion_lib import script_args as sa

try:
    from playwright.sync_api import Page, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

CHROMIUM = Path(os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium"))
pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="Python playwright is not installed (pip install playwright)"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser at {CHROMIUM} (apt-get install chromium)"),
]

UI_TIMEOUT = 180_000  # ms: the first load of the webui's page, and after Reload UI
RUN_TIMEOUT = 300_000  # ms: one generation
TABS = ("txt2img", "img2img")
ARG = {a.name: a for a in sa.ARGS}
CONTROLS = sa.ARG_NAMES[1:]  # "enabled" is the accordion itself
_SOCKETS: dict = {}  # page -> its websockets
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
INFOTEXT_ON = ("a red cube\nSteps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 1, "
               "Size: 640x640, HiDiffusion: True, HiDiffusion T1: 0.5, HiDiffusion shift: fixed, "
               "HiDiffusion shift index: 2")
INFOTEXT_OFF = "a blue ball\nSteps: 3, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 2, Size: 512x512"


# ---------------------------------------------------------------- fixtures


def _artifacts(tmp_path: Path | None) -> Path:
    folder = Path(os.environ.get("E2E_ARTIFACTS") or tmp_path or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _screenshot(page: Page, folder: Path, name: str) -> str:
    """Save a full-page screenshot; returns its path, or why there is none."""
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
    try:
        page.screenshot(path=str(path), full_page=True, timeout=30_000)
    except Exception as error:  # the page may be gone: say so, keep the real failure
        return f"no screenshot: {error}"
    print(f"\nscreenshot of the failing page: {path}", file=sys.stderr)
    return str(path)


class _ScreenshotOnFailure:
    """Saves a full-page screenshot of a failing test's page and names it in the report."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        page = getattr(item, "funcargs", {}).get("page")
        if report.failed and page is not None and not page.is_closed():
            folder = _artifacts(item.funcargs.get("tmp_path"))
            report.sections.append(("screenshot", _screenshot(page, folder, f"{item.name}-{report.when}")))


@pytest.fixture(scope="module", autouse=True)
def _screenshots(request):
    plugin = _ScreenshotOnFailure()
    request.config.pluginmanager.register(plugin, f"browser-screenshots-{id(plugin)}")
    yield
    request.config.pluginmanager.unregister(plugin)


@pytest.fixture(scope="module", params=[pytest.param("a1111", marks=needs_webui),
                                        pytest.param("forge", marks=needs_forge)])
def webui_url(request, tmp_path_factory):
    """Each host's UI in turn: A1111 v1.10.x (Gradio 3.41) and Forge (Gradio 4.40)."""
    workdir = tmp_path_factory.mktemp(f"{request.param}-ui")
    if request.param == "forge":
        with running_forge(workdir, forge_checkpoint(), ui=True) as client:
            yield client.url
        return
    ckpt = write_checkpoint(workdir / "ckpt")
    with running_webui(workdir, ckpt, ui=True) as client:
        yield client.url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def _loopback_only(route):
    if urlsplit(route.request.url).hostname in LOOPBACK or route.request.url.startswith(("data:", "blob:")):
        route.continue_()
    else:
        route.abort()


@pytest.fixture
def page(browser, webui_url, tmp_path, request):
    context = browser.new_context(viewport={"width": 1600, "height": 1200})
    context.route("**/*", _loopback_only)
    page = context.new_page()
    page.set_default_timeout(30_000)
    sockets = _SOCKETS[page] = []
    page.on("websocket", lambda ws: sockets.append(ws))
    try:
        page.goto(webui_url)
        wait_for_ui(page)
    except Exception:  # the hook only sees pages that a test received
        _screenshot(page, _artifacts(tmp_path), f"{request.node.name}-setup")
        raise
    yield page
    # A page closed while one of its queue websockets is open leaves that websocket's
    # handler looping in the webui (Gradio 3.41 waits for its own close), and the next
    # Reload UI then hangs for ever in uvicorn's graceful shutdown: close only when idle.
    wait_for_queue_idle(page)
    context.close()
    del _SOCKETS[page]


# ---------------------------------------------------------------- helpers


def wait_for_ui(page: Page) -> None:
    page.locator("#txt2img_generate").wait_for(state="visible", timeout=UI_TIMEOUT)
    # onUiLoaded has run (InputAccordion's visible checkbox exists)
    page.locator("#hidiffusion_txt2img-visible-checkbox").wait_for(state="attached", timeout=UI_TIMEOUT)
    wait_for_queue_idle(page)  # the page's load events (values from callables) have come back


def wait_for_queue_idle(page: Page, timeout: float = 60) -> None:
    """Wait until every Gradio queue websocket (``/queue/join``, one per event) of the page is closed."""
    deadline = time.monotonic() + timeout
    while not page.is_closed() and any(not ws.is_closed() for ws in _SOCKETS.get(page, ())):
        if time.monotonic() > deadline:
            print(f"{page.url}: Gradio queue websockets still open after {timeout} s", file=sys.stderr)
            return
        page.wait_for_timeout(100)


def open_tab(page: Page, tab: str, label: str | None = None) -> None:
    """Select the top-level tab ``#tab_{tab}`` by its button's text (``label``, default ``tab``)."""
    label = label or tab  # Gradio 4 (Forge) capitalises it: "Txt2img"
    page.locator("#tabs > .tab-nav > button", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$", re.I)).click()
    page.locator(f"#tab_{tab}").wait_for(state="visible")


def control(page: Page, tab: str, name: str):
    return page.locator(f"#hidiffusion_{tab}_{name}")


def label_span(locator):
    """The span holding a Gradio 3.41 control's label (hints.js puts its title there)."""
    return locator.locator("[data-testid=block-info], label > span").first


def open_accordion(page: Page, elem_id: str) -> None:
    wrap = page.locator(f"#{elem_id} > .label-wrap")
    if "open" not in (wrap.get_attribute("class") or ""):
        wrap.click()
    page.wait_for_function("id => document.querySelector('#' + id + ' > .label-wrap').classList.contains('open')",
                           arg=elem_id)


def accordion_ticked(page: Page, tab: str) -> tuple[bool, bool]:
    """(visible checkbox, the gradio checkbox the script reads)."""
    return tuple(page.evaluate("""id => [document.getElementById(id + '-visible-checkbox').checked,
                                   document.querySelector('#' + id + '-checkbox input').checked]""",
                         f"hidiffusion_{tab}"))


def enable(page: Page, tab: str) -> None:
    """Tick HiDiffusion in ``tab`` and open its accordion and Advanced."""
    open_tab(page, tab)
    box = page.locator(f"#hidiffusion_{tab}-visible-checkbox")
    if not box.is_checked():
        box.click()
    open_accordion(page, f"hidiffusion_{tab}")
    open_accordion(page, f"hidiffusion_{tab}_advanced")
    assert accordion_ticked(page, tab) == (True, True)


def kind(locator) -> str:
    classes = (locator.get_attribute("class") or "").split()
    for name in ("checkbox", "dropdown", "radio", "slider", "number", "textbox"):
        if f"gradio-{name}" in classes:
            return name
    raise AssertionError(f"unknown control kind: {classes}")


def value_of(locator) -> str:
    """A control's shown value as text ("True"/"False" for a checkbox)."""
    return locator.evaluate("""e => {
        const c = e.classList;
        if (c.contains('gradio-checkbox')) return e.querySelector('input[type=checkbox]').checked ? 'True' : 'False';
        if (c.contains('gradio-radio')) {
            const r = e.querySelector('input[type=radio]:checked');
            return r ? r.value : '';
        }
        if (c.contains('gradio-slider')) return e.querySelector('input[type=number]').value;
        return e.querySelector('input, textarea').value;
    }""")


# A dropdown's options: Gradio 3.41 names each by data-value, Gradio 4 (Forge) by aria-label.
OPTION = "ul.options > li[data-value], ul.options > li[aria-label]"


def option(locator, value: str):
    return locator.locator(f"ul.options > li[data-value=\"{value}\"], ul.options > li[aria-label=\"{value}\"]")


def dropdown_options(page: Page, locator) -> list[str]:
    locator.locator("input").first.click()
    options = locator.locator(OPTION)
    options.first.wait_for(state="visible")
    values = options.evaluate_all("items => items.map(i => i.dataset.value ?? i.getAttribute('aria-label'))")
    close_dropdown(page, locator)
    return values


def close_dropdown(page: Page, locator) -> None:
    locator.locator("input").first.blur()  # Gradio 3.41 closes the list on blur, opens it on focus
    locator.locator("ul.options").wait_for(state="detached")


def radio_options(locator) -> list[str]:
    return locator.locator("input[type=radio]").evaluate_all("items => items.map(i => i.value)")


def set_value(page: Page, locator, value: str) -> None:
    """Set a control the way a user does; checks that it shows ``value`` afterwards."""
    what = kind(locator)
    if what == "checkbox":
        box = locator.locator("input[type=checkbox]")
        if box.is_checked() != (value == "True"):
            box.click()
    elif what == "dropdown":
        locator.locator("input").first.click()
        option(locator, value).click()
    elif what == "radio":
        locator.locator(f"label:has(input[value=\"{value}\"])").click()
    else:  # slider, number
        field = locator.locator("input[type=number]")
        field.fill(str(value))
        field.blur()
    assert value_of(locator) == str(value), f"{locator} shows {value_of(locator)!r}, not {value!r}"


def set_number(page: Page, elem_id: str, value: int) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.blur()


def generate(page: Page, tab: str = "txt2img", width: int = 640, height: int = 640, steps: int = 2) -> tuple[str, str]:
    """Generate with the page's controls; returns (infotext shown, error shown or "")."""
    open_tab(page, tab)
    page.locator(f"#{tab}_prompt textarea").fill("a red cube")
    set_number(page, f"{tab}_steps", steps)
    set_number(page, f"{tab}_width", width)
    set_number(page, f"{tab}_height", height)
    page.locator(f"#{tab}_seed input").fill("1")
    before = page.locator(f"#html_log_{tab}").first.inner_html()
    page.locator(f"#{tab}_generate").click()
    # ui.js shows Interrupt over Generate while a run lasts; an earlier run's log stays until then
    page.locator(f"#{tab}_interrupt").wait_for(state="hidden", timeout=RUN_TIMEOUT)
    page.wait_for_function("""([id, before]) => { const log = document.getElementById(id);
                               return log.innerHTML !== before && log.querySelector('.performance'); }""",
                           arg=[f"html_log_{tab}", before], timeout=RUN_TIMEOUT)
    error = page.locator(f"#html_log_{tab} .error")
    return page.locator(f"#html_info_{tab}").first.inner_text(), error.inner_text() if error.count() else ""


def infotext_entries(text: str) -> dict[str, str]:
    """The ``Key: value`` entries of the infotext's last line (values unquoted)."""
    last = text.strip().splitlines()[-1]
    return {k: v.strip('"') for k, v in re.findall(r'\s*([\w\s().\-/\[\]]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', last)}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("tab", TABS)
def test_controls_labels_order_and_tooltips(page, tab):
    open_tab(page, tab)
    accordion = page.locator(f"#hidiffusion_{tab}")
    assert "input-accordion" in accordion.get_attribute("class")
    assert page.locator(f"#hidiffusion_{tab} > .label-wrap > span").first.inner_text().strip() == ARG["enabled"].label
    advanced = page.locator(f"#hidiffusion_{tab}_advanced")
    assert advanced.count() == 1 and "open" not in advanced.locator("> .label-wrap").get_attribute("class")

    ids = accordion.evaluate("""(e, tab) => Array.from(e.querySelectorAll('[id^="hidiffusion_' + tab + '_"]'))
                                .map(c => c.id).filter(id => id !== 'hidiffusion_' + tab + '_advanced')""", tab)
    assert ids == [f"hidiffusion_{tab}_{name}" for name in CONTROLS]
    inside = advanced.evaluate("""(e, tab) => Array.from(e.querySelectorAll('[id^="hidiffusion_' + tab + '_"]'))
                                  .map(c => c.id.slice(('hidiffusion_' + tab + '_').length))""", tab)
    assert inside and "native_gate" in inside and tuple(inside) == CONTROLS[-len(inside):], inside

    open_accordion(page, f"hidiffusion_{tab}")
    open_accordion(page, f"hidiffusion_{tab}_advanced")
    for name in CONTROLS:
        span = label_span(control(page, tab, name))
        assert span.inner_text().strip() == ARG[name].label, name
    # hints.js titles the spans a second after they render
    spans = [(page.locator(f"#hidiffusion_{tab} > .label-wrap > span").first, ARG["enabled"])]
    spans += [(label_span(control(page, tab, name)), ARG[name]) for name in CONTROLS]
    deadline = time.monotonic() + 10
    while not all(span.get_attribute("title") for span, _ in spans) and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    for span, arg in spans:
        assert span.get_attribute("title") == arg.hint, f"tooltip of {arg.label!r}"


def test_controls_offer_only_accepted_values(page):
    open_accordion(page, "hidiffusion_txt2img")
    open_accordion(page, "hidiffusion_txt2img_advanced")
    defaults = sa.defaults()
    for position, arg in enumerate(sa.ARGS[1:], start=1):
        locator = control(page, "txt2img", arg.name)
        what = kind(locator)
        if arg.name in ("t1", "t2"):
            assert what == "dropdown", f"{arg.name} is a {what}, not a dropdown"
        if arg.name == "shift_index":
            assert what == "radio", f"shift_index is a {what}, not a radio"
        if what == "dropdown":
            options = dropdown_options(page, locator)
        elif what == "radio":
            options = radio_options(locator)
        else:
            continue
        assert options, arg.name
        if arg.name in ("t1", "t2"):
            assert "auto" in options and value_of(locator) == "auto", (arg.name, options)
        if arg.name == "shift_index":
            assert len(options) == 4, options
        for option in options:
            values = list(defaults)
            values[position] = option
            sa.parse(values)  # raises ArgError for a value the script refuses


def _set_t1_shift_fixed_index(page: Page, tab: str = "txt2img") -> None:
    enable(page, tab)
    set_value(page, control(page, tab, "t1"), "0.5")
    set_value(page, control(page, tab, "shift"), "fixed")
    set_value(page, control(page, tab, "shift_index"), "2")


def test_txt2img_infotext_shows_the_settings(page):
    _set_t1_shift_fixed_index(page)
    info, error = generate(page)
    assert not error, error
    entries = infotext_entries(info)
    assert entries.get("HiDiffusion") == "True", info
    assert entries.get("HiDiffusion T1") == "0.5", info
    assert entries.get("HiDiffusion shift") == "fixed", info
    assert entries.get("HiDiffusion shift index") == "2", info


def test_send_to_img2img_carries_the_settings(page):
    _set_t1_shift_fixed_index(page)
    info, error = generate(page)
    assert not error and "HiDiffusion: True" in info, error or info
    assert accordion_ticked(page, "img2img") == (False, False)
    page.locator("#txt2img_send_to_img2img").click()
    page.locator("#tab_img2img").wait_for(state="visible")
    wait_for_queue_idle(page)
    wait_ticked(page, "img2img", True)
    assert accordion_ticked(page, "img2img") == (True, True)
    shown = {name: value_of(control(page, "img2img", name)) for name in ("t1", "shift", "shift_index")}
    assert shown == {"t1": "0.5", "shift": "fixed", "shift_index": "2"}


def wait_ticked(page: Page, tab: str, ticked: bool, timeout: float = 10_000) -> None:
    """Give the InputAccordion's .change() handler time to follow its checkbox (the assert after says)."""
    with contextlib.suppress(PlaywrightTimeout):
        page.wait_for_function("""([id, ticked]) => document.getElementById(id + '-visible-checkbox').checked === ticked
                                  && document.querySelector('#' + id + '-checkbox input').checked === ticked""",
                               arg=[f"hidiffusion_{tab}", ticked], timeout=timeout)


def _paste(page: Page, text: str, prompt: str) -> None:
    page.locator("#txt2img_prompt textarea").fill(text)
    page.locator("#txt2img_tools #paste").click()
    # the paste rewrites the prompt box to the infotext's prompt
    page.wait_for_function("p => document.querySelector('#txt2img_prompt textarea').value === p", arg=prompt)
    wait_for_queue_idle(page)


def test_paste_restores_and_clears(page):
    _paste(page, INFOTEXT_ON, "a red cube")
    wait_ticked(page, "txt2img", True)
    assert accordion_ticked(page, "txt2img") == (True, True)
    shown = {name: value_of(control(page, "txt2img", name)) for name in ("t1", "shift", "shift_index")}
    assert shown == {"t1": "0.5", "shift": "fixed", "shift_index": "2"}
    _paste(page, INFOTEXT_OFF, "a blue ball")
    wait_ticked(page, "txt2img", False)
    assert accordion_ticked(page, "txt2img") == (False, False)


def test_paste_keeps_a_ratio_the_list_does_not_have(page):
    """0.45 is a ratio the API takes and the dropdown does not list: paste restores it as it is,
    and the image is made with it."""
    _paste(page, INFOTEXT_ON.replace("HiDiffusion T1: 0.5", "HiDiffusion T1: 0.45"), "a red cube")
    wait_ticked(page, "txt2img", True)
    assert value_of(control(page, "txt2img", "t1")) == "0.45"
    info, error = generate(page)
    assert not error, error
    assert infotext_entries(info).get("HiDiffusion T1") == "0.45", info


def type_into(locator, text: str) -> None:
    """Type into a dropdown's input key by key, as a user does: Gradio 3.41 takes a custom
    value on keyup (a programmatic fill only fires ``input`` and leaves the value as it was)."""
    field = locator.locator("input").first
    field.fill("")
    field.press_sequentially(text)
    field.blur()


def test_typed_ratio_is_used_and_checked_in_ui_words(page):
    enable(page, "txt2img")
    type_into(control(page, "txt2img", "t2"), "0.35")
    assert value_of(control(page, "txt2img", "t2")) == "0.35"
    info, error = generate(page)
    assert not error and infotext_entries(info).get("HiDiffusion T2") == "0.35", error or info
    type_into(control(page, "txt2img", "t2"), "abc")
    _, error = generate(page)
    assert "T2 ratio" in error and "abc" in error, error


def test_native_size_says_skipped(page):
    enable(page, "txt2img")
    info, error = generate(page, width=512, height=512)
    assert not error, error
    assert "HiDiffusion skipped" in info, info


def test_wrong_model_preset_error_uses_ui_words(page):
    enable(page, "txt2img")
    set_value(page, control(page, "txt2img", "model"), "SDXL")
    _, error = generate(page)
    assert error, "no error shown for the SDXL preset on an SD 1.x model"
    assert "SDXL" in error and "SD 1.x" in error, error
    assert not re.search(r"'sd1'|'sdxl'|\bNone\b|\bsd1\b", error), error


def test_xyz_plot_mode_axis(page):
    page.locator("#txt2img_script_container").scroll_into_view_if_needed()
    script = page.locator("#txt2img_script_container #script_list")
    set_value(page, script, "X/Y/Z plot")
    x_type = page.locator("#script_txt2img_xyz_plot_x_type")
    x_type.wait_for(state="visible")
    set_value(page, x_type, "[HiDiffusion] Mode")
    # the axis has choices: the webui shows its "X values" dropdown (no elem_id) in x_type's row
    values = x_type.locator("xpath=..").locator(".gradio-dropdown:visible", has_text=re.compile(r"^\s*X values"))
    values.wait_for(state="visible")
    assert dropdown_options(page, values) == list(sa.MODES)
    for value in ("off", "full"):
        options = values.locator("ul.options")
        if not options.is_visible():
            values.locator("input").first.click()
        option(values, value).click()
    close_dropdown(page, values)
    tokens = values.locator(".token").all_inner_texts()
    assert [t.strip() for t in tokens] == ["off", "full"], tokens
    set_value(page, page.locator("#script_txt2img_xyz_plot_include_lone_images"), "True")

    first, error = generate(page)
    assert not error, error
    thumbnails = page.locator("#txt2img_gallery .thumbnail-item.thumbnail-small")
    assert thumbnails.count() == 3  # the grid, then the off and full cells
    shown = [first]  # after a run the webui shows the first cell's infotext
    for index in range(3):
        thumbnails.nth(index).click()  # the webui's gallery listener shows that image's infotext
        page.wait_for_function("before => document.querySelector('#html_info_txt2img').innerText !== before",
                               arg=shown[-1])
        shown.append(page.locator("#html_info_txt2img").first.inner_text())
    grid, off, full = shown[1:]
    assert "X Type: [HiDiffusion] Mode" in grid, grid
    assert re.search(r"X Values: \"?off, ?full", grid), grid
    off, full = infotext_entries(off), infotext_entries(full)
    assert not any(key.startswith("HiDiffusion") for key in off), shown[2]
    assert off.get("Seed") == full.get("Seed") and off.get("Size") == full.get("Size") == "640x640"
    assert full.get("HiDiffusion") == "True", shown[3]


def _settings_shift(page: Page):
    open_tab(page, "settings", "Settings")
    page.locator("#settings > div > button", has_text=re.compile(r"^\s*HiDiffusion\s*$")).click()
    option = page.locator("#setting_hidiffusion_default_shift")
    option.wait_for(state="visible")
    return option


def _apply_settings(page: Page) -> None:
    page.locator("#settings_submit").click()
    page.wait_for_function("() => /settings changed: .*hidiffusion_default_shift/"
                           ".test(document.querySelector('#settings_result').innerText)")


def test_settings_default_after_reload_ui(page):
    option = _settings_shift(page)
    assert f"Default: {ARG['shift'].label}" in option.inner_text()
    assert "requires Reload UI" in option.inner_text(), option.inner_text()
    try:
        set_value(page, option, "cycle")
        _apply_settings(page)
        page.locator("#settings_restart_gradio").click()
        page.get_by_text("Reloading...").wait_for(timeout=30_000)
        wait_for_ui(page)
        for tab in TABS:
            assert value_of(control(page, tab, "shift")) == "cycle", tab
    finally:
        if not page.is_closed():
            try:
                wait_for_ui(page)
                set_value(page, _settings_shift(page), "random")
                _apply_settings(page)
            except Exception as error:  # the settings file is this run's own: it goes with the run
                print(f"could not restore the shift default: {error}", file=sys.stderr)



def _tab_button(page: Page, tabs_id: str, label: str):
    return page.locator(f"#{tabs_id} > .tab-nav > button", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$"))


def _png_infotext(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get("parameters", "")


def _run_batch_tab(page: Page, source: Path, out: Path, count: int) -> list[Path]:
    """Generate from img2img's Batch tab (From directory) with the page's controls; returns the
    outputs once ``count`` are written and the run has ended (the page still shows an earlier
    run's log while a new one runs)."""
    page.locator("#img2img_batch_input_dir textarea").fill(str(source))
    page.locator("#img2img_batch_output_dir textarea").fill(str(out))
    page.locator("#img2img_generate").click()
    deadline = time.monotonic() + 3 * RUN_TIMEOUT / 1000
    while len(list(out.glob("*.png"))) < count and time.monotonic() < deadline:
        page.wait_for_timeout(500)
    page.locator("#img2img_generate").wait_for(state="visible", timeout=RUN_TIMEOUT)
    page.locator("#html_log_img2img .performance").wait_for(state="attached")
    error = page.locator("#html_log_img2img .error")
    assert not error.count(), error.inner_text()
    return sorted(out.glob("*.png"))


def test_img2img_batch_folder_makes_each_image_as_alone(page, webui_url, tmp_path):
    """img2img's Batch tab on a folder of three sizes, HiDiffusion on: each output is, bit for bit,
    its image made alone through the API with the same settings (the native-size one, which
    HiDiffusion skips, is also vanilla's), HiDiffusion changed the others, and every infotext
    tells the truth about its own image, though the webui runs the whole folder on one reused
    processing object.

    A batch with HiDiffusion off runs first: in the webui's first Batch run after it starts, the
    first image differs from the same image made alone by up to 13/255 (seen with HiDiffusion
    off in both), and later runs match exactly. That run also gives the vanilla images."""
    import base64

    import numpy as np
    from conftest import Webui, pixels
    from PIL import Image

    sizes = {"a-native": (512, 512), "b-wide": (704, 576), "c-tall": (576, 704)}
    source = tmp_path / "in"
    source.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(source / f"{name}.png")

    def read(path: Path):
        return np.asarray(Image.open(path).convert("RGB"), dtype=int)

    def by_source(paths: list[Path]) -> dict[str, Path]:
        """Each output by the source of its size (A1111 names them by the source's stem, Forge by
        seed and prompt: the sizes tell them apart in both)."""
        names = {size: name for name, size in sizes.items()}
        return {names.get(Image.open(path).size, path.name): path for path in paths}

    open_tab(page, "img2img")
    _tab_button(page, "mode_img2img", "Batch").click()
    _tab_button(page, "img2img_batch_source", "From directory").click()
    _tab_button(page, "img2img_tabs_resize", "Resize by").click()
    page.locator("#img2img_prompt textarea").fill("a red cube")
    set_number(page, "img2img_steps", 3)
    page.locator("#img2img_seed input").fill("5")
    vanilla = by_source(_run_batch_tab(page, source, tmp_path / "off", len(sizes)))
    assert sorted(vanilla) == sorted(sizes), sorted(vanilla)
    enable(page, "img2img")
    made = by_source(_run_batch_tab(page, source, tmp_path / "on", len(sizes)))
    assert sorted(made) == sorted(sizes), sorted(made)

    api = Webui(webui_url)

    def alone(name: str, entries: dict, on: bool):
        w, h = sizes[name]
        # the settings the batch ran with (an earlier test may have moved the shift default)
        args = sa.to_positional({"enabled": on, "shift": entries.get("HiDiffusion shift", "random")})
        status, body = api.call("/sdapi/v1/img2img", dict(
            init_images=[base64.b64encode((source / f"{name}.png").read_bytes()).decode()], prompt="a red cube",
            negative_prompt="", width=w, height=h, steps=3, seed=5, cfg_scale=float(entries["CFG scale"]),
            sampler_name=entries["Sampler"], scheduler=entries.get("Schedule type", "Automatic"),
            denoising_strength=float(entries["Denoising strength"]), alwayson_scripts={"HiDiffusion": {"args": args}}))
        assert status == 200, body
        return pixels(body)

    for name, (w, h) in sizes.items():
        entries = infotext_entries(_png_infotext(made[name]))
        assert entries.get("HiDiffusion") == "True", (name, entries)
        assert entries.get("Size") == f"{w}x{h}", (name, entries)
        skipped = "512x512" in entries.get("HiDiffusion skipped", "")
        assert skipped == (name == "a-native"), (name, entries)
        image = read(made[name])
        made_alone = alone(name, entries, True)
        assert made_alone.shape == image.shape and (made_alone == image).all(), \
            f"{name}: the batch output differs from the image made alone (max {np.abs(made_alone - image).max()})"
        if skipped:
            assert (alone(name, entries, False) == image).all(), "the skipped image is not vanilla"
        else:
            assert not (read(vanilla[name]) == image).all(), f"HiDiffusion did nothing to {name}"

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
