"""Norm placements side by side: stored runs of several models joined by relative depth
(`layerscope compare` stores one run per model; any survey holding variance,
block-influence and massive works)."""

import streamlit as st

from layerscope.analysis import model_comparison
from layerscope.analysis.report import PLOT_CONFIG
from layerscope.analysis.result import Result
from layerscope.app import ui

st.title("Norm placements side by side")
root = ui.settings().runs_dir
needed = set(model_comparison.COMPARED_METRICS)
runs = [row for row in ui.complete_runs() if needed <= set(row.get("metrics") or [])]
if len(runs) < 2:
    st.info("This view needs two stored runs that measured variance, block-influence and massive, "
            "for example from `layerscope compare --models smollm2-135m,gemma3-270m,minilm-l6`.")
    st.stop()

labels = {row["run_id"]: f"{row['model']} · {row['run_id']}" for row in runs}
chosen = st.multiselect("runs (one per model)", list(labels), default=list(labels)[:3], format_func=labels.get,
                        max_selections=model_comparison.MAX_COMPARED, key="placements_runs")
with ui.user_errors():
    if len(chosen) < 2:
        st.info("Pick at least two runs.")
        st.stop()
    results, placements = {}, {}
    for run_id in chosen:
        manifest, tables = ui.cached_run(root, run_id)
        name = manifest.get("model", {}).get("model") or run_id
        if name in results:
            name = f"{name} ({run_id})"
        results[name] = Result(tables, manifest)
        placements[name] = manifest.get("model", {}).get("norm_placement", "?")
    joined = model_comparison.tables(results, placements)
    for line in model_comparison.summarize(joined["growth_comparison"]):
        st.markdown(f"- {line}")
    st.plotly_chart(model_comparison.figure(joined["depth_comparison"]), config=PLOT_CONFIG, key="placements.figure")
    st.dataframe(joined["growth_comparison"], hide_index=True)
    with st.expander("per layer"):
        st.dataframe(joined["depth_comparison"], hide_index=True)
