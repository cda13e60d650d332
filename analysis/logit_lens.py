"""The logit lens: read each block's output with the model's own final norm and
unembedding, `unembed(final_norm(resid_post[l]))`, and ask how good a prediction it
already is (nostalgebraist 2020, "interpreting GPT: the logit lens").

Per layer: next-token cross-entropy, top-1 accuracy, and KL from the final distribution.
For the first window, a layer x position grid of each layer's top token and probability.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from layerscope.analysis.metric import Metric, NoOptions, Tables
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.reducers import LogitLens, LogitLensResult
from layerscope.probes.zoo import LoadedModel

PROBE = ProbeSpec(reducers=(LogitLens(),))
GRID_POSITIONS = 32


def logit_lens(captured: Capture, decode) -> Tables:
    result: LogitLensResult = captured["logit_lens"]
    per_layer = pd.DataFrame({"layer": range(captured.n_layers), "ce": result.ce.tolist(),
                              "top1_accuracy": result.top1_accuracy.tolist(), "kl_to_final": result.kl_to_final.tolist()})
    grid = result.grid
    inputs = grid.input_ids.tolist()
    rows = []
    for layer in range(captured.n_layers):
        for position in range(min(GRID_POSITIONS, len(inputs) - 1)):
            token = grid.top_token[layer, position].item()
            rows.append({"layer": layer, "position": position, "input_token": decode([inputs[position]]),
                         "next_token": decode([inputs[position + 1]]), "top_token": decode([token]),
                         "top_prob": grid.top_prob[layer, position].item()})
    return {"logit_lens": per_layer, "lens_grid": pd.DataFrame(rows)}


def tables(captured: Capture, loaded: LoadedModel, options: NoOptions) -> Tables:
    return logit_lens(captured, loaded.tokenizer.decode)


def curve_figure(table: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=table["layer"], y=table["ce"], name="cross-entropy", mode="lines+markers")
    fig.add_scatter(x=table["layer"], y=table["kl_to_final"], name="KL to final", mode="lines+markers")
    fig.add_scatter(x=table["layer"], y=table["top1_accuracy"], name="top-1 accuracy", mode="lines+markers",
                    yaxis="y2")
    fig.update_layout(title="Logit lens by layer", xaxis_title="layer", yaxis_title="nats",
                      yaxis2={"title": "top-1 accuracy", "overlaying": "y", "side": "right", "range": [0, 1]})
    return fig


def grid_figure(grid: pd.DataFrame) -> go.Figure:
    """Layer x position grid of the lens's top token, coloured by its probability."""
    probs = grid.pivot(index="layer", columns="position", values="top_prob")
    text = grid.pivot(index="layer", columns="position", values="top_token")
    inputs = grid.drop_duplicates("position").set_index("position")["input_token"]
    fig = go.Figure(go.Heatmap(z=probs.values, x=[f"{p}:{inputs[p]!r}" for p in probs.columns], y=probs.index,
                               text=text.values, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="layer %{y}, input %{x}<br>top %{text} p=%{z:.3f}<extra></extra>"))
    fig.update_layout(title="Logit lens: top token per layer and position (first window)",
                      xaxis_title="position: input token", yaxis_title="layer")
    return fig


def summarize(tables: Tables) -> list[str]:
    table = tables["logit_lens"]
    half = table[table["kl_to_final"] < 1.0]
    first = int(half["layer"].min()) if len(half) else None
    tail = f"; KL to final falls below 1 nat at layer {first}" if first is not None else ""
    return [f"logit-lens: CE {table['ce'].iloc[0]:.2f} at layer 0 -> {table['ce'].iloc[-1]:.2f} at the last"
            f"{tail}"]


METRIC = Metric("logit-lens", "logit lens: CE, top-1 and KL to the final layer of each block's output",
                probe=lambda options, loaded: PROBE, tables=tables, figures=lambda t: [curve_figure(t["logit_lens"]), grid_figure(t["lens_grid"])],
                summarize=summarize, causal_only=True)
