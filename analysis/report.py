"""The offline HTML report of a run: its provenance, findings and every figure.

Plotly's JavaScript is written inline once, so the file opens with no network.  The
figures come from the registry: each measurement in the run draws its own tables.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

from layerscope.analysis.metric import Metric, Tables
from layerscope.analysis.registry import DRAWN
from layerscope.analysis.result import metric_names
from layerscope.analysis.store import DEFAULT_ROOT, load_run
from layerscope.probes.errors import UserError
from layerscope.probes.files import write_atomic

# The modebar logo is a link to an outside site; an offline report has no use for it.
PLOT_CONFIG = {"displaylogo": False, "responsive": True}


@dataclass
class MetricFigures:
    """One measurement of a run with its figures; `metric` is None when it is not registered."""

    name: str
    metric: Metric | None
    figures: list[go.Figure] = field(default_factory=list)
    # The measurement's pictures at a chosen point, drawn here at their defaults.
    views: list[tuple[object, go.Figure]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    # Why the tables could not be drawn (a table missing, empty or of another shape), if so.
    problem: str | None = None


def run_figures(manifest: dict, tables: Tables) -> list[MetricFigures]:
    """Each measurement of a run with its figures and findings.  A measurement whose
    tables cannot be drawn (damaged, empty, or another measurement's) is kept with the
    reason, so one bad table never hides the rest of the run."""
    out = []
    for name in metric_names(manifest):
        metric = DRAWN.get(name)
        if metric is None:
            out.append(MetricFigures(name, None))
            continue
        try:
            views = [(view, view.figure(tables)) for view in metric.views_for(tables)]
            out.append(MetricFigures(name, metric, metric.draw(tables), views, list(metric.summarize(tables))))
        except Exception as err:  # noqa: BLE001 - drawing code meets whatever a damaged table holds
            reason = str(err).splitlines()[0] if str(err) else ""
            out.append(MetricFigures(name, metric, problem=f"its tables cannot be drawn "
                                                           f"({type(err).__name__}{': ' + reason if reason else ''})"))
    return out


def _definition_list(items: dict) -> str:
    rows = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items())
    return f"<dl>{rows}</dl>"


def _section(entry: MetricFigures, options: dict, first_figure: bool) -> tuple[str, bool]:
    parts = [f"<section><h2>{html.escape(entry.name)}</h2>"]
    if entry.metric is None:
        parts.append("<p class='missing'>This measurement is not registered in this version of layerscope, "
                     "so its tables are kept but not drawn.</p></section>")
        return "".join(parts), first_figure
    parts.append(f"<p>{html.escape(entry.metric.summary)}</p>")
    if entry.problem:
        parts.append(f"<p class='missing'>{html.escape(entry.problem)}</p>")
    if options:
        parts.append(f"<h3>options</h3>{_definition_list(options)}")
    if entry.findings:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in entry.findings) + "</ul>")
    for figure in [*entry.figures, *(figure for _, figure in entry.views)]:
        parts.append(figure.to_html(full_html=False, include_plotlyjs=first_figure, config=PLOT_CONFIG))
        first_figure = False
    parts.append("</section>")
    return "".join(parts), first_figure


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; font-family: monospace; }
section { border-top: 1px solid #ccc; margin-top: 2em; }
.missing { color: #a40; }
"""


def _script_safe_json(value) -> str:
    # Inside <script> only "</" can end the element early; JSON reads "<\/" as the same text.
    return json.dumps(value, default=str).replace("</", "<\\/")


def report_html(manifest: dict, tables: Tables) -> tuple[str, int]:
    """The report as one self-contained HTML document, and how many figures it holds."""
    entries = run_figures(manifest, tables)
    model = manifest.get("model", {})
    corpus = manifest.get("corpus", {})
    run_id = manifest.get("run_id", "run")
    head = [
        f"<h1>layerscope run {html.escape(run_id)}</h1>",
        f"<p>Created {html.escape(str(manifest.get('created', 'at an unrecorded time')))}; "
        f"backend {html.escape(str(manifest.get('backend', 'unrecorded')))}.</p>",
        "<h2>model</h2>", _definition_list(model),
        "<h2>corpus</h2>", _definition_list(corpus),
        "<h2>timings (s)</h2>", _definition_list({k: f"{v:.3g}" if isinstance(v, float) else v
                                                  for k, v in manifest.get("timings", {}).items()}),
        "<h2>versions</h2>", _definition_list(manifest.get("versions", {})),
    ]
    body, first_figure = [], True
    for entry in entries:
        section, first_figure = _section(entry, (manifest.get("options") or {}).get(entry.name, {}), first_figure)
        body.append(section)
    n_figures = sum(len(entry.figures) + len(entry.views) for entry in entries)
    document = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                f"<title>layerscope {html.escape(run_id)}</title><style>{STYLE}</style>"
                f"<script type='application/json' id='layerscope-manifest'>"
                f"{_script_safe_json(manifest)}</script></head>"
                f"<body>{''.join(head)}{''.join(body)}</body></html>")
    return document, n_figures


def save_report(manifest: dict, tables: Tables, output: Path | str) -> int:
    """Write the report of a loaded run to the file `output`, atomically; returns the
    number of figures.  A folder, a device or an unwritable place is one readable error."""
    output = Path(output)
    if output.is_dir():
        raise UserError(f"report output {output} is a folder; give a file name such as {output / 'report.html'}")
    if output.exists() and not output.is_file():
        raise UserError(f"report output {output} is not a regular file")
    document, n_figures = report_html(manifest, tables)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, document)
    except OSError as err:
        raise UserError(f"could not write the report to {output}: {err.strerror or err}") from None
    return n_figures


def write_report(run_id: str, output: Path | str, root: Path | str = DEFAULT_ROOT) -> int:
    """Write the report of a stored run to `output`; returns the number of figures."""
    manifest, tables = load_run(run_id, root)
    return save_report(manifest, tables, output)


def figures_page(title: str, findings: list[str], figures: list[go.Figure], tables: Tables) -> str:
    """A self-contained HTML page of findings, figures and tables that belong to no one run
    (a comparison of several models)."""
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in findings) + "</ul>"]
    parts += [figure.to_html(full_html=False, include_plotlyjs=i == 0, config=PLOT_CONFIG)
              for i, figure in enumerate(figures)]
    parts += [f"<section><h2>{html.escape(name)}</h2>{table.to_html(index=False, float_format='{:.4g}'.format)}"
              "</section>" for name, table in tables.items()]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
