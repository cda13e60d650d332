"""One page per registered measurement: its controls, Run, and the stored run's figures.

The page keys a run by model, corpus and settings, so reopening the same settings shows
the stored run at once instead of measuring again.  Once a run is shown its options fold
away, so that the figures come first.
"""

from __future__ import annotations

import streamlit as st

from layerscope.analysis.registry import METRICS
from layerscope.analysis.store import runs_with_key
from layerscope.app import ui
from layerscope.app.workbench import measure, measurement_key
from layerscope.probes.errors import UserError


def measurement_page(metric_name: str) -> None:
    metric = METRICS[metric_name]
    root = ui.settings().runs_dir
    st.title(metric.name)
    st.caption(metric.summary)
    if metric.about:
        with st.expander("what this measures"):
            st.markdown(metric.about)
    with ui.user_errors():
        try:
            options = ui.chosen_options(metric)
            model, corpus, backend = ui.chosen_model(), ui.chosen_corpus(), ui.chosen_backend()
            placement = ui.chosen_placement()
            key = measurement_key(metric, model, corpus, options, backend, placement)
            stored = runs_with_key(key, root)
        except UserError:
            # The options stay in view, so that the one at fault can be put right.
            with st.expander("options", expanded=True):
                ui.option_controls(metric)
            raise
        run_id = next((row["run_id"] for row in stored if row["status"] == "complete"), None)
        damaged = None if run_id else next((row for row in stored if row["status"] == "corrupt"), None)
        with st.expander("options", expanded=bool(metric.option_names) and run_id is None):
            ui.option_controls(metric)
        if st.button("Run again" if run_id or damaged else "Run", type="secondary" if run_id else "primary",
                     key=f"{metric.name}.run"):
            bar = st.progress(0.0, text=f"loading {model}")
            loaded, lock = ui.cached_model(model, *placement)
            with lock:
                measure(metric, loaded, corpus, options, key, ui.settings(), backend,
                        on_stage=lambda fraction, text: bar.progress(fraction, text=text))
            st.rerun()  # draw the page again as it is for a stored run
        if damaged is not None:
            st.error(f"the stored run {damaged['run_id']} of these settings is corrupt ({damaged['problem']}): "
                     "press Run again to measure anew, or remove it on the Runs page")
            return
        if run_id is None:
            st.info(f"{metric.name} has not been measured on {model} with these settings yet: press Run.")
            return
        ui.show_run(root, run_id)
