"""The dashboards as users get them: `python -m cortexlab.apps` (the README's main command) serving every
app, fetched over HTTP, under 10 concurrent sessions, and driven in Debian's headless chromium.

The browser tests need /usr/bin/chromium (`make browser` installs it); they are skipped without it,
unless CORTEXLAB_REQUIRE_BROWSER=1 (set by .ci/run), where a missing browser is an error.
Screenshots go to $CORTEXLAB_SCREENSHOTS (default: a temporary folder); the README's come from there.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("panel")

from cortexlab.apps import APPS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 120) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One `python -m cortexlab.apps` server on a free loopback port (models warmed at start-up)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "panel.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BOKEH_LOG_LEVEL": "info"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "cortexlab.apps", "--port", str(port)], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _get(url + "/", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not answer within 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


CLIENT_GONE = ("WebSocketClosedError", "StreamClosedError")   # tornado: a tab closed while an update was on its way


def _errors(log: Path) -> list[str]:
    """The exceptions the server logged (the last line of each traceback) and its ERROR lines, leaving out
    the websocket errors of a client that has gone away."""
    found = []
    for line in log.read_text().splitlines():
        exception = re.match(r"^[\w.]+(Error|Exception)\b", line)
        if (exception or "ERROR" in line) and not any(name in line for name in CLIENT_GONE):
            found.append(line)
    return found


def test_every_app_is_served(server):
    url, log = server
    for path in ("", *APPS):       # the page shell; the document itself follows over the websocket
        status, html = _get(f"{url}/{path}")
        assert status == 200 and "<title>cortexlab · " in html and "bokeh" in html.lower(), path
    assert not _errors(log), _errors(log)


def test_ten_concurrent_sessions_complete_without_errors(server):
    url, log = server
    names = [list(APPS)[i % len(APPS)] for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda name: _get(f"{url}/{name}", timeout=240), names))
    assert [status for status, _ in results] == [200] * 10
    assert all("bokeh" in html.lower() for _, html in results)
    assert not _errors(log), _errors(log)


# --------------------------------------------------------------------------- real browser
def _browser_or_skip():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CORTEXLAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"CORTEXLAB_REQUIRE_BROWSER=1 but there is no chromium at {CHROMIUM} (run `make browser`)")
        pytest.skip("Debian's chromium is not installed (`make browser`)")
    return pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser(server):
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = os.environ.get("CORTEXLAB_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _plot_state(page, index: int, expression: str):
    return page.locator(".js-plotly-plot").nth(index).evaluate(f"el => JSON.stringify({expression})")


def _wait_for_change(page, index: int, expression: str, before, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _plot_state(page, index, expression)
        if now != before:
            return now
        time.sleep(0.25)
    raise AssertionError(f"plot {index} did not change ({expression} stayed {before})")


def _settle(page, timeout: float = 60_000) -> None:
    """Wait until no pane shows Panel's loading spinner (a redraw has finished)."""
    page.locator(".pn-loading").first.wait_for(state="detached", timeout=timeout)


def _open(browser, url: str):
    """A new tab on `url`, once its first plot is drawn, and the list its JavaScript errors go to.
    (`benchmarks/bench_apps_paint.py` times this first paint.)"""
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    return page, errors


def _finish(page, errors, screenshots: Path, name: str) -> None:
    """Once every redraw is done: a screenshot for the README, no JavaScript error, the tab closed."""
    _settle(page)
    page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)
    assert not errors, errors
    page.close()


def _move_slider(page, label: str, key: str = "ArrowRight"):
    """Focus the noUiSlider handle of the slider whose label starts with `label` and press `key`."""
    slider = page.locator(".bk-input-group").filter(has_text=re.compile(rf"^{re.escape(label)}")).first
    handle = slider.locator(".noUi-handle").first
    handle.focus()
    page.keyboard.press(key)


def test_browser_index_links_every_app(browser, server, screenshots):
    url, _ = server
    page = browser.new_page(viewport={"width": 1500, "height": 900})
    page.goto(url + "/")
    for name, (title, _) in APPS.items():
        page.get_by_text(f"Open {title}").first.wait_for(timeout=60_000)
    _settle(page)
    page.screenshot(path=str(screenshots / "index.png"))
    page.get_by_text(f"Open {APPS['memory_state'][0]}").first.click()
    page.wait_for_url(re.compile(r"/memory_state"), timeout=60_000)
    page.close()


