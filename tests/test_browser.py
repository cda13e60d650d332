"""Real-browser tests: Debian's headless Chromium driven by Playwright.

Playwright cannot download its own browser here, so it drives /usr/bin/chromium
(`.ci/run` installs it).  Screenshots go to test-artifacts/.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from layerscope.analysis.registry import METRICS
from layerscope.analysis.report import write_report
from layerscope.app.cli import main

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SHORT_TEXT = "Layer analysis asks which blocks of a transformer change the residual stream, and by how much."
# The first load of SmolLM2 on a fresh machine converts the GGUF file (about 40 s on two cores).
MODEL_LOAD_SECONDS = 240


@pytest.fixture
def browser(tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run does this)"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    """`layerscope app` on a free localhost port with its own run store."""
    port = _free_port()
    log = (tmp_path / "app.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "layerscope.app.cli", "app", "--port", str(port), "--runs-dir", str(tmp_path / "runs")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"the app exited: {(tmp_path / 'app.log').read_text()}"
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                assert time.monotonic() < deadline, "the app did not answer its health check within 60 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and anything it started, nothing else
        server.wait(timeout=30)
        log.close()


def test_block_influence_of_smollm2_draws_30_bars(browser, app_url):
    assert "block-influence" in METRICS, "the block-influence measurement is not registered (analysis/block_influence.py)"
    page = browser.new_page()
    page.goto(f"{app_url}/block-influence")
    run = page.get_by_role("button", name="Run", exact=True)
    run.wait_for(timeout=120_000)  # the first script run imports torch and transformers
    page.locator(".st-key-model_choice input").click()
    page.get_by_role("option", name="smollm2-135m", exact=True).click()
    text = page.locator(".st-key-corpus_text textarea")
    text.fill(SHORT_TEXT)
    text.press("Control+Enter")
    run.click()
    chart = page.locator(".js-plotly-plot")
    chart.first.wait_for(timeout=MODEL_LOAD_SECONDS * 1000)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .barlayer .point').length > 0")
    bars_per_trace = page.evaluate(
        "[...document.querySelectorAll('.js-plotly-plot .barlayer .trace')].map(t => t.querySelectorAll('.point').length)")
    chart.first.scroll_into_view_if_needed()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_block_influence_smollm2.png"))
    assert chart.count() == 1
    assert bars_per_trace and all(n == 30 for n in bars_per_trace), bars_per_trace
    assert "smollm2-135m" in page.locator("[data-testid='stCaptionContainer']").last.inner_text()


def test_report_opens_with_no_network(browser, tmp_path):
    root = tmp_path / "runs"
    assert main(["analyze", "block-influence", "--model", "tiny-llama", "--corpus", "text:" + SHORT_TEXT * 3,
                 "--seq-len", "32", "--max-tokens", "64", "--runs-dir", str(root), "--format", "json"]) == 0
    [run] = list(root.iterdir())
    report = tmp_path / "report.html"
    n_figures = write_report(run.name, report, root)
    outside = []

    def only_files(route):
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    browser.route("**/*", only_files)
    page = browser.new_page()
    page.goto(report.as_uri())
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {n_figures}")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report_offline.png"), full_page=True)
    assert page.locator(".js-plotly-plot").count() == n_figures >= 1
    assert outside == []
