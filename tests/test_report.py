"""The offline HTML report: every figure of a run, plotly inline, nothing fetched."""

import json
from html.parser import HTMLParser

import pytest

from layerscope.analysis.registry import METRICS
from layerscope.analysis.report import report_html
from layerscope.analysis.result import metric_names as run_metric_names
from layerscope.analysis.store import load_run, save_run
from layerscope.app.cli import main
from layerscope.probes.corpus import CorpusSpec, token_windows
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import load_model

TEXT = "text:" + "Each block of a transformer adds a little to the residual stream. " * 4


class _Resources(HTMLParser):
    """Every URL the document itself would load or link; script bodies are not markup."""

    def __init__(self):
        super().__init__()
        self.urls, self.tags, self.plots = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        self.urls += [value for name, value in attrs.items() if name in ("src", "href", "srcset", "data") and value]
        if "plotly-graph-div" in (attrs.get("class") or ""):
            self.plots += 1


def _parse(document: str) -> _Resources:
    parser = _Resources()
    parser.feed(document)
    return parser


@pytest.fixture(scope="module")
def survey_run(tmp_path_factory):
    """`layerscope survey` on tiny-llama over every measurement that runs on it at its defaults."""
    root = tmp_path_factory.mktemp("runs")
    loaded = load_model("tiny-llama")
    windows = token_windows(CorpusSpec(TEXT, 32, 128), loaded.tokenizer, loaded.bos_token_id, loaded.max_context)
    applicable = []
    for name, metric in METRICS.items():
        try:
            metric(loaded, windows)
        except UserError:
            continue
        applicable.append(name)
    assert main(["survey", "--model", "tiny-llama", "--corpus", TEXT, "--seq-len", "32", "--max-tokens", "128",
                 "--runs-dir", str(root), "--format", "json", "--metrics", ",".join(applicable)]) == 0
    [run] = list(root.iterdir())
    return root, run.name, applicable


def test_survey_report_holds_every_figure_and_loads_nothing(survey_run, tmp_path, capsys):
    root, run_id, applicable = survey_run
    capsys.readouterr()
    output = tmp_path / "report.html"
    assert main(["report", "latest", "-o", str(output), "--runs-dir", str(root)]) == 0
    assert f"wrote {output}: report of {run_id}" in capsys.readouterr().out
    manifest, tables = load_run(run_id, root)
    surveyed = run_metric_names(manifest)
    assert manifest["metric"] == "survey" and surveyed == applicable and len(surveyed) >= len(METRICS) // 2
    expected = sum(len(METRICS[name].figures(tables)) + len(METRICS[name].views_for(tables)) for name in surveyed)
    document = output.read_text()
    resources = _parse(document)
    assert resources.plots == expected >= len(surveyed)
    assert resources.urls == [], "the report must load nothing from outside"
    assert "link" not in resources.tags and "iframe" not in resources.tags
    assert document.count("plotly.js v") == 1, "plotly's JavaScript is inline, once"
    for name in surveyed:
        assert f"<h2>{name}</h2>" in document


def test_report_keeps_the_manifest_readable(survey_run):
    root, run_id, _ = survey_run
    manifest, tables = load_run(run_id, root)
    document, _ = report_html({**manifest, "note": "</script><script>alert(1)</script>"}, tables)
    start = document.index("id='layerscope-manifest'>") + len("id='layerscope-manifest'>")
    embedded = json.loads(document[start:document.index("</script>", start)])
    assert embedded["run_id"] == run_id and embedded["note"].startswith("</script>")


def test_a_measurement_missing_from_the_registry_is_named_not_drawn(tmp_path):
    run_id = save_run({}, {"metric": "survey", "options": {"retired-metric": {}}, "model": {"model": "m"}},
                      tmp_path).name
    document, n_figures = report_html(*load_run(run_id, tmp_path))
    assert n_figures == 0 and "<h2>retired-metric</h2>" in document and "not registered" in document
