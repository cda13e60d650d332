"""Real-browser tests: Debian's headless Chromium driven by Playwright.

Playwright cannot download its own browser here, so it drives /usr/bin/chromium
(`.ci/run` installs it).  Every page of the app is visited on a tiny model and on
SmolLM2-135M, and each is saved as a screenshot in test-artifacts/.  The checks are what
a person looks for on those screenshots: tick labels that read as numbers in order, every
component named, a colour bar beside every heatmap, titles that fit, and the sink column
of the attention pattern with its hover text.

The measurements themselves are stored beforehand through the app's own `measure` (the
code the Run button calls, keyed the same way), so the pages open stored runs and the
test stays within about a minute; one Run is pressed in the browser, on SmolLM2.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

import layerscope as ls
from layerscope.analysis.registry import METRICS
from layerscope.analysis.report import write_report
from layerscope.analysis.store import list_runs, load_run
from layerscope.app.cli import main
from layerscope.app.workbench import AppSettings, corpus_choice, measure, measurement_key
from layerscope.probes.zoo import load_model

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SHORT_TEXT = "Layer analysis asks which blocks of a transformer change the residual stream, and by how much."
TINY = "tiny-llama"
REAL = "smollm2-135m"
# Pressed in the browser rather than stored beforehand: the Run button's own path.
PRESSED = "block-influence"
# On SmolLM2 the replay measurements take minutes on two cores; the survey shown on the
# Runs page holds every other measurement, from one pass.
REAL_SURVEY = [name for name in METRICS if METRICS[name].kind != "replay"]
# The first load of SmolLM2 on a fresh machine converts the GGUF file (about 40 s on two cores).
MODEL_LOAD_SECONDS = 240


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Every measurement of the tiny model on the short text, stored as the app stores
    them, and a survey of it with the effect of each skip on later layers (Csordás et
    al.'s heatmap)."""
    root = tmp_path_factory.mktemp("browser") / "runs"
    settings = AppSettings(root, (root.parent,))
    corpus = corpus_choice("text", SHORT_TEXT, "", 0, 0, settings)
    loaded = load_model(TINY)
    stored = {}
    for metric in METRICS.values():
        if metric.name != PRESSED:
            key = measurement_key(metric, TINY, corpus, metric.options(), "hooks")
            stored[metric.name] = measure(metric, loaded, corpus, metric.options(), key, settings)
    surveys = {TINY: ls.measure(loaded, SHORT_TEXT, options={"layer-skip": {"future": True}}).save(root).name}
    return root, stored, surveys


