"""Streamlit building blocks shared by the pages: the sidebar inputs, cached loading,
controls generated from a measurement's options dataclass, and drawing a stored run."""

from __future__ import annotations

import contextlib
import threading
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Iterator

import pandas as pd
import streamlit as st

from layerscope.analysis.metric import Metric
from layerscope.analysis.registry import DRAWN, METRICS
from layerscope.analysis.report import PLOT_CONFIG, run_figures
from layerscope.analysis.store import list_runs, load_run, newest_first
from layerscope.app.workbench import CORPUS_KINDS, AppSettings, CorpusChoice, checked_model_name, corpus_choice
from layerscope.probes.backends import BACKENDS
from layerscope.probes.corpus import CorpusSpec
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import LoadedModel, known_model_names, load_model

OTHER_MODEL = "other: local folder or Hub id"
# The page ships every shown row to the browser on each rerun, even inside a closed
# expander; the sinks' attention patterns alone reach 10^5 rows.
MAX_SHOWN_ROWS = 5_000
SAMPLE_TEXT = ("The residual stream carries each token through the layers of a transformer. "
               "Some blocks rewrite it, and others barely touch it, so they could be skipped.")


def settings() -> AppSettings:
    return AppSettings.from_env()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show a user's mistake as one readable error instead of a traceback."""
    try:
        yield
    except UserError as err:
        st.error(str(err))


# ---------------------------------------------------------------- sidebar inputs

def _input_defaults() -> dict:
    defaults = CorpusSpec()
    return {"model_choice": known_model_names()[0], "model_path": "", "corpus_kind": "text",
            "corpus_text": SAMPLE_TEXT, "corpus_path": "", "seq_len": defaults.seq_len,
            "max_tokens": defaults.max_tokens, "backend": "hooks", "device": "auto", "dtype": "auto"}


def sidebar_inputs() -> None:
    """Model, corpus and backend, drawn once in the main script so that every page shares them."""
    state = st.session_state
    for key, value in _input_defaults().items():
        # Re-storing keeps the value of an input that is hidden for now (say the text
        # while the stdlib corpus is chosen): Streamlit drops a widget's value while it is not drawn.
        state[key] = state.get(key, value)
    with st.sidebar:
        st.selectbox("model", [*known_model_names(), OTHER_MODEL], key="model_choice")
        if state.model_choice == OTHER_MODEL:
            st.text_input("model folder or Hub id", key="model_path",
                          help="a local HF folder inside the allowed folders, or a Hub id (offline: cached only)")
        st.radio("corpus", CORPUS_KINDS, key="corpus_kind", horizontal=True,
                 format_func={"text": "your text", "stdlib": "stdlib docstrings", "file": "a file"}.get)
        if state.corpus_kind == "text":
            st.text_area("text", key="corpus_text",
                         help=f"measured whole; at most {settings().max_text_chars:,} characters")
        if state.corpus_kind == "file":
            st.text_input("corpus file (.txt or .jsonl with a 'text' field)", key="corpus_path")
        if state.corpus_kind != "text":
            st.number_input("tokens per window", min_value=2, step=16, key="seq_len")
            st.number_input("token budget", min_value=2, step=512, key="max_tokens")
        st.selectbox("capture backend", list(BACKENDS), key="backend")
        st.selectbox("device", ["auto", "cpu", "cuda", "mps"], key="device",
                     help="auto: the first GPU if there is one, else the CPU")
        st.selectbox("dtype", ["auto", "float32", "bfloat16", "float16"], key="dtype",
                     help="auto: the checkpoint's own on a GPU, float32 on the CPU; statistics are summed in "
                          "float32 or float64 whatever this is")


def chosen_model() -> str:
    state = st.session_state
    return checked_model_name(state.model_path if state.model_choice == OTHER_MODEL else state.model_choice,
                              settings())


def chosen_corpus() -> CorpusChoice:
    state = st.session_state
    return corpus_choice(state.corpus_kind, state.corpus_text, state.corpus_path, int(state.seq_len),
                         int(state.max_tokens), settings())


def chosen_backend() -> str:
    return st.session_state.backend


def chosen_placement() -> tuple[str, str]:
    """The device and dtype chosen in the sidebar."""
    return st.session_state.get("device", "auto"), st.session_state.get("dtype", "auto")


# ---------------------------------------------------------------- caching

