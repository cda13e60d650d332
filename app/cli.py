"""The `layerscope` command line: list models, run measurements, manage runs."""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum, frame) -> None:
    os.write(2, b"layerscope: interrupted\n")
    os._exit(130)


# Ctrl-C before main() runs (the imports below) ends the command with one line, not a
# traceback; main() hands Ctrl-C back to Python.  Only when this is the command itself,
# and not when it was started with Ctrl-C ignored (in the background, under nohup).
if ((__name__ == "__main__" or os.path.basename(sys.argv[0] if sys.argv else "") == "layerscope")
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import MISSING, fields  # noqa: E402
from pathlib import Path  # noqa: E402

from layerscope.probes.errors import UserError  # noqa: E402

EXIT_USER_ERROR = 2
TABLE_ROWS = 40  # rows of a table printed for a person; `--format json` prints them all
TERMINAL_COLUMNS = 100
MAX_QUERY_ROWS = 100_000  # analysis.run_query.MAX_ROWS, without importing pandas for `--help`
RUN_ID_HELP = "a run id (see `layerscope runs list`), or 'latest' for the newest complete run"
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process ended by SIGPIPE


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that gives every option's default.  argparse's ArgumentDefaultsHelpFormatter
    prints "(default: None)" and repeats a default the text already states; here an option
    whose default is a behaviour says so in its own text."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.default is False and action.nargs == 0:
            return f"{text} (default off)"
        if action.default in (None, ""):
            return f"{text} (default: none)"
        return f"{text} (default %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, formatter_class=_HelpWithDefaults, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        raise UserError(message)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"layerscope: warning: {message}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Library warnings drown the one line a user needs; layerscope reports its own, one
    line each (a model's suspect weights, say)."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("always", module=r"layerscope\.")
    warnings.showwarning = _one_line_warning
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "transformer_lens", "nnsight", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # The environment above quiets transformers when it is imported later; importing it
    # here would cost `--help` seconds.  Already imported (main() called from Python), it
    # is told directly.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _add_corpus_args(parser: argparse.ArgumentParser, one_model: bool = True) -> None:
    from layerscope.probes.corpus import CorpusSpec

    defaults = CorpusSpec()
    if one_model:
        parser.add_argument("--model", default="smollm2-135m", help="zoo name, local HF directory or Hub id")
    parser.add_argument("--corpus", default=defaults.source,
                        help="'stdlib', a .txt or .jsonl file, or 'text:...' for literal text")
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per window")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="token budget")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per forward pass")
    parser.add_argument("--backend", default="hooks", choices=["hooks", "transformer_lens", "nnsight"],
                        help="how activations are read: plain torch hooks, TransformerLens or nnsight")
    add_placement_args(parser)
    add_format_arg(parser)
    add_runs_dir_arg(parser)
    parser.add_argument("--no-save", action="store_true", help="print only; do not write a run")


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """Where the model runs: --device, --dtype, --device-map and --threads."""
    parser.add_argument("--device", default="auto",
                        help="auto (the first GPU if any, else cpu), cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights and activations; statistics are summed in float32/float64 whatever this is "
                             "(default auto: the checkpoint's own on a GPU, float32 on the CPU)")
    parser.add_argument("--device-map", default=None, choices=["auto"],
                        help="spread a model too big for one device over every visible device (needs accelerate; "
                             "default off: the whole model on --device)")
    add_threads_arg(parser)
    add_config_limit_arg(parser)


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice)")


def add_format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="table", choices=["table", "json"],
                        help=f"table: for a person, long tables cut to {TABLE_ROWS} rows; json: every row")


def add_runs_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", default="runs", help="run store folder")


MAX_CONFIG_PARAMS_FLAG = "--max-config-params"


def add_config_limit_arg(parser: argparse.ArgumentParser) -> None:
    """The size limit of a model built with random weights from `config:PATH`."""
    parser.add_argument(MAX_CONFIG_PARAMS_FLAG, type=int, default=None, metavar="N",
                        help="most parameters a `config:PATH` model may have (default 500,000,000; "
                             "also $LAYERSCOPE_MAX_CONFIG_PARAMS)")


