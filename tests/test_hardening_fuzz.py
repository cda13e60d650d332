"""Issue 15, "Done means": property-based tests (hypothesis) that random option values on
the command line and random JSON manifests never give a traceback.

The CLI examples run in-process on tiny-llama with a 64-token corpus and --no-save, so
an example whose values all happen to be valid measures in well under a second; the app
and LN-removal examples stop at the point where they would serve or train.
"""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerscope.analysis.report import report_html
from layerscope.analysis.store import MANIFEST, list_runs, load_run, read_manifest, save_run
from layerscope.app import cli
from layerscope.probes.errors import UserError

FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Stopped(Exception):
    """Raised where a command would start serving or training: its checks all passed."""


# ---------------------------------------------------------------- values a user might type

TEXT = st.one_of(
    st.sampled_from(["", " ", "0", "-1", "nan", "inf", "-inf", "1e308", "99999999999999999999", ",", ",,", "1,1",
                     "a,b", "~nosuchuser/x", "~/x.txt", "a\x00b", "x@peri", "../../etc/passwd", "/dev/full",
                     "/proc/self/mem", "stdlib", "text:", "text:hi", "config:/etc/passwd", "tiny-llama@lns",
                     "\ud800", "☃", "-" * 3, "--no-save", "x" * 300]),
    st.text(max_size=12),
)
NUMBER = st.one_of(st.integers(min_value=-10**12, max_value=10**12).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr), TEXT)


def _flags(parser) -> list[tuple[str, object]]:
    """Each option of a parser with what it takes: None for a switch, else its choices or type."""
    out = []
    for action in parser._actions:
        strings = [s for s in action.option_strings if s.startswith("--")]
        if not strings or action.dest in ("help",):
            continue
        takes = None if action.nargs == 0 else (list(action.choices) if action.choices else action.type)
        out.append((strings[0], takes))
    return out


def _subparsers(parser) -> dict:
    return next(a.choices for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")


PARSER = cli.build_parser()
VERBS = _subparsers(PARSER)
ANALYZE = _subparsers(VERBS["analyze"])
RUNS = _subparsers(VERBS["runs"])
# Options that would leave the test's sandbox or slow it down are set by the test instead.
FIXED = {"--runs-dir", "--no-save", "--device", "--device-map", "--threads", "--backend", "--checkpoint-dir",
         "--output", "--allow-dir", "--address"}


@st.composite
def option_values(draw, parser):
    argv = []
    for flag, takes in draw(st.lists(st.sampled_from(_flags(parser)), max_size=4, unique_by=lambda f: f[0])):
        if flag in FIXED:
            continue
        if takes is None:
            argv.append(flag)
        elif isinstance(takes, list):
            argv += [flag, draw(st.one_of(st.sampled_from(takes), TEXT))]
        elif takes in (int, float):
            argv += [flag, draw(NUMBER)]
        else:
            argv += [flag, draw(TEXT)]
    return argv


@st.composite
def command_lines(draw):
    verb = draw(st.sampled_from(["analyze", "analyze", "analyze", "survey", "runs", "report", "models",
                                 "ln-removal", "app"]))
    if verb == "analyze":
        metric = draw(st.sampled_from(sorted(ANALYZE)))
        return ["analyze", metric, *draw(option_values(ANALYZE[metric]))]
    if verb == "runs":
        action = draw(st.sampled_from(sorted(RUNS)))
        run_id = draw(st.one_of(st.just([]), TEXT.map(lambda t: [t])))
        return ["runs", action, *run_id, *draw(option_values(RUNS[action]))]
    if verb == "report":
        return ["report", draw(st.one_of(st.just("latest"), TEXT)), *draw(option_values(VERBS["report"]))]
    return [verb, *draw(option_values(VERBS[verb]))]


SMALL = {"--model": "tiny-llama", "--max-tokens": "64", "--seq-len": "16", "--corpus": "stdlib"}


def _sandboxed(argv: list[str], tmp: Path) -> list[str]:
    """The drawn command with a small default corpus and model (unless the draw set them),
    and every path that would write pointed into the test's folder."""
    verb = argv[0]
    if verb in ("analyze", "survey", "ln-removal"):
        given = set(argv)
        for flag, value in SMALL.items():
            if flag not in given and not (verb == "ln-removal" and flag in ("--max-tokens", "--corpus")):
                argv = [*argv, flag, value]
        argv += ["--runs-dir", str(tmp / "runs")]
        if verb == "survey" and "--metrics" not in given:
            argv += ["--metrics", "residual-stats,massive"]  # the whole survey is tested elsewhere
        if verb != "ln-removal":
            argv.append("--no-save")
        else:
            argv += ["--checkpoint-dir", str(tmp / "ck"), "--output", str(tmp / "model"), "--no-save"]
    elif verb in ("runs", "report", "app"):
        argv += ["--runs-dir", str(tmp / "runs")]
    return argv


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    def serve(*args, **kwargs):
        raise Stopped("would serve")

    def train(*args, **kwargs):
        raise Stopped("would train")

    monkeypatch.setattr(cli.os, "execve", serve)
    monkeypatch.setattr("layerscope.probes.ln_removal.remove_norms", train)
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    save_run({"toy": pd.DataFrame({"x": [1.0]})}, {"metric": "toy", "model": {"model": "m"}}, runs, run_id="toy-run")
    return tmp_path


@FUZZ
@given(argv=command_lines())
def test_random_command_lines_never_give_a_traceback(sandbox, capsys, argv):
    argv = _sandboxed(argv, sandbox)
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except Stopped:
        return
    out, err = capsys.readouterr()
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert err.startswith("layerscope: error: ") and err.count("\n") == 1, (argv, err)
    assert "Traceback" not in err


# ---------------------------------------------------------------- random manifests

JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children,
                                                                               max_size=4)),
    max_leaves=20,
)
FIELDS = ["metric", "status", "tables", "model", "corpus", "options", "timings", "notes", "tables_by_metric",
          "table_sha256", "created", "run_id", "key", "versions", "warnings", "capture_passes"]