@st.cache_resource(show_spinner="loading the model")
def cached_model(name: str, device: str = "auto", dtype: str = "auto") -> tuple[LoadedModel, threading.Lock]:
    """One loaded model per name, device and dtype for the whole server, with a lock,
    because measurements hook into the shared module tree and two sessions must not do
    that at once."""
    return load_model(name, device=device, dtype=dtype), threading.Lock()


def _folder_stamp(root: Path, run_id: str) -> tuple:
    folder = Path(root) / run_id
    if not folder.is_dir():
        return ()
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir()))


@st.cache_data(show_spinner=False)
def _load_run(root: str, run_id: str, stamp: tuple) -> tuple[dict, dict[str, pd.DataFrame]]:
    return load_run(run_id, Path(root))


@st.cache_data(show_spinner=False)
def _run_figures(root: str, run_id: str, stamp: tuple) -> list[tuple[str, list, list[str], bool, str | None]]:
    manifest, tables = _load_run(root, run_id, stamp)
    return [(entry.name, entry.figures, entry.findings, entry.metric is not None, entry.problem)
            for entry in run_figures(manifest, tables)]


@st.cache_data(show_spinner=False, max_entries=256)
def _view_figure(root: str, run_id: str, stamp: tuple, metric: str, number: int, chosen: tuple):
    _, tables = _load_run(root, run_id, stamp)
    return DRAWN[metric].views_for(tables)[number].figure(tables, **dict(chosen))


def cached_run(root: Path, run_id: str) -> tuple[dict, dict[str, pd.DataFrame]]:
    """A stored run, cached under its files' sizes and times, so a run damaged or
    rewritten on disk is read again rather than shown from the cache."""
    return _load_run(str(root), run_id, _folder_stamp(root, run_id))


def cached_figures(root: Path, run_id: str) -> list[tuple[str, list, list[str], bool, str | None]]:
    """Each measurement of a run as (name, figures, findings, registered, why it cannot be drawn)."""
    return _run_figures(str(root), run_id, _folder_stamp(root, run_id))


def complete_runs() -> list[dict]:
    """The complete runs of the store, newest first; none, with the reason shown, when it cannot be read."""
    try:
        return newest_first([row for row in list_runs(settings().runs_dir) if row["status"] == "complete"])
    except UserError as err:
        st.error(str(err))
        return []


# ---------------------------------------------------------------- measurement options

def _without_none(hint):
    """`int | None` is an int control that may be left empty (None means 'automatic')."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if len(args) == 1 else hint


def _option_key(metric: Metric, field_name: str) -> str:
    return f"{metric.name}.{field_name}"


def keep_option_values() -> None:
    """Re-store every measurement's options each run, so that returning to a page finds
    the same settings and so the same stored run."""
    state = st.session_state
    for metric in METRICS.values():
        for name in metric.option_names:
            key = _option_key(metric, name)
            if key in state:
                state[key] = state[key]


def _number(value, kind: type, label: str, optional: bool):
    if value is None:
        if optional:
            return None
        raise UserError(f"option '{label}' needs a number")
    return kind(value)


def _bounds(f, kind: type) -> dict:
    """The widget's limits from the field's `min`/`max`, so one click cannot ask for more."""
    return {arg: kind(f.metadata[name]) for arg, name in (("min_value", "min"), ("max_value", "max"))
            if name in f.metadata}


def _option_kinds(metric: Metric):
    """Each field with its widget's type (None for a list of choices) and whether it may be
    left empty, after putting its default into the session state, so that a kept value and
    a default never disagree."""
    hints = typing.get_type_hints(metric.options)
    for f in fields(metric.options):
        st.session_state.setdefault(_option_key(metric, f.name), None if f.default is MISSING else f.default)
        kind = None if f.metadata.get("choices") else _without_none(hints[f.name])
        yield f, kind, type(None) in typing.get_args(hints[f.name])


def chosen_options(metric: Metric):
    """The measurement's options as its controls hold them, read before they are drawn, so
    that the page knows whether a stored run answers them (and folds the controls away)."""
    values = {}
    for f, kind, optional in _option_kinds(metric):
        value = st.session_state[_option_key(metric, f.name)]
        values[f.name] = _number(value, kind, f.name.replace("_", " "), optional) if kind in (int, float) else value
    return metric.options(**values)


def option_controls(metric: Metric) -> None:
    """One widget per field of the measurement's options dataclass; `chosen_options` reads them."""
    for f, kind, optional in _option_kinds(metric):
        key = _option_key(metric, f.name)
        label, help_text = f.name.replace("_", " "), f.metadata.get("help")
        if kind is None:
            st.selectbox(label, f.metadata["choices"], help=help_text, key=key)
        elif kind is bool:
            st.checkbox(label, help=help_text, key=key)
        elif kind is int:
            st.number_input(label, value=None, step=1, help=help_text, key=key, **_bounds(f, int))
        elif kind is float:
            st.number_input(label, value=None, help=help_text, key=key, format="%g", **_bounds(f, float))
        else:
            st.text_input(label, help=help_text, key=key)


