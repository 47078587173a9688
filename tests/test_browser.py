"""The quickstart notebook's Playground in a real browser: JupyterLab on localhost, driven by Playwright with Debian's
Chromium, asserting on the rendered DOM (coloured tokens, live draft-length changes, the inspector chart).

Needs `pip install playwright` (in the `test` extra; never `playwright install`) and Debian's Chromium
(`apt-get install -y chromium`; `.ci/run` installs it). Missing either is a failure, not a skip. Screenshots go to
`test-output/browser/`.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "test-output" / "browser"
NOTEBOOK = "01_quickstart.ipynb"
CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")  # the real binary first (the wrapper warns)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
LONG = 120_000  # ms: the machine is slow (2 CPUs shared), and the first plotly FigureWidget alone takes seconds


KERNEL_READY = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.connectionStatus === "connected" && k.status === "idle";
}"""
RUN_ALL = "() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return true; }"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a temp copy of notebooks/; yields ``(base_url, token)``; the process group is ended after."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    shutil.copytree(ROOT / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    settings = tmp / "settings"
    notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    cmd = [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None"]
    log_path = tmp / "jupyter.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not answer on {base}/api in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, token
    finally:
        _kill_group(proc)
        log.close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install playwright` (it is in the `test` extra; do not run "
                    "`playwright install`, the test uses Debian's Chromium)")
    exe = next((p for p in CHROMIUM_PATHS if os.path.exists(p)), None)
    if exe is None:
        pytest.fail(f"Chromium not found at {' or '.join(CHROMIUM_PATHS)}: `apt-get install -y chromium` (Debian)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _shot(page, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")
    return path


def test_quickstart_playground_in_jupyterlab(lab, browser):
    from playwright.sync_api import expect

    base, token = lab
    t0 = time.monotonic()
    console_errors = []
    ctx = browser.new_context(viewport={"width": 1500, "height": 1900})
    page = ctx.new_page()
    page.set_default_timeout(LONG)
    page.on("console", lambda m: console_errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(f"pageerror: {e}"))
    try:
        page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}&reset")
        page.wait_for_selector(".jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator[data-status='idle']",
                               timeout=LONG)
        # The indicator can read idle before the kernel's websocket is up; a run-all sent then is never executed.
        page.wait_for_function(KERNEL_READY, timeout=LONG)
        page.evaluate(RUN_ALL)  # not awaited: the command's promise may outlive the cells

        # 1. the run started by the notebook's `pg.run()` fills the token view round by round
        pg = page.locator(".mtplab-playground")
        expect(pg).to_be_visible(timeout=LONG)
        view = pg.locator(".mtplab-token-view")
        tokens = view.locator(".tokens .tok")
        expect(tokens.first).to_be_visible(timeout=LONG)
        expect(view.locator(".status")).to_contain_text("× plain decoding", timeout=2 * LONG)
        accepted = view.locator(".tokens .tok.tok-accepted").count()
        rejected = view.locator(".tokens .tok.tok-rejected").count()
        target_own = view.locator(".tokens .tok.tok-bonus, .tokens .tok.tok-correction").count()
        print(f"\nrun: {tokens.count()} token spans ({accepted} accepted, {rejected} rejected, "
              f"{target_own} bonus/correction) in {view.locator('.tokens .round').count()} rounds; "
              f"status: {view.locator('.status').inner_text()!r}")
        assert accepted > 0 and rejected > 0 and target_own > 0
        expect(pg.locator(".mtplab-dashboard")).to_contain_text("identical to plain ✓")
        # the default schedule is auto: the rounds where it chose another γ are marked ⟳, the dashboard says why
        auto = view.locator(".tokens .round .auto-change")
        assert auto.count() >= 1 and re.fullmatch(r"⟳ γ=\d+", auto.first.inner_text())
        assert "expects" in auto.first.get_attribute("title")
        expect(pg.locator(".mtplab-dashboard")).to_contain_text("auto draft length")
        print(f"auto: {auto.count()} draft-length changes marked; first {auto.first.inner_text()!r}")
        assert pg.locator(".mtplab-error").inner_text().strip() == ""
        pg.scroll_into_view_if_needed()
        _shot(page, "01_after_run.png")

        # 2. clicking a rejected token draws p vs q in the inspector and says what happened
        inspector = pg.locator(".mtplab-inspector")
        bars = inspector.locator(".js-plotly-plot g.trace.bars g.point path")
        assert bars.count() == 0, "the inspector should be empty before a token is clicked"
        tok = view.locator(".tokens .tok.tok-rejected").first
        tok.click()
        expect(tok).to_have_class(re.compile(r"\bselected\b"))
        expect(bars.first).to_be_attached(timeout=LONG)
        assert bars.count() > 0
        title = inspector.locator(".widget-html").first
        expect(title).to_contain_text("rejected")
        expect(title).to_contain_text(f"Round {tok.get_attribute('data-round')}")
        print(f"inspector: {bars.count()} bars; title: {title.inner_text()!r}")
        _shot(page, "02_after_token_click.png")

        # 3. the draft-length slider sets the next rounds' γ; a change during a run is marked ⚙ in the text
        pg.locator(".mtplab-reset").click()
        pg.locator(".widget-toggle-buttons button", has_text="constant").click()  # γ as the slider says
        expect(view.locator(".tokens .round")).to_have_count(0, timeout=LONG)
        # a prompt whose answer is long, so that five rounds never reach the end of the answer
        pg.locator(".mtplab-prompt textarea").fill("Write a long story about a dragon who learns to bake bread.")
        slider = pg.locator(".mtplab-draft-length")
        readout = slider.locator(".widget-readout")
        handle = slider.locator(".noUi-handle")
        start = int(readout.inner_text())
        handle.focus()
        for _ in range(6 - start):
            handle.press("ArrowRight")
        expect(readout).to_have_text("6")
        rounds = view.locator(".tokens .round")
        step = pg.locator(".mtplab-step button, button.mtplab-step").first
        for n in (1, 2, 3):  # in a fresh state the first Step starts a stream and decodes its first round
            step.click()
            expect(rounds).to_have_count(n, timeout=LONG)
        assert [rounds.nth(i).get_attribute("data-k") for i in range(3)] == ["6"] * 3
        assert view.locator(".setting-change").count() == 0, "a change before a run is not a change during it"
        assert view.locator(".auto-change").count() == 0, "constant: auto marks nothing"
        handle.focus()
        handle.press("ArrowLeft")
        expect(readout).to_have_text("5")
        for n in (4, 5):
            step.click()
            expect(rounds).to_have_count(n, timeout=LONG)
        ks = [rounds.nth(i).get_attribute("data-k") for i in range(5)]
        print(f"step: data-k per round {ks}")
        assert ks == ["6", "6", "6", "5", "5"]
        marks = view.locator(".setting-change")
        expect(marks).to_have_count(1)
        expect(rounds.nth(3).locator(".setting-change")).to_contain_text("γ=5")
        expect(view.locator(".status")).to_contain_text("γ=5")
        _shot(page, "03_after_steps.png")
        print(f"browser test took {time.monotonic() - t0:.1f} s after the server was up")
    finally:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "console-errors.txt").write_text("\n".join(console_errors) + ("\n" if console_errors else ""))
        if console_errors:
            print("browser console errors:\n  " + "\n  ".join(console_errors))
        ctx.close()