MAX_CONFIG_PARAMS_ENV = "LAYERSCOPE_MAX_CONFIG_PARAMS"  # zoo.MAX_CONFIG_PARAMS_ENV, without importing torch


@contextlib.contextmanager
def _config_limit(args):
    """The loader, and the app's server process, read the limit from the environment; it
    is set for the length of one command only, so that main() called again (from a
    notebook or a test) does not inherit it."""
    limit = getattr(args, "max_config_params", None)
    if limit is None:
        yield
        return
    if limit < 1:
        raise UserError(f"{MAX_CONFIG_PARAMS_FLAG} must be positive, got {limit}")
    before = os.environ.get(MAX_CONFIG_PARAMS_ENV)
    os.environ[MAX_CONFIG_PARAMS_ENV] = str(limit)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MAX_CONFIG_PARAMS_ENV, None)
        else:
            os.environ[MAX_CONFIG_PARAMS_ENV] = before


def _check_threads(threads: int) -> None:
    if not 1 <= threads <= (os.cpu_count() or 1) * 4:
        raise UserError(f"--threads must be between 1 and {(os.cpu_count() or 1) * 4}, got {threads}")


def set_threads(threads: int | None) -> None:
    if threads is None:
        return
    _check_threads(threads)
    import torch

    torch.set_num_threads(threads)


def _literal(text: str) -> str:
    """argparse formats help with %, so a literal percent sign must be doubled."""
    return text.replace("%", "%%")


def _add_metric_options(parser: argparse.ArgumentParser, options_type: type) -> None:
    for f in fields(options_type):
        flag = "--" + f.name.replace("_", "-")
        help_text = _literal(f.metadata.get("help", ""))
        type_name = str(f.type).split("|")[0].strip()
        if type_name == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(type_name, str)
            default = None if f.default is MISSING else f.default
            parser.add_argument(flag, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text)


# Commands whose arguments come from the registry or the model code, which import torch:
# their parsers are built only when the command line names them, so that `--help`,
# `models` and `runs` start in a fraction of a second.
HEAVY_COMMANDS = {"analyze": "run a measurement", "survey": "run every measurement and print a summary",
                  "compare": "several models side by side by relative depth: norm growth, Block Influence, "
                             "sublayer contributions, massive activations",
                  "ln-removal": "remove every LayerNorm/RMSNorm by fine-tuning (Heimersheim 2024; Baroni et al. 2025)"}


