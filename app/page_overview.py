"""Overview: the model card of the chosen model, and the measurements on offer."""

import pandas as pd
import streamlit as st

from layerscope.analysis.registry import METRICS
from layerscope.app import ui

st.title("layerscope")
st.caption("What does each layer of a transformer do? Pick a model and a text in the sidebar, "
           "then a measurement on the left.")

with ui.user_errors():
    model = ui.chosen_model()
    loaded, _ = ui.cached_model(model, *ui.chosen_placement())
    card = loaded.card()
    st.header(card["model"])
    st.markdown(f"**Weights:** {card['source']}")
    columns = st.columns(5)
    columns[0].metric("family", card["family"])
    columns[1].metric("layers", card["layers"])
    columns[2].metric("d_model", card["d_model"])
    columns[3].metric("heads (KV)", f"{card['heads']} ({card['kv_heads']})")
    parameters = card["parameters"]
    columns[4].metric("parameters", f"{parameters / 1e6:.1f} M" if parameters >= 1e6 else f"{parameters:,}")
    st.markdown(f"**Norm:** {card['norm_kind']}, {card['norm_placement']}-LN · "
                f"**{'causal language model' if card['causal'] else 'encoder'}** · "
                f"weights hash `{loaded.weights_hash[:24]}…`")
    st.dataframe(pd.DataFrame({"field": list(card), "value": [str(v) for v in card.values()]}),
                 hide_index=True, key="model_card")

st.subheader("Measurements")
st.dataframe(pd.DataFrame({"measurement": list(METRICS), "what it shows": [m.summary for m in METRICS.values()]}),
             hide_index=True, key="measurements")
