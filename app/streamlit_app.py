"""The layerscope app.  Start it with `layerscope app`, or `streamlit run` on this file
(settings then come from LAYERSCOPE_RUNS_DIR and LAYERSCOPE_ALLOWED_DIRS).

The measurement pages are built from the registry, so a newly registered measurement
gets its page without touching the app.
"""

from functools import partial

import streamlit as st

from layerscope.analysis.registry import METRICS
from layerscope.app import ui
from layerscope.app.page_measurement import measurement_page

st.set_page_config(page_title="layerscope", layout="wide")

navigation = st.navigation({
    "Model": [st.Page("page_overview.py", title="Overview", default=True)],
    "Measurements": [st.Page(partial(measurement_page, name), title=name, url_path=name) for name in METRICS],
    "Runs": [st.Page("page_runs.py", title="Stored runs", url_path="runs"),
             st.Page("page_compare.py", title="Compare", url_path="compare"),
             st.Page("page_placements.py", title="Norm placements", url_path="placements")],
}, expanded=True)  # every measurement in view: a folded list hides the later ones behind an extra click
ui.sidebar_inputs()
ui.keep_option_values()
navigation.run()