def command_of(argv: list[str]) -> str:
    """The command an argument list names (its first word that is not an option), or ''."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser; with `command` given, the other heavy commands get a
    stand-in parser that only carries their help line."""
    parser = _Parser(prog="layerscope", description="What does each layer of a transformer do?")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    models = sub.add_parser("models", help="list the models the zoo can load")
    add_format_arg(models)

    full = {name for name in HEAVY_COMMANDS if command is None or command == name}
    for name in [name for name in ("analyze", "survey") if name not in full]:
        sub.add_parser(name, help=HEAVY_COMMANDS[name])
    if "analyze" in full:
        from layerscope.analysis.registry import METRICS

        analyze = sub.add_parser("analyze", help=HEAVY_COMMANDS["analyze"])
        metric_sub = analyze.add_subparsers(dest="metric", required=True, parser_class=_Parser)
        for metric in METRICS.values():
            p = metric_sub.add_parser(metric.name, help=_literal(metric.summary), description=_literal(metric.summary))
            _add_corpus_args(p)
            _add_metric_options(p, metric.options)
    if "survey" in full:
        survey = sub.add_parser("survey", help=HEAVY_COMMANDS["survey"])
        _add_corpus_args(survey)
        survey.add_argument("--metrics", help="comma-separated subset (default: every one that applies)")

    if "compare" in full:
        compare = sub.add_parser("compare", help=HEAVY_COMMANDS["compare"])
        compare.add_argument("--models", default=",".join(COMPARED_MODELS),
                             help=f"comma-separated models (default: {','.join(COMPARED_MODELS)})")
        _add_corpus_args(compare, one_model=False)
        compare.add_argument("-o", "--output", help="also write the figure and tables as one HTML page here "
                                                    "(default: none written)")
    else:
        sub.add_parser("compare", help=HEAVY_COMMANDS["compare"])

    runs = sub.add_parser("runs", help="list, show, remove, export or query stored runs")
    # One parser per action, so that options may come before the run id (`rm --force ID`).
    actions = runs.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, action_help in (("list", "every run with its status, corpus, tokens and the options it changed"),
                                ("show", "a run's manifest and tables"),
                                ("rm", "remove a run, or the leftovers of an interrupted one"),
                                ("export", "copy a run out as CSV tables and its manifest"),
                                ("query", "SQL (DuckDB) over the tables of every complete run")):
        parser_ = actions.add_parser(action, help=action_help)
        if action == "query":
            parser_.add_argument("sql", help="one SELECT; each table name (block_influence, residual_stats, ...) "
                                             "is a view over every complete run with run_id, model and corpus "
                                             "columns, and `runs` lists the runs")
            parser_.add_argument("--max-rows", type=int, default=MAX_QUERY_ROWS,
                                 help=f"most rows fetched, 1 to {MAX_QUERY_ROWS}")
        elif action != "list":
            parser_.add_argument("run_id", nargs="?", help=RUN_ID_HELP)
        add_runs_dir_arg(parser_)
        add_format_arg(parser_)
        if action == "export":
            parser_.add_argument("-o", "--output", help="export target folder, new or empty (default RUN_ID-export)")
        if action == "rm":
            parser_.add_argument("--force", action="store_true",
                                 help="remove a run even if it lists as running (its writer's lock or "
                                      "heartbeat says it lives, say on another machine that is gone)")
            parser_.add_argument("-y", "--yes", action="store_true",
                                 help="remove without asking; needed when stdin is not a terminal")

    report = sub.add_parser("report", help="write a self-contained HTML report of a run (opens offline)")
    report.add_argument("run_id", help=RUN_ID_HELP)
    report.add_argument("-o", "--output", help="HTML file to write (default RUN_ID.html)")
    add_runs_dir_arg(report)

    app = sub.add_parser("app", help="start the Streamlit app")
    add_runs_dir_arg(app)
    app.add_argument("--allow-dir", action="append", default=[], metavar="FOLDER",
                     help="a folder whose models and corpus files the app may read; repeatable "
                          "(default: the working directory and the model cache)")
    app.add_argument("--port", type=int, default=8501, help="TCP port, 1 to 65535 (default 8501)")
    app.add_argument("--address", default="127.0.0.1", help="address to serve on (default: this machine only)")
    add_threads_arg(app)
    add_config_limit_arg(app)

    if "ln-removal" in full:
        from layerscope.app.ln_removal_cli import add_ln_removal_parser

        add_ln_removal_parser(sub)
    else:
        sub.add_parser("ln-removal", help=HEAVY_COMMANDS["ln-removal"])
    return parser


def _print_tables(tables: dict, fmt: str, run_path: Path | None, quote_tokens: bool = False) -> None:
    """Tables as JSON (every row), or for a person: each cut to `TABLE_ROWS` rows with a
    pointer to `--format json`.  `quote_tokens` quotes token texts in a table as stored; a
    measurement's `display` tables quote their own."""
    import pandas as pd

    if fmt == "json":
        payload = {name: json.loads(t.to_json(orient="records")) for name, t in tables.items()}
        if run_path:
            payload["run"] = str(run_path)
        print(json.dumps(payload))
        return
    if quote_tokens:
        from layerscope.analysis.plots import quoted_tokens

        tables = {name: quoted_tokens(table) for name, table in tables.items()}
    with pd.option_context("display.max_rows", TABLE_ROWS + 1, "display.width", 200, "display.max_columns", 30,
                           "display.float_format", "{:.4g}".format):
        for name, table in tables.items():
            print(f"\n{name}")
            if table.empty:
                print(f"no rows (columns: {', '.join(map(str, table.columns))})")
                continue
            print(table.head(TABLE_ROWS).to_string(index=False))
            if len(table) > TABLE_ROWS:
                print(f"... {len(table) - TABLE_ROWS} more rows ({len(table)} in all); `--format json` prints every row")
    if run_path:
        print(f"\nsaved run: {run_path}")