@pytest.fixture(scope="module")
def real_survey(store):
    """A survey of SmolLM2 on the short text, in the same store."""
    root, _, surveys = store
    surveys[REAL] = ls.measure(load_model(REAL), SHORT_TEXT, REAL_SURVEY).save(root).name
    return surveys[REAL]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run does this)"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
        try:
            yield context
        finally:
            context.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(runs_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`layerscope app` on a free localhost port, answering its health check."""
    port = _free_port()
    log = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "layerscope.app.cli", "app", "--port", str(port), "--runs-dir", str(runs_dir)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, f"the app exited: {log_path.read_text()}"
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return server, url
        except OSError:
            assert time.monotonic() < deadline, "the app did not answer its health check within 60 s"
            time.sleep(0.5)


def stop_app(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)  # the server and anything it started, nothing else
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def app_url(store, tmp_path_factory):
    server, url = start_app(store[0], tmp_path_factory.mktemp("app") / "app.log")
    try:
        yield url
    finally:
        stop_app(server)


# What the browser drew, read from each chart's own div (plotly keeps its data and layout there).
CHARTS_JS = """
() => [...document.querySelectorAll('.js-plotly-plot')].map(gd => {
    const svg = gd.querySelector('.main-svg');
    const title = gd.querySelector('.gtitle');
    const box = title ? title.getBoundingClientRect() : null;
    const frame = svg.getBoundingClientRect();
    return {
        title: gd.layout && gd.layout.title ? String(gd.layout.title.text || '') : '',
        heatmaps: gd.data.filter(t => t.type === 'heatmap').length,
        colorbars: gd.querySelectorAll('.colorbar').length,
        titleFits: !box || (box.left >= frame.left - 1 && box.right <= frame.right + 1),
        xticks: [...gd.querySelectorAll('.xaxislayer-above .xtick text')].map(t => t.textContent),
        y2ticks: [...gd.querySelectorAll('.y2tick text')].map(t => t.textContent),
        // A power of ten is "10" and a raised exponent: read as "10^-2".
        logTickLabels: [...gd.querySelectorAll('.yaxislayer-above .ytick text')].map(t =>
            t.querySelector('tspan') ? [...t.childNodes].map(n => n.textContent).filter(x => x).join('^')
                                     : t.textContent),
        ylog: !!(gd._fullLayout.yaxis && gd._fullLayout.yaxis.type === 'log'),
    };
})
"""


def _nav(page, title: str) -> None:
    """Click a page in the sidebar (the app lists every page, never a folded list)."""
    page.locator("[data-testid='stSidebarNavLink']", has_text=re.compile(f"^{re.escape(title)}$")).click()


def _open_page(page, title: str, charts: int) -> list[dict]:
    _nav(page, title)
    page.locator("h1", has_text=re.compile(f"^{re.escape(title)}$")).wait_for(timeout=60_000)
    # Streamlit keeps the last page's elements, greyed, until the new ones replace them.
    page.wait_for_function("!document.querySelector('[data-stale=\"true\"]')", timeout=60_000)
    # Exactly: after a Run the previous run's charts can linger beside the new ones for a moment.
    page.wait_for_function(f"[...document.querySelectorAll('.js-plotly-plot')].filter(g => g._fullLayout).length == {charts}",
                           timeout=MODEL_LOAD_SECONDS * 1000)
    page.wait_for_timeout(300)  # plotly's last relayout of a freshly drawn chart
    return page.evaluate(CHARTS_JS)


def _screenshot(page, path: Path) -> None:
    """The whole page: Streamlit scrolls its main section, not the document, so the window
    is made as tall as that section for the shot."""
    height = page.evaluate("Math.max(...[...document.querySelectorAll('section, [data-testid=\"stMain\"]')]"
                           ".map(e => e.scrollHeight), 1000)")
    page.set_viewport_size({"width": 1400, "height": min(int(height) + 40, 12000)})
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1400, "height": 1000})


def _numbers(labels: list[str]) -> list[float]:
    """Tick labels as numbers: "20%", "0.05", "\u22121", or a power of ten read as "10^\u22122"."""
    numbers = []
    for label in labels:
        label = label.replace("%", "").replace(",", "").replace("\u2212", "-").replace("\u200b", "").strip()
        label = re.sub(r"\^+", "^", label).strip("^")
        power = re.fullmatch(r"10\^(-?\d+)", label)
        numbers.append(10.0 ** int(power.group(1)) if power else float(label))
    return numbers


def _check_common(name: str, drawn: list[dict]) -> None:
    for chart in drawn:
        assert chart["colorbars"] >= chart["heatmaps"], f"{name}: a heatmap without a colour bar: {chart['title']}"
        assert chart["titleFits"], f"{name}: the title runs off the chart: {chart['title']}"
        if chart["ylog"]:
            # Every label is the value at its tick, so they increase up the axis; plotly's
            # own labels ("0.1", "2", "5", "1") do not.
            ticks = _numbers(chart["logTickLabels"])
            assert len(ticks) >= 2 and ticks == sorted(set(ticks)), (name, chart["logTickLabels"])


def _hover_sink_cell(page, chart) -> str:
    """Move the mouse onto the cell (query 1, key 0) of the attention pattern; its hover text."""
    area = chart.locator(".nsewdrag").first.bounding_box()
    n = page.evaluate("gd => gd.data[0].x.length", chart.element_handle())
    page.mouse.move(area["x"] + area["width"] * 0.5 / n, area["y"] + area["height"] * 1.5 / n)
    hover = chart.locator(".hoverlayer .hovertext")
    hover.first.wait_for(timeout=5000)
    return hover.first.text_content()


def _choose(page, model: str) -> None:
    page.locator(".st-key-model_choice input").click()
    page.get_by_role("option", name=model, exact=True).click()
    text = page.locator(".st-key-corpus_text textarea")
    text.fill(SHORT_TEXT)
    text.press("Control+Enter")


def _check_measurement(page, name: str, drawn: list[dict], tables: dict, where: str) -> None:
    """What a person checks on one measurement's figures, `drawn` in page order."""
    _check_common(f"{where} {name}", drawn)
    if name == "logit-lens":
        ticks = _numbers(drawn[0]["y2ticks"])
        assert len(ticks) >= 3 and ticks == sorted(set(ticks)), drawn[0]["y2ticks"]
    if name == "dla":
        table = tables["dla"]
        labels = [c if pd.isna(layer) else f"{c} {int(layer)}" for c, layer in zip(table["component"], table["layer"])]
        assert drawn[0]["xticks"] == labels
    if name == "block-influence":
        n_layers = tables["block_influence"]["layer"].nunique()
        assert _numbers(drawn[0]["xticks"]) == list(range(n_layers))
    if name == "layer-skip" and "skip_future" in tables:
        assert any(c["heatmaps"] and c["colorbars"] for c in drawn)
    if name == "sinks":
        chart = page.locator(".js-plotly-plot", has=page.locator(".gtitle", has_text="Attention pattern"))
        chart.scroll_into_view_if_needed()
        assert chart.locator(".shapelayer path").count() >= 1
        assert "sink column: key 0" in chart.locator(".annotation").first.text_content()
        hover = _hover_sink_cell(page, chart)
        assert "query 1:" in hover and "\u2192 0:" in hover and "weight" in hover, hover
        chart.screenshot(path=str(ARTIFACTS / f"app_{where}_attention_pattern.png"))


def _run_sections(page, manifest: dict, tables: dict) -> None:
    """The charts of a survey on the Runs page, split by measurement in page order."""
    drawn = page.evaluate(CHARTS_JS)
    for name in manifest["options"]:
        metric = METRICS[name]
        own = {t: tables[t] for t in manifest["tables_by_metric"][name]}
        n = len(metric.draw(own)) + len(metric.views_for(own))
        yield name, own, drawn[:n]
        drawn = drawn[n:]
    assert drawn == []


def test_every_page_of_the_tiny_model(browser, app_url, store):
    root, stored, surveys = store
    page = browser.new_page()
    page.goto(app_url)
    page.locator(".st-key-model_choice input").wait_for(timeout=120_000)  # the first run imports torch
    _choose(page, TINY)
    page.locator("[data-testid='stMetric']").first.wait_for(timeout=MODEL_LOAD_SECONDS * 1000)
    ARTIFACTS.mkdir(exist_ok=True)
    _screenshot(page, ARTIFACTS / f"app_{TINY}_overview.png")
    for name, metric in METRICS.items():
        if name == PRESSED:
            _nav(page, name)
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_role("button", name="Run again", exact=True).wait_for(timeout=60_000)
            stored[name] = next(row["run_id"] for row in list_runs(root) if row["metric"] == PRESSED)
        tables = load_run(stored[name], root)[1]
        drawn = _open_page(page, name, len(metric.draw(tables)) + len(metric.views_for(tables)))
        _screenshot(page, ARTIFACTS / f"app_{TINY}_{name}.png")
        assert len(drawn) == len(metric.draw(tables)) + len(metric.views_for(tables)), name
        assert page.get_by_role("button", name="Run again", exact=True).count() == 1
        _check_measurement(page, name, drawn, tables, TINY)
    _run_pages(page, TINY)


def _run_pages(page, model: str) -> None:
    """The Compare and Norm placements pages: drawn whole, with the checks every chart gets."""
    for title, heading in (("Compare", "Compare two runs"), ("Norm placements", "Norm placements")):
        _nav(page, title)
        page.locator("h1", has_text=heading).wait_for(timeout=60_000)
        page.wait_for_function("!document.querySelector('[data-stale=\"true\"]')", timeout=60_000)
        page.wait_for_timeout(1000)
        assert not page.locator("[data-testid='stException']").count(), title
        _screenshot(page, ARTIFACTS / f"app_{model}_{title.lower().replace(' ', '_')}.png")
        _check_common(title, page.evaluate(CHARTS_JS))


def test_every_page_of_smollm2(browser, app_url, store, real_survey):
    root, _, surveys = store
    page = browser.new_page()
    page.goto(app_url)
    page.locator(".st-key-model_choice input").wait_for(timeout=120_000)
    _choose(page, REAL)
    # The card is drawn metric by metric; wait for the layer count, not the first metric.
    page.locator("[data-testid='stMetric']", has_text="30").first.wait_for(timeout=MODEL_LOAD_SECONDS * 1000)
    assert "30" in [m.inner_text().split("\n")[-1] for m in page.locator("[data-testid='stMetric']").all()]
    _screenshot(page, ARTIFACTS / f"app_{REAL}_overview.png")
    for name in METRICS:
        _nav(page, name)
        page.get_by_role("button", name="Run", exact=True).wait_for(timeout=60_000)
        assert f"has not been measured on {REAL}" in page.locator("[data-testid='stAlert']").first.inner_text()
    _nav(page, "Stored runs")
    page.locator(".st-key-open_run input").click()
    page.get_by_role("option", name=re.compile(re.escape(surveys[REAL]))).click()
    manifest, tables = load_run(surveys[REAL], root)
    total = sum(len(METRICS[n].draw({t: tables[t] for t in manifest["tables_by_metric"][n]}))
                + len(METRICS[n].views_for({t: tables[t] for t in manifest["tables_by_metric"][n]}))
                for n in manifest["options"])
    page.wait_for_function(f"[...document.querySelectorAll('.js-plotly-plot')].filter(g => g._fullLayout).length "
                           f">= {total}", timeout=120_000)
    page.wait_for_timeout(500)
    _screenshot(page, ARTIFACTS / f"app_{REAL}_survey.png")
    for name, own, drawn in _run_sections(page, manifest, tables):
        _check_measurement(page, name, drawn, own, REAL)
    _run_pages(page, REAL)


def test_report_opens_with_no_network(browser, tmp_path):
    root = tmp_path / "runs"
    assert main(["analyze", "block-influence", "--model", "tiny-llama", "--corpus", "text:" + SHORT_TEXT * 3,
                 "--runs-dir", str(root), "--format", "json"]) == 0
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
    browser.unroute("**/*")
