"""Runs: every stored run with its status; open one to see its figures, download its
report, or remove it."""

import pandas as pd
import streamlit as st

from layerscope.analysis.report import report_html
from layerscope.analysis.store import list_runs, load_run, remove_run
from layerscope.app import ui
from layerscope.probes.errors import UserError

st.title("Runs")
root = ui.settings().runs_dir
st.caption(f"stored in `{root}`")
try:
    runs = list_runs(root)
except UserError as err:
    st.error(str(err))
    st.stop()
if not runs:
    st.info("No runs yet: run a measurement, or `layerscope analyze` / `layerscope survey` with this folder.")
    st.stop()
st.dataframe(pd.DataFrame(runs).drop(columns=["key", "path"], errors="ignore"), hide_index=True, key="runs")

labels = {row["run_id"]: f"{row['run_id']} ({row['status']})" for row in runs}
run_id = st.selectbox("open a run", list(labels), format_func=labels.get, key="open_run")
with ui.user_errors():
    ui.show_run(root, run_id)
    st.download_button("Download the HTML report", data=lambda: report_html(*load_run(run_id, root))[0],
                       file_name=f"{run_id}.html", mime="text/html", key="download_report")
if st.button(f"Remove {run_id}", key="remove_run"):
    with ui.user_errors():
        remove_run(run_id, root)
        st.rerun()