def _prepare(args):
    from layerscope.probes.inputs import windows
    from layerscope.probes.zoo import load_model

    set_threads(args.threads)
    started = time.perf_counter()
    from layerscope.probes.distributed import local_device

    loaded = load_model(args.model, device=local_device(args.device), dtype=args.dtype, device_map=args.device_map)
    load_seconds = time.perf_counter() - started
    # Literal text (`text:...`) is measured whole, whatever --seq-len says.
    return loaded, windows(loaded, args.corpus, args.seq_len, args.max_tokens, args.batch_size), load_seconds


def _progress(args) -> bool:
    return (args.format == "table" and sys.stderr.isatty()) or os.environ.get("LAYERSCOPE_PROGRESS") == "1"


def _save_then_show(args, result, show) -> int:
    """Store the run, show the results with where they were stored, and only then report a
    failure to save: one line and a non-zero exit, never the loss of what was computed."""
    run_path, failure = None, None
    if not args.no_save:
        try:
            run_path = result.save(Path(args.runs_dir))
        except (OSError, UserError) as err:
            failure = UserError(f"the results were not saved to {args.runs_dir}: "
                                f"{getattr(err, 'strerror', None) or err}")
    show(run_path)
    if failure:
        raise failure
    return 0


def _measure(args, metrics: list[str] | None, options: dict | None = None):
    from layerscope.analysis.runner import measure

    loaded, windows, load_seconds = _prepare(args)
    result = measure(loaded, windows, metrics, options=options, backend=args.backend, progress=_progress(args))
    if result is not None:
        result.manifest["timings"]["load_seconds"] = load_seconds
    return loaded, windows, result


def cmd_analyze(args) -> int:
    from layerscope.analysis.metric import check_bounds
    from layerscope.analysis.registry import METRICS

    metric = METRICS[args.metric]
    options = metric.options(**{name: getattr(args, name) for name in metric.option_names})
    check_bounds(options)
    _, _, result = _measure(args, [metric.name], {metric.name: options})
    if result is None:  # a rank other than 0 of a data-parallel run: rank 0 reports
        return 0
    tables = result.tables
    shown = tables if args.format == "json" else metric.display(tables)
    return _save_then_show(args, result, lambda run_path: _print_tables(shown, args.format, run_path))


def cmd_survey(args) -> int:
    """Every applicable measurement on one model and corpus, from one capture pass, saved as one run."""
    from layerscope.analysis.runner import resolve_metrics

    chosen = [m.name for m in resolve_metrics(args.metrics)] if args.metrics else None
    loaded, windows, result = _measure(args, chosen)
    if result is None:
        return 0

    def show(run_path: Path | None) -> None:
        if args.format == "json":
            print(json.dumps({"summary": result.summary, "run": str(run_path) if run_path else None,
                              "timings": result.manifest["timings"]}))
            return
        print(f"{loaded.spec.name}: {loaded.source}")
        print(f"corpus {windows.spec.describe()}: {windows.input_ids.shape[0]} windows x {windows.spec.seq_len} tokens")
        for line in result.summary:
            print(f"- {line}")
        if run_path:
            print(f"saved run: {run_path}")

    return _save_then_show(args, result, show)


# The three real models: Pre-LN, Peri-LN and Post-LN.
COMPARED_MODELS = ("smollm2-135m", "gemma3-270m", "minilm-l6")


def cmd_compare(args) -> int:
    """The same measurements on several models, one stored run each, joined by relative depth."""
    from layerscope.analysis import model_comparison

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    most = model_comparison.MAX_COMPARED
    if not 2 <= len(names) <= most or len(set(names)) != len(names):
        raise UserError(f"--models takes 2 to {most} different models, got {args.models!r}")
    results, placements, runs = {}, {}, {}
    for name in names:
        args.model = name
        loaded, _, result = _measure(args, model_comparison.COMPARED_METRICS)
        if result is None:
            return 0
        results[name], placements[name] = result, loaded.adapter.placement
        if not args.no_save:
            runs[name] = result.save(Path(args.runs_dir))
    tables = model_comparison.tables(results, placements)
    summary = model_comparison.summarize(tables["growth_comparison"])
    if args.output:
        from layerscope.analysis.report import figures_page
        from layerscope.probes.files import write_atomic

        page = figures_page("Norm placements side by side", summary,
                            [model_comparison.figure(tables["depth_comparison"])], tables)
        write_atomic(Path(args.output), page)
    if args.format == "json":
        print(json.dumps({"summary": summary, "runs": {k: str(v) for k, v in runs.items()},
                          **{k: v.to_dict(orient="records") for k, v in tables.items()}}, default=str))
        return 0
    for line in summary:
        print(f"- {line}")
    print(tables["growth_comparison"].to_string(index=False))
    for name, path in runs.items():
        print(f"saved run of {name}: {path}")
    return 0


