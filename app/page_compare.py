"""Compare: the same measurement from two runs, overlaid where the figures allow it
(for example two models, or two norm placements of one model)."""

import streamlit as st

from layerscope.analysis.overlay import can_overlay, overlay
from layerscope.analysis.report import PLOT_CONFIG
from layerscope.app import ui

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
second = columns[1].selectbox("second run", ids, index=1, format_func=labels.get, key="compare_second")

with ui.user_errors():
    first_manifest, _ = ui.cached_run(root, first)
    second_manifest, _ = ui.cached_run(root, second)
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
    if not shared:
        st.warning("These two runs share no measurement: pick two runs of the same measurement.")
