"""How long the app takes to reopen a stored run's page.

Measures every registered measurement once on a short text (default SmolLM2-135M), then
opens each page again in fresh AppTest sessions, which find the stored run by its key
and draw it without the model.  "cold" clears Streamlit's data cache first (as after a
server restart); "warm" is a later visit.  Exits 1 if a median is 1 s or more.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/app_reopen.py [--model smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

LIMIT_SECONDS = 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ["LAYERSCOPE_RUNS_DIR"] = tempfile.mkdtemp(prefix="layerscope-bench-runs-")

    import streamlit as st
    from streamlit.testing.v1 import AppTest
    from streamlit.util import calc_hash
    from transformers.utils import logging as hf_logging

    # AppTest outside a server logs notices on every session; the table is the output.
    logging.disable(logging.WARNING)
    hf_logging.disable_progress_bar()

    import layerscope.app
    from layerscope.analysis.registry import METRICS

    app_file = Path(layerscope.app.__file__).with_name("streamlit_app.py")

    def session(page: str) -> AppTest:
        at = AppTest.from_file(str(app_file), default_timeout=600)
        at.session_state["model_choice"] = args.model
        at.run()
        # Measurement pages are callables built from the registry, addressed by url-path hash.
        at._page_hash = calc_hash(page)
        return at

    def open_page(page: str) -> tuple[float, AppTest]:
        at = session(page)
        started = time.perf_counter()
        at.run()
        return time.perf_counter() - started, at

    print(f"reopening stored runs of {args.model} (AppTest, {args.repeats} sessions each; limit {LIMIT_SECONDS} s)")
    print(f"{'measurement':<16} {'measure s':>9} {'cold s':>7} {'warm s':>7} {'charts':>6}")
    from harness import Section, Spread

    section = Section("app_reopen", "Reopening a stored run in the app",
                      f"{args.model}; every measurement run once on a short text, then its page opened again in "
                      f"{args.repeats} fresh AppTest sessions: cold after clearing Streamlit's data cache, warm after.")
    slow = []
    worst = 0.0
    for name in METRICS:
        at = session(name)
        at.run()
        started = time.perf_counter()
        at.button(key=f"{name}.run").click().run()
        measure_seconds = time.perf_counter() - started
        if at.exception or at.error:
            print(f"{name:<16} could not run: {[e.value for e in (*at.exception, *at.error)]}")
            slow.append(name)
            continue
        cold, warm = [], []
        for _ in range(args.repeats):
            st.cache_data.clear()
            cold.append(open_page(name)[0])
            seconds, reopened = open_page(name)
            warm.append(seconds)
        assert [b.label for b in reopened.button] == ["Run again"], "the reopened page did not find the stored run"
        cold_median, warm_median = statistics.median(cold), statistics.median(warm)
        worst = max(worst, cold_median, warm_median)
        section.row(f"{name}: cold reopen", Spread.of(cold), measure_seconds=measure_seconds,
                    charts=len(reopened.get("plotly_chart")))
        section.row(f"{name}: warm reopen", Spread.of(warm))
        print(f"{name:<16} {measure_seconds:>9.2f} {cold_median:>7.3f} {warm_median:>7.3f} "
              f"{len(reopened.get('plotly_chart')):>6}")
        if max(cold_median, warm_median) >= LIMIT_SECONDS:
            slow.append(name)
    print("all under the limit" if not slow else f"over the limit or failed: {', '.join(slow)}")
    if slow:
        section.notes.append(f"over the limit or failed: {', '.join(slow)}")
    section.target("slowest median reopen", worst, LIMIT_SECONDS, unit=" s")
    section.save()
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
