"""One page per registered measurement: its controls, Run, and the stored run's figures.

The page keys a run by model, corpus and settings, so reopening the same settings shows
the stored run at once instead of measuring again.
"""

from __future__ import annotations

import streamlit as st

from layerscope.analysis.registry import METRICS
from layerscope.analysis.store import find_run
from layerscope.app import ui
from layerscope.app.workbench import measure, measurement_key


def measurement_page(metric_name: str) -> None:
    metric = METRICS[metric_name]
    st.title(metric.name)
    st.caption(metric.summary)
    if metric.about:
        with st.expander("what this measures"):
            st.markdown(metric.about)
    with ui.user_errors():
        with st.expander("options", expanded=bool(metric.option_names)):
            options = ui.option_controls(metric)
        model, corpus, backend = ui.chosen_model(), ui.chosen_corpus(), ui.chosen_backend()
        root = ui.settings().runs_dir
        key = measurement_key(metric, model, corpus, options, backend)
        run_id = find_run(key, root)
        if st.button("Run again" if run_id else "Run", type="secondary" if run_id else "primary",
                     key=f"{metric.name}.run"):
            bar = st.progress(0.0, text=f"loading {model}")
            loaded, lock = ui.cached_model(model)
            with lock:
                measure(metric, loaded, corpus, options, key, ui.settings(), backend,
                        on_stage=lambda fraction, text: bar.progress(fraction, text=text))
            st.rerun()  # draw the page again as it is for a stored run
        if run_id is None:
            st.info(f"{metric.name} has not been measured on {model} with these settings yet: press Run.")
            return
        ui.show_run(root, run_id)