# ---------------------------------------------------------------- drawing a run

def run_caption(manifest: dict) -> str:
    model, corpus = manifest.get("model", {}), manifest.get("corpus", {})
    return (f"run `{manifest.get('run_id')}` · {model.get('model')} ({model.get('family')}, "
            f"{model.get('layers')} layers) · corpus {corpus.get('source')}: {corpus.get('tokens')} tokens "
            f"in {corpus.get('windows')} windows · created {manifest.get('created', '?')}")


def show_views(root: Path, run_id: str, name: str, tables: dict[str, pd.DataFrame]) -> None:
    """A measurement's pictures at a chosen point: one select box per control (layer, head,
    position...), starting at the view's default, and the figure there."""
    metric = DRAWN.get(name)
    if metric is None:
        return
    stamp = _folder_stamp(root, run_id)
    for number, view in enumerate(metric.views_for(tables)):
        controls = view.controls(tables)
        columns = st.columns(max(4, len(controls)))
        chosen = {}
        for column, (control, (choices, default)) in zip(columns, controls.items()):
            chosen[control] = column.selectbox(f"{control.replace('_', ' ')} ({view.title})", choices,
                                               index=choices.index(default), key=f"{run_id}.{name}.{control}")
        figure = _view_figure(str(root), run_id, stamp, name, number, tuple(sorted(chosen.items())))
        st.plotly_chart(figure, config=PLOT_CONFIG, key=f"{run_id}.{name}.view{number}")


def own_tables(manifest: dict, name: str, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The tables one measurement of a run made (all of the run's, for a run that does not say)."""
    own = (manifest.get("tables_by_metric") or {}).get(name)
    return {t: tables[t] for t in own if t in tables} if own else tables


def _shown_tables(manifest: dict, name: str, tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The tables one measurement of a run displays, as the CLI prints them; all of its
    tables, undrawn, when its display cannot read them."""
    mine = own_tables(manifest, name, tables)
    metric = DRAWN.get(name)
    if metric is None:
        return mine
    try:
        return metric.display(mine)
    except Exception:  # noqa: BLE001 - a damaged table is shown as it is, undrawn
        return mine


def show_run(root: Path, run_id: str) -> None:
    """Every figure of a stored run, its pictures at a chosen point, its findings, and
    beside them the tables each measurement displays."""
    manifest, tables = cached_run(root, run_id)
    st.caption(run_caption(manifest))
    for note in manifest.get("notes", []):
        st.info(note)
    for name, figures, findings, registered, problem in cached_figures(root, run_id):
        if len(manifest.get("options", {})) > 1:
            st.subheader(name)
        if not registered:
            st.warning(f"{name} is not registered in this version of layerscope; its tables are shown undrawn")
        if problem:
            st.warning(f"{name}: {problem}; its tables are shown undrawn")
        for number, figure in enumerate(figures):
            st.plotly_chart(figure, config=PLOT_CONFIG, key=f"{run_id}.{name}.{number}")
        if not problem:
            show_views(root, run_id, name, tables)
        for line in findings:
            st.markdown(f"- {line}")
        for table_name, table in _shown_tables(manifest, name, tables).items():
            with st.expander(f"table: {table_name} ({len(table):,} rows)"):
                if len(table) > MAX_SHOWN_ROWS:
                    st.caption(f"The first {MAX_SHOWN_ROWS:,} rows. The whole table: "
                               f"`layerscope runs export {run_id} --runs-dir {root}` writes every table as CSV.")
                st.dataframe(table.head(MAX_SHOWN_ROWS), hide_index=True)