@st.composite
def manifests(draw, valid: dict) -> str:
    """The text of a manifest: random JSON, the valid one with fields replaced or removed,
    or the valid one with a field nested up to 100,000 levels deep."""
    kind = draw(st.sampled_from(["random", "mutated", "mutated", "deep"]))
    if kind == "random":
        return json.dumps(draw(JSON))
    if kind == "deep":
        depth = draw(st.integers(min_value=1, max_value=100_000))
        return json.dumps({**valid, "corpus": None}).replace("null", "[" * depth + "]" * depth)
    manifest = dict(valid)
    for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()):
            manifest[name] = draw(JSON)
        else:
            manifest.pop(name, None)
    return json.dumps(manifest)


@pytest.fixture(scope="module")
def valid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    table = pd.DataFrame({"layer": [0, 1], "mean_norm": [1.0, 2.0]})
    path = save_run({"residual_stats": table}, {"metric": "residual-stats", "model": {"model": "m"},
                                                "options": {"residual-stats": {}}}, root)
    return path


@FUZZ
@given(data=st.data())
def test_random_manifests_never_give_a_traceback(valid_run, tmp_path, capsys, data):
    valid = json.loads((valid_run / MANIFEST).read_text())
    manifest = data.draw(manifests(valid))
    root = tmp_path / "runs"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(valid_run, root / "fuzzed")
    (root / "fuzzed" / MANIFEST).write_text(manifest, encoding="utf-8", errors="surrogatepass")

    [row] = list_runs(root)
    assert row["status"] in ("complete", "corrupt", "interrupted")
    json.dumps(row)  # a row prints
    try:
        checked = read_manifest(root / "fuzzed")
    except ValueError:
        assert row["status"] == "corrupt"
    else:
        json.dumps(checked, default=str).encode("utf-8")
    try:
        loaded, tables = load_run("fuzzed", root)
    except UserError:
        pass  # refused in one readable line, as it should be for anything not whole
    else:
        assert row["status"] == "complete"
        document, _ = report_html(loaded, tables)
        assert document.startswith("<!DOCTYPE html>")
    for argv in (["runs", "list"], ["runs", "list", "--format", "json"], ["runs", "show", "fuzzed"],
                 ["report", "latest", "-o", str(tmp_path / "r.html")]):
        code = cli.main([*argv, "--runs-dir", str(root)])
        out, err = capsys.readouterr()
        assert code in (0, 2) and "Traceback" not in err, (argv, err)
        if code == 2:
            assert err.count("\n") == 1, err

