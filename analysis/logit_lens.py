"""The logit lens: read each block's output with the model's own final norm and
unembedding, `unembed(final_norm(resid_post[l]))`, and ask how good a prediction it
already is (nostalgebraist 2020, "interpreting GPT: the logit lens").

Per layer: next-token cross-entropy, top-1 accuracy, and KL from the final distribution.
For one window (the first unless chosen), a layer x position grid of each layer's top
token and probability, with its top-5 and the rank of the true next token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from layerscope.analysis.metric import Metric, Tables, View
from layerscope.analysis.plots import integer_axis, quoted_tokens, shown_token
from layerscope.probes.errors import UserError
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.reducers import LogitLens, LogitLensResult
from layerscope.probes.zoo import LoadedModel

GRID_POSITIONS = 64
# Positions the grid shows at once: about 45 px a column on a wide page, so that tokens stay readable.
GRID_SHOWN = 24
TOP_K = 5


@dataclass(frozen=True)
class LogitLensOptions:
    window: int = field(default=0, metadata={
        "help": "which window of the corpus the layer x position grid shows (0 = the first)", "min": 0,
        "max": 1_000_000})


def probe(options: LogitLensOptions, loaded: LoadedModel) -> ProbeSpec:
    return ProbeSpec(reducers=(LogitLens(window=options.window, top_k=TOP_K),))


def logit_lens(captured: Capture, decode, window: int = 0) -> Tables:
    """Two tables: `logit_lens` per layer (CE, top-1 accuracy, KL to final) and `lens_grid`,
    one row per layer and position of the chosen window (at most `GRID_POSITIONS`): the
    input token, the true next token, the lens's top token and probability, its top-k
    tokens and probabilities, and the rank of the true next token (1 = top)."""
    result: LogitLensResult = captured["logit_lens"]
    per_layer = pd.DataFrame({"layer": range(captured.n_layers), "ce": result.ce.tolist(),
                              "top1_accuracy": result.top1_accuracy.tolist(), "kl_to_final": result.kl_to_final.tolist()})
    grid = result.grid
    if grid is None:
        raise UserError(f"the corpus has no window {window}; the logit-lens grid can show windows 0 to "
                        f"{captured.token_ids.shape[0] - 1}")
    inputs = grid.input_ids.tolist()
    rows = []
    for layer in range(captured.n_layers):
        for position in range(min(GRID_POSITIONS, len(inputs) - 1)):
            token = grid.top_token[layer, position].item()
            row = {"layer": layer, "position": position, "input_token": decode([inputs[position]]),
                   "next_token": decode([inputs[position + 1]]), "top_token": decode([token]),
                   "top_prob": grid.top_prob[layer, position].item()}
            if grid.top_k_tokens is not None:
                row.update(window=window, target_rank=int(grid.target_rank[layer, position]),
                           top_k=" ".join(f"{shown_token(decode([t]))} {p:.2f}" for t, p in
                                          zip(grid.top_k_tokens[layer, position].tolist(),
                                              grid.top_k_probs[layer, position].tolist())))
            rows.append(row)
    return {"logit_lens": per_layer, "lens_grid": pd.DataFrame(rows)}


def tables(captured: Capture, loaded: LoadedModel, options: LogitLensOptions) -> Tables:
    return logit_lens(captured, loaded.tokenizer.decode, options.window)


def curve_figure(table: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=table["layer"], y=table["ce"], name="cross-entropy", mode="lines+markers",
                    hovertemplate="layer %{x}<br>CE %{y:.3f} nats<extra></extra>")
    fig.add_scatter(x=table["layer"], y=table["kl_to_final"], name="KL to final", mode="lines+markers",
                    hovertemplate="layer %{x}<br>KL to final %{y:.3f} nats<extra></extra>")
    fig.add_scatter(x=table["layer"], y=table["top1_accuracy"], name="top-1 accuracy", mode="lines+markers",
                    yaxis="y2", hovertemplate="layer %{x}<br>top-1 accuracy %{y:.1%}<extra></extra>")
    # Fixed ticks: left to plotly, an overlaying axis picks ticks that do not line up with
    # the left axis, and in a narrow chart labels them "0", "0".
    fig.update_layout(title="Logit lens by layer", xaxis_title="layer (block output)",
                      yaxis_title="cross-entropy, KL (nats)",
                      yaxis2={"title": "top-1 accuracy", "overlaying": "y", "side": "right", "range": [0, 1.02],
                              "tickmode": "array", "tickvals": [0, 0.2, 0.4, 0.6, 0.8, 1.0],
                              "ticktext": ["0%", "20%", "40%", "60%", "80%", "100%"], "showgrid": False})
    integer_axis(fig, "xaxis", table["layer"])
    return fig


def grid_figure(grid: pd.DataFrame, first_position: int = 0) -> go.Figure:
    """Layer x position grid of the lens's top token, coloured by its probability, for
    `GRID_SHOWN` positions from `first_position`; the hover names the true next token, its
    rank under the lens and the top-k."""
    shown = grid[(grid["position"] >= first_position) & (grid["position"] < first_position + GRID_SHOWN)]
    probs = shown.pivot(index="layer", columns="position", values="top_prob")
    text = shown.pivot(index="layer", columns="position", values="top_token")
    inputs = shown.drop_duplicates("position").set_index("position")
    columns = ["next_token", "target_rank", "top_k"] if "top_k" in shown else ["next_token"]
    hover = np.stack([shown.pivot(index="layer", columns="position", values=c).to_numpy() for c in columns], axis=-1)
    if "top_k" in shown:
        hover[..., 0] = np.vectorize(shown_token)(hover[..., 0])
        template = ("layer %{y}, position %{x}<br>top %{text} p=%{z:.3f}<br>target %{customdata[0]}, rank "
                    "%{customdata[1]}<br>top-5: %{customdata[2]}<extra></extra>")
    else:
        template = "layer %{y}, position %{x}<br>top %{text} p=%{z:.3f}<br>target %{customdata[0]}<extra></extra>"
    window = int(shown["window"].iloc[0]) if "window" in shown else 0
    fig = go.Figure(go.Heatmap(
        z=probs.values, x=[f"{p}: {shown_token(inputs.loc[p, 'input_token'])}" for p in probs.columns], y=probs.index,
        text=text.values, texttemplate="%{text}", textfont={"size": 10}, colorscale="Blues", zmin=0, zmax=1,
        customdata=hover, colorbar={"title": "top-1 p"}, hovertemplate=template))
    n_layers = len(probs.index)
    fig.update_layout(title=f"Logit lens: top token per layer and position (window {window}, positions "
                            f"{int(probs.columns.min())}-{int(probs.columns.max())})",
                      xaxis_title="position: input token", yaxis_title="layer (block output)",
                      height=180 + 24 * n_layers, xaxis={"tickangle": -60, "tickfont": {"size": 11}})
    integer_axis(fig, "yaxis", probs.index)
    return fig


def _grid_controls(tables: Tables) -> dict:
    last = int(tables["lens_grid"]["position"].max())
    starts = list(range(0, last + 1, GRID_SHOWN // 2))
    return {"first_position": (starts, 0)}


GRID_VIEW = View("logit-lens grid at chosen positions", _grid_controls,
                 lambda tables, first_position: grid_figure(tables["lens_grid"], first_position), needs=("lens_grid",))


def summarize(tables: Tables) -> list[str]:
    table = tables["logit_lens"]
    half = table[table["kl_to_final"] < 1.0]
    first = int(half["layer"].min()) if len(half) else None
    tail = f"; KL to final falls below 1 nat at layer {first}" if first is not None else ""
    return [f"logit-lens: CE {table['ce'].iloc[0]:.2f} at layer 0 -> {table['ce'].iloc[-1]:.2f} at the last"
            f"{tail}"]


def _display(tables: Tables) -> Tables:
    return {name: quoted_tokens(table) for name, table in tables.items()}


METRIC = Metric("logit-lens", "logit lens: CE, top-1 and KL to the final layer of each block's output",
                probe=probe, tables=tables, options=LogitLensOptions, figures=lambda t: [curve_figure(t["logit_lens"])],
                views=(GRID_VIEW,), summarize=summarize, display=_display, causal_only=True)