def cmd_models(args) -> int:
    from layerscope.probes.catalogue import list_models

    rows = list_models()
    if args.format == "json":
        print(json.dumps(rows))
    else:
        print("\n".join(_aligned(["model", "kind", "description"],
                                 [[row["model"], row["kind"], row["description"]] for row in rows])))
    return 0


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """Rows as left-aligned columns under a header, two spaces apart, without pandas."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def _cut(text: str, width: int, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text
    return "\u2026" + text[len(text) - width + 1:] if keep_end else text[:width - 1] + "\u2026"


def _runs_table(rows: list[dict]) -> list[str]:
    """`runs list` for a person, within `TERMINAL_COLUMNS`: one line per run (id, status,
    corpus, tokens as windows x tokens per window), then, indented, the options it set
    away from their defaults, or what is wrong with it.  The newest `TABLE_ROWS` runs."""
    shown = rows[-TABLE_ROWS:]
    cells = []
    for row in shown:
        tokens = "-" if row.get("tokens") is None else str(row["tokens"])
        if row.get("windows") and row.get("seq_len"):
            tokens += f" ({row['windows']}x{row['seq_len']})"
        cells.append([row["run_id"], row["status"], row.get("corpus") or "-", tokens])
    header = ["run_id", "status", "corpus", "tokens"]
    fixed = [max(len(cell[i]) for cell in [header, *cells]) for i in (0, 1, 3)]
    corpus_width = max(8, TERMINAL_COLUMNS - sum(fixed) - 6)
    cells = [[c[0], c[1], _cut(c[2], corpus_width, keep_end=True), c[3]] for c in cells]
    aligned = _aligned(header, cells)
    lines = aligned[:1]
    for row, line in zip(shown, aligned[1:]):
        lines.append(line)
        detail = row.get("problem") or (f"options: {row['options']}" if row.get("options") else "")
        if row.get("warnings"):
            detail = f"{detail}; {row['warnings']} warning(s)" if detail else f"{row['warnings']} warning(s)"
        if detail:
            lines.append(_cut(f"    {detail}", TERMINAL_COLUMNS))
    if len(rows) > len(shown):
        lines.append(f"... {len(rows) - len(shown)} older runs left out ({len(rows)} in all); "
                     "`--format json` lists every run")
    return lines


def _confirm_removal(run_id: str, root: Path, yes: bool) -> bool:
    """Ask on the terminal before a run is removed for good; without a terminal, only `--yes` removes."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UserError(f"`runs rm` removes {run_id} for good; add --yes to confirm when stdin is not a terminal")
    print(f"remove run {run_id} from {root} for good? [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = input()
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def cmd_runs(args) -> int:
    from layerscope.analysis.store import (LATEST, export_run, list_runs, removal_targets, remove_run,
                                           resolve_run_id)

    root = Path(args.runs_dir)
    if args.action == "list":
        rows = list_runs(root)
        if args.format == "json":
            print(json.dumps(rows))
        else:
            print("\n".join(_runs_table(rows)) if rows else f"no runs in {root}")
        return 0
    if args.action == "query":
        from layerscope.analysis.run_query import query_runs

        frame, more = query_runs(args.sql, root, args.max_rows)
        _print_tables({"query": frame}, args.format, None, quote_tokens=True)
        if more:
            print(f"layerscope: the query gives more than {args.max_rows} rows; only the first {args.max_rows} "
                  "were fetched (--max-rows)", file=sys.stderr)
        return 0
    if not args.run_id:
        raise UserError(f"`layerscope runs {args.action}` needs a run id (or {LATEST!r})")
    if args.action == "show":
        _, manifest, tables = _load(args.run_id, root)
        if args.format == "json":
            print(json.dumps(manifest, default=str))
        else:
            print(json.dumps(manifest, indent=2, default=str))
            _print_tables(tables, "table", None, quote_tokens=True)
        return 0
    run_id = resolve_run_id(args.run_id, root)
    if args.action == "rm":
        removal_targets(run_id, root, force=args.force)  # a run that cannot be removed is an error, not a question
        if not _confirm_removal(run_id, root, args.yes):
            print(f"kept {run_id}", file=sys.stderr)
            return 1
        for folder in remove_run(run_id, root, force=args.force):
            print(f"removed {folder}")
    elif args.action == "export":
        target = export_run(run_id, Path(args.output or f"{run_id}-export"), root)
        print(f"exported {run_id} to {target}")
    return 0


def _load(run_id: str, root: Path) -> tuple[str, dict, dict]:
    """A run's id, manifest and tables; for "latest", the newest run that can be read, a
    damaged newer one named on stderr and passed over."""
    from layerscope.analysis.store import LATEST, load_latest, load_run

    if run_id != LATEST:
        return (run_id, *load_run(run_id, root))
    run_id, manifest, tables, skipped = load_latest(root)
    for reason in skipped:
        print(f"layerscope: skipped: {reason}", file=sys.stderr)
    return run_id, manifest, tables


def cmd_report(args) -> int:
    from layerscope.analysis.report import save_report

    run_id, manifest, tables = _load(args.run_id, Path(args.runs_dir))
    output = Path(args.output or f"{run_id}.html")
    n_figures = save_report(manifest, tables, output)
    print(f"wrote {output}: report of {run_id}, {n_figures} figures, {output.stat().st_size / 1e6:.1f} MB, opens offline")
    return 0


def cmd_app(args) -> int:
    """Become `streamlit run` on the app file, passing the store and allowed folders in the
    environment; exec rather than a child process, so that stopping this process stops the server."""
    from layerscope.app.workbench import AppSettings, checked_folder, default_allowed_dirs

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    allowed = tuple(checked_folder(folder, "--allow-dir") for folder in args.allow_dir) or default_allowed_dirs()
    missing = [str(folder) for folder in allowed if not folder.is_dir()]
    if args.allow_dir and missing:
        raise UserError(f"--allow-dir folder(s) not found: {', '.join(missing)}")
    settings = AppSettings(Path(args.runs_dir).resolve(), allowed)
    # The server imports torch later; it takes its thread count from the environment.
    threads = {}
    if args.threads is not None:
        _check_threads(args.threads)
        threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    app_file = Path(__file__).with_name("streamlit_app.py")
    command = [sys.executable, "-m", "streamlit", "run", str(app_file), "--server.port", str(args.port),
               "--server.address", args.address, "--server.headless", "true",
               "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    print(f"layerscope app on http://{args.address}:{args.port} (runs in {settings.runs_dir}); Ctrl-C stops it",
          file=sys.stderr)
    sys.stderr.flush()
    os.execve(sys.executable, command, {**os.environ, **settings.to_env(), **threads})


def cmd_ln_removal(args) -> int:
    from layerscope.app.ln_removal_cli import cmd_ln_removal as run

    return run(args)


COMMANDS = {"analyze": cmd_analyze, "survey": cmd_survey, "compare": cmd_compare, "models": cmd_models, "runs": cmd_runs,
            "report": cmd_report, "app": cmd_app, "ln-removal": cmd_ln_removal}


def _stdout_gone() -> None:
    """The reader of stdout left (`layerscope ... | head -1`): send what is still buffered
    nowhere, so that Python's own flush at exit does not fail a second time."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Inside the try: Ctrl-C while the libraries import is still one line, not a traceback.
        _quiet_libraries()
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser(command_of(argv)).parse_args(argv)
        try:
            with _config_limit(args):
                return COMMANDS[args.command](args)
        finally:
            sys.stdout.flush()  # here, so that a reader gone away is caught below, not at exit
    except UserError as err:
        print(f"layerscope: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("layerscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _stdout_gone()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