def test_browser_memory_state(browser, server, screenshots):
    url, _ = server
    page, errors = _open(browser, url + "/memory_state")
    title = "el.layout.title.text"
    before = _plot_state(page, 0, title)
    assert "head 0" in before
    _move_slider(page, "head")
    assert "head 1" in _wait_for_change(page, 0, title, before)
    page.get_by_role("button", name="Ask").click()
    page.get_by_text("with the session's memory").first.wait_for(timeout=60_000)
    _finish(page, errors, screenshots, "memory_state")


def test_browser_habituation(browser, server, screenshots):
    url, _ = server
    page, errors = _open(browser, url + "/habituation")
    title = "el.layout.title.text"
    before = _plot_state(page, 0, title)
    assert "layer 17" in before
    _move_slider(page, "layer", "ArrowLeft")
    assert "layer 16" in _wait_for_change(page, 0, title, before)
    _finish(page, errors, screenshots, "habituation")


def test_browser_inverse_scaling(browser, server, screenshots):
    url, _ = server
    page, errors = _open(browser, url + "/inverse_scaling")
    title = "el.layout?.title?.text"
    before = _plot_state(page, 0, title)
    assert "E2" in before
    page.locator("select").first.select_option(label="E3 loss by position")
    assert "E3" in _wait_for_change(page, 0, title, before)
    _finish(page, errors, screenshots, "inverse_scaling")


def test_browser_columns(browser, server, screenshots):
    url, _ = server
    page, errors = _open(browser, url + "/columns")
    title = "el.layout.title.text"
    page.locator(".js-plotly-plot").nth(1).wait_for(timeout=60_000)
    before = _plot_state(page, 1, title)              # the column JS matrix of the chosen layer
    _move_slider(page, "layer")
    assert _wait_for_change(page, 1, title, before) != before
    layers = _plot_state(page, 0, "el.data[0].x")      # JS per layer: SmolLM2's 30 layers, then NeuroLlama's 4
    page.locator("select").first.select_option(label="NeuroLlama (trained columns)")
    assert json.loads(_wait_for_change(page, 0, "el.data[0].x", layers)) == [0, 1, 2, 3]
    _finish(page, errors, screenshots, "columns")


def test_browser_two_tabs_never_share_memory(browser, server):
    """Tab one reads a second pass key; tab two, asked afterwards, still recalls only its own (40213)."""
    url, _ = server
    one, errors_one = _open(browser, url + "/memory_state")
    two, errors_two = _open(browser, url + "/memory_state")
    for page in (one, two):
        page.get_by_text("1 call(s) read").first.wait_for(timeout=60_000)
    one.locator("textarea").first.fill("Bob keeps bees on the roof. The pass key is 77777. Remember it.")
    one.locator("textarea").first.press("Tab")
    one.get_by_role("button", name="Read into memory").click()
    one.get_by_text("2 call(s) read").first.wait_for(timeout=60_000)
    two.get_by_role("button", name="Ask").click()
    answer = two.locator("p", has_text="with the session's memory").first
    answer.wait_for(timeout=60_000)
    text = answer.inner_text()
    assert "40213" in text and "77777" not in text, text
    assert not errors_one and not errors_two, errors_one + errors_two
    one.close()
    two.close()


def test_browser_ten_concurrent_sessions_recall_their_own_memory(browser, server):
    """10 tabs open at once, each asks its question while the others are still working; each gets its answer from
    its own session, with no error in any page or in the server log."""
    url, log = server
    pages, errors = [], []
    for _ in range(10):
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url + "/memory_state", wait_until="commit")
        pages.append(page)
    for page in pages:
        page.get_by_text("1 call(s) read").first.wait_for(timeout=240_000)
    for page in pages:                                  # queue all ten questions before reading any answer
        page.get_by_role("button", name="Ask").click()
    for page in pages:
        answer = page.locator("p", has_text="with the session's memory").first
        answer.wait_for(timeout=240_000)
        assert "40213" in answer.inner_text()
        page.close()
    assert not errors, errors
    assert not _errors(log), _errors(log)
