"""How long a person waits to see a stored run again in the app, in a real browser.

Stores each measurement of the model on the app's sample text through the app's own
`measure` (keyed as the Run button keys it), starts `layerscope app`, and then, in
headless Chromium, times each measurement's page to its first chart drawn (a plotly SVG):
in an open app, from the Stored runs page by the page's sidebar link (the target), and,
for context, opened by its address in a new tab ("first": the first visit after the
server started; then the median of later ones), which loads the app's scripts again.
The replay measurements (layer-skip, prune-curve) take minutes on SmolLM2 on two cores
and are left out unless `--replays`.  Exits 1 if an in-app median is 1 s or more.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/app_reopen.py [--model smollm2-135m] [--repeats 5] [--replays]
        [--only NAME ...]
"""

from __future__ import annotations

import argparse
import re
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_SECONDS = 1.0
CHROMIUM = "/usr/bin/chromium"
# The first drawn chart that is not one of the last page's, which stay marked stale until replaced.
FIRST_FRESH_CHART_JS = ("[...document.querySelectorAll('.js-plotly-plot')]"
                        ".find(plot => plot.querySelector('.main-svg') && !plot.closest('[data-stale=\"true\"]'))")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--replays", action="store_true", help="also the replay measurements")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these measurements' pages alone")
    args = parser.parse_args()
    logging.disable(logging.WARNING)

    sys.path.insert(0, str(ROOT / "tests"))
    from harness import Section, Spread
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM_FLAGS, start_app, stop_app

    from layerscope.analysis.registry import METRICS
    from layerscope.app.ui import SAMPLE_TEXT
    from layerscope.app.workbench import AppSettings, corpus_choice, measure, measurement_key
    from layerscope.probes.zoo import known_model_names, load_model

    if known_model_names()[0] != args.model:
        raise SystemExit(f"the app opens on {known_model_names()[0]}; a page opened by its address shows that model")
    names = args.only or [n for n, m in METRICS.items() if args.replays or m.kind != "replay"]
    unknown = sorted(set(names) - set(METRICS))
    if unknown:
        raise SystemExit(f"unknown measurements: {', '.join(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="layerscope-bench-reopen-"))
    settings = AppSettings(work / "runs", (work,))
    corpus = corpus_choice("text", SAMPLE_TEXT, "", 0, 0, settings)
    loaded = load_model(args.model)
    measure_seconds = {}
    for name in names:
        metric = METRICS[name]
        started = time.perf_counter()
        measure(metric, loaded, corpus, metric.options(), measurement_key(metric, args.model, corpus, metric.options(),
                                                                           "hooks"), settings)
        measure_seconds[name] = time.perf_counter() - started
    del loaded

    section = Section("app_reopen", "Reopening a stored run in the app (real browser)",
                      f"{args.model}, the app's sample text; each measurement's page opened by its address in "
                      f"headless Chromium, timed from the request to the first chart drawn: cold is the first "
                      f"visit after the server started, warm the median of {args.repeats} later visits in new tabs.")
    print(f"reopening stored runs of {args.model} in Chromium ({args.repeats} warm visits each; "
          f"limit {LIMIT_SECONDS} s)")
    print(f"{'measurement':<16} {'measure s':>9} {'tab 1st':>7} {'tab s':>7} {'click s':>7} {'whole s':>7}  first chart")
    server, url = start_app(settings.runs_dir, work / "app.log")
    slow, worst, tab_worst = [], 0.0, 0.0
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            warm_up = context.new_page()
            warm_up.goto(url)  # the app's own scripts in the browser's cache, as for any returning visitor
            warm_up.locator("[data-testid='stSidebarNavLink']").first.wait_for(timeout=240_000)
            warm_up.close()

            session = context.new_page()
            session.goto(f"{url}/runs")
            session.locator("[data-testid='stSidebarNavLink']").first.wait_for(timeout=240_000)

            def click_link(title: str) -> None:
                session.locator("[data-testid='stSidebarNavLink']", has_text=re.compile(f"^{re.escape(title)}$")).click()

            def settled(title: str) -> None:
                # Streamlit greys the last page's elements ("stale") until the new ones replace them.
                session.locator("h1", has_text=re.compile(f"^{re.escape(title)}")).wait_for(timeout=60_000)
                session.wait_for_function("!document.querySelector('[data-stale=\"true\"]')", timeout=60_000)

            def navigate(name: str) -> tuple[float, float, str]:
                """In an open app, from the Stored runs page to `name`'s page by its sidebar link:
                what a person does between runs, without reloading the app's scripts.  The
                seconds to the new page's first chart drawn (the last page's elements stay,
                marked stale, until the new page's replace them), the seconds until the page
                is drawn whole, and the first chart's title."""
                click_link("Stored runs")
                settled("Runs")
                started = time.perf_counter()
                click_link(name)
                session.locator("h1", has_text=re.compile(f"^{re.escape(name)}")).wait_for(timeout=60_000)
                session.wait_for_function(f"!!({FIRST_FRESH_CHART_JS})", timeout=240_000)
                first = time.perf_counter() - started
                title = session.evaluate(f"({FIRST_FRESH_CHART_JS})?.querySelector('.gtitle')?.textContent || ''")
                settled(name)
                return first, time.perf_counter() - started, title

            def visit(name: str) -> float:
                page = context.new_page()
                started = time.perf_counter()
                page.goto(f"{url}/{name}", wait_until="commit")
                page.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=240_000)
                seconds = time.perf_counter() - started
                page.close()
                return seconds

            for name in names:
                cold = visit(name)
                warm = [visit(name) for _ in range(args.repeats)]
                clicks, whole, titles = zip(*(navigate(name) for _ in range(args.repeats)))
                median, in_app = statistics.median(warm), statistics.median(clicks)
                worst = max(worst, in_app)
                tab_worst = max(tab_worst, cold, median)
                section.row(f"{name}: first visit in a new tab", measure_seconds=measure_seconds[name], seconds=None,
                            cold=cold)
                section.row(f"{name}: later visits in a new tab", Spread.of(warm))
                section.row(f"{name}: from the Runs page by its sidebar link, to the first chart", Spread.of(clicks),
                            first_chart=titles[0])
                section.row(f"{name}: the same, until the page is drawn whole", Spread.of(list(whole)))
                print(f"{name:<16} {measure_seconds[name]:>9.2f} {cold:>7.3f} {median:>7.3f} {in_app:>7.3f} "
                      f"{statistics.median(whole):>7.3f}  {titles[0]!r}", flush=True)
                if in_app >= LIMIT_SECONDS:
                    slow.append(name)
            browser.close()
    finally:
        stop_app(server)
    left_out = [n for n in METRICS if n not in names]
    if args.only:
        section.notes.append(f"only these pages were opened: {', '.join(names)}")
    elif left_out:
        section.notes.append(f"left out (replays, minutes on {args.model}): {', '.join(left_out)}")
    if slow:
        section.notes.append(f"over the limit: {', '.join(slow)}")
    print("all under the limit" if not slow else f"over the limit: {', '.join(slow)}")
    section.notes.append(f"a new tab loads and compiles the app's scripts again (Streamlit's frontend and "
                         f"plotly.js) before any chart: slowest median {tab_worst:.2f} s there")
    section.target("slowest median reopen in an open app, to the first chart", worst, LIMIT_SECONDS, unit=" s")
    section.save()
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
