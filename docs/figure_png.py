"""Draw one figure of a stored run as a PNG in headless Chromium (the README's pictures).

    HF_HUB_OFFLINE=1 .venv/bin/python docs/figure_png.py RUN_ID_OR_PATH INDEX OUT.png [--runs-dir runs]
        [--width 1100] [--height 650]

INDEX is the figure's place in `Result.figures()` (0 for the first); a wrong index lists
the titles there are.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("index", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=650)
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from layerscope.analysis.result import Result

    figures = Result.load(args.run, runs_dir=args.runs_dir).figures()
    if not 0 <= args.index < len(figures):
        titles = [f"{i}: {f.layout.title.text}" for i, f in enumerate(figures)]
        print(f"no figure {args.index}; the run has:\n  " + "\n  ".join(titles), file=sys.stderr)
        return 2
    figure = figures[args.index]
    figure.update_layout(width=args.width, height=args.height)
    with tempfile.TemporaryDirectory() as folder:
        page_file = Path(folder) / "figure.html"
        page_file.write_text(figure.to_html(full_html=True, include_plotlyjs=True), encoding="utf-8")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": args.width + 40, "height": args.height + 40})
            page.goto(page_file.as_uri())
            page.wait_for_selector(".main-svg")
            page.locator(".plotly-graph-div").screenshot(path=str(args.out))
            browser.close()
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
