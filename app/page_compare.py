"""Compare: the same measurement from two runs, overlaid where the figures allow it
(for example two models, or two norm placements of one model), and the difference of
their tables: a chosen numeric column, second run minus first, row against matching row."""

import streamlit as st

from layerscope.analysis.overlay import can_overlay, difference, difference_figure, overlay, partner_run
from layerscope.analysis.plots import themed
from layerscope.analysis.report import PLOT_CONFIG
from layerscope.app import ui
from layerscope.probes.errors import UserError

st.title("Compare two runs")
root = ui.settings().runs_dir
runs = ui.complete_runs()
if len(runs) < 2:
    st.info("Comparing needs two complete runs; run a measurement on two models or settings first.")
    st.stop()

labels = {row["run_id"]: f"{row['model']} · {row['metric']} · {row['run_id']}" for row in runs}
ids = list(labels)
columns = st.columns(2)
first = columns[0].selectbox("first run", ids, index=0, format_func=labels.get, key="compare_first")
partner = partner_run(runs, first)
others = [run_id for run_id in ids if run_id != first]
# One choice of second run per first run, so that picking another first run offers its own partner.
second = columns[1].selectbox("second run", others, index=others.index(partner) if partner else 0,
                              format_func=labels.get, key=f"compare_second.{first}")
if partner is None:
    st.info(f"No other run shares a measurement with {labels[first]}: measure one of its measurements on "
            "another model or with other settings to compare.")


def show_difference(name: str, first_run: tuple, second_run: tuple, first_label: str, second_label: str) -> None:
    """The chosen table's chosen column, second run minus first, as a figure and a table;
    each run is its (manifest, tables)."""
    mine, theirs = (ui.own_tables(manifest, name, tables) for manifest, tables in (first_run, second_run))
    shared_tables = [t for t in mine if t in theirs and len(mine[t]) and len(theirs[t])]
    if not shared_tables:
        return
    st.markdown(f"**Difference: {second_label} minus {first_label}**")
    left, right = st.columns(2)
    table = left.selectbox("table", shared_tables, key=f"compare.diff.{name}.table")
    try:
        diff = difference(mine[table], theirs[table])
    except UserError as why:  # two tables that cannot be matched row by row are no mistake of the user's
        st.info(f"{table} cannot be subtracted: {why}")
        return
    column = right.selectbox("column", diff.columns, key=f"compare.diff.{name}.{table}.column")
    title = f"{table}: {column}, {second_label} minus {first_label}"
    st.plotly_chart(themed(difference_figure(diff, column, title)), config=PLOT_CONFIG,
                    key=f"compare.diff.{name}.figure")
    with st.expander(f"difference table: {table} ({len(diff.table)} rows)"):
        st.dataframe(diff.table, hide_index=True, key=f"compare.diff.{name}.rows")

with ui.user_errors():
    first_manifest, first_tables = ui.cached_run(root, first)
    second_manifest, second_tables = ui.cached_run(root, second)
    columns[0].caption(ui.run_caption(first_manifest))
    columns[1].caption(ui.run_caption(second_manifest))
    first_label = first_manifest.get("model", {}).get("model") or "first"
    second_label = second_manifest.get("model", {}).get("model") or "second"
    if first_label == second_label:
        first_label, second_label = "first", "second"
    second_figures = {name: figures for name, figures, *_ in ui.cached_figures(root, second)}
    shared = 0
    for name, figures, *_ in ui.cached_figures(root, first):
        if name not in second_figures:
            continue
        shared += 1
        st.subheader(name)
        for number, (a, b) in enumerate(zip(figures, second_figures[name])):
            if can_overlay(a, b):
                st.plotly_chart(overlay(a, b, first_label, second_label), config=PLOT_CONFIG,
                                key=f"compare.{name}.{number}")
            else:
                left, right = st.columns(2)
                left.plotly_chart(a, config=PLOT_CONFIG, key=f"compare.{name}.{number}.first")
                right.plotly_chart(b, config=PLOT_CONFIG, key=f"compare.{name}.{number}.second")
        show_difference(name, (first_manifest, first_tables), (second_manifest, second_tables), first_label,
                        second_label)
    if not shared:
        st.warning("These two runs share no measurement: pick two runs of the same measurement.")
