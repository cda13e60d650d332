"""Massive activations (Sun et al. 2024, "Massive Activations in Large Language Models").

Per layer of the residual stream (`resid_post`, the raw block output): the top-k |x| over
distinct (position, dim) pairs with the token that carries each, the median |x|, their
ratio, and a `massive` flag (|x| > 100 and >= 1000x the layer's median).  Per dim, the
layers in which it is massive (persistence).  With `intervene`, the massive entries of the
layer where they first appear are set to zero or to their corpus mean, and the change in
next-token loss is reported: Sun et al. find that zeroing destroys the model and the mean
does not, so the values act as fixed biases.

The median comes from a fixed-bin log histogram (100 bins a decade), so it is exact to
within 1.2%; nothing per token is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from layerscope.analysis.metric import Metric, Tables, View
from layerscope.analysis.plots import integer_axis, quoted_tokens, shown_token
from layerscope.probes.activation_edits import set_large_activations
from layerscope.probes.backends import Point
from layerscope.probes.capture import Capture, ProbeSpec, capture
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.examples import MagnitudeExample, MagnitudeExampleResult
from layerscope.probes.outlier_reducers import MassiveActivations, MassiveResult, NextTokenLoss, ThresholdedMean, mean_loss
from layerscope.probes.zoo import LoadedModel

INTERVENTIONS = ("zero", "mean", "both")
# Each kept entry costs a few numbers per layer; beyond this a table stops being readable.
MAX_TOP_K = 1000


@dataclass(frozen=True)
class MassiveOptions:
    top_k: int = field(default=3, metadata={"min": 1, "max": MAX_TOP_K, "help": "largest |activation|s kept per layer, over distinct (position, dim) pairs"})
    min_value: float = field(default=100.0, metadata={"min": 0.0, "help": "a massive activation's |value| exceeds this"})
    min_ratio: float = field(default=1000.0, metadata={"min": 0.0, "help": "and is at least this many times the layer's median |value|"})
    intervene: str | None = field(default=None, metadata={
        "help": "set the massive activations of the layer where they appear to zero, to their mean, or both, "
                "and report the change in loss", "choices": list(INTERVENTIONS)})

    def __post_init__(self):
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise UserError(f"top_k must be between 1 and {MAX_TOP_K}, got {self.top_k}")
        if not math.isfinite(self.min_value) or self.min_value < 0:
            raise UserError(f"min_value must be a finite number >= 0, got {self.min_value}")
        if not math.isfinite(self.min_ratio) or self.min_ratio <= 0:
            raise UserError(f"min_ratio must be positive, got {self.min_ratio}")
        if self.intervene is not None and self.intervene not in INTERVENTIONS:
            raise UserError(f"intervene must be one of {', '.join(INTERVENTIONS)}, got {self.intervene!r}")


def probe(options: MassiveOptions, loaded: LoadedModel) -> ProbeSpec:
    if options.intervene and not loaded.adapter.causal:
        raise UserError(f"--intervene compares next-token losses; {loaded.spec.name} is an encoder")
    return ProbeSpec((MassiveActivations(k=options.top_k, min_value=options.min_value), MagnitudeExample()))


def _token(decode, token_id: int):
    return decode([token_id]) if decode else token_id


def _tokens(decode, token_ids) -> list:
    """`_token` of each id, each distinct id decoded once."""
    ids = [int(i) for i in token_ids]
    shown = {i: _token(decode, i) for i in set(ids)}
    return [shown[i] for i in ids]


def _is_massive(abs_value, median, min_value: float, min_ratio: float):
    """Whether |x| is massive: over `min_value` and at least `min_ratio` times the median
    (floats, or tensors elementwise)."""
    return (abs_value > min_value) & (abs_value >= min_ratio * median)


@torch.no_grad()
def massive_activations(capture: Capture, min_ratio: float = 1000.0, decode=None) -> pd.DataFrame:
    """One row per (layer, rank): the rank-th largest |x| over distinct (position, dim) pairs,
    its signed `value`, `window`, `position`, `dim` and `token`, the layer's `median_abs`,
    `ratio` = |x| / median, and `massive`."""
    result: MassiveResult = capture["massive"]
    top = result.top
    rows = []
    for layer in range(capture.n_layers):
        median = result.median[layer].item()
        for rank in range(result.k):
            abs_value = top.abs[layer, rank].item()
            if abs_value < 0:
                continue
            window, pos, dim, token = top.at.at(layer, rank)
            rows.append({
                "layer": layer, "rank": rank + 1, "value": top.value[layer, rank].item(),
                "abs_value": abs_value, "window": window, "position": pos, "dim": dim, "token_id": token,
                "token": _token(decode, token), "median_abs": median, "ratio": abs_value / median,
                "massive": _is_massive(abs_value, median, result.min_value, min_ratio),
            })
    return pd.DataFrame(rows)


@torch.no_grad()
def massive_dims(capture: Capture, min_ratio: float = 1000.0, decode=None) -> pd.DataFrame:
    """One row per (layer, dim) whose largest |x| exceeds `min_value`: that `max_abs` with its
    window, position and token, the layer's median, the ratio, the number of tokens above
    `min_value` at position 0 (`over_first`) and elsewhere (`over_rest`), and `massive`."""
    result: MassiveResult = capture["massive"]
    min_value = result.min_value
    layers, dims = torch.nonzero(result.dim_max.abs > min_value, as_tuple=True)
    max_abs = result.dim_max.abs[layers, dims].double()
    median = result.median[layers].double()
    at = result.dim_max.at
    return pd.DataFrame({
        "layer": layers.numpy(), "dim": dims.numpy(), "max_abs": max_abs.numpy(),
        "window": at.window[layers, dims].numpy(), "position": at.position[layers, dims].numpy(),
        "token_id": at.token[layers, dims].numpy(), "token": _tokens(decode, at.token[layers, dims].tolist()),
        "median_abs": median.numpy(), "ratio": (max_abs / median).numpy(),
        "over_first": result.over_first[layers, dims].numpy(), "over_rest": result.over_rest[layers, dims].numpy(),
        "massive": _is_massive(max_abs, median, min_value, min_ratio).numpy(),
    })


def _ranges(layers: list[int]) -> str:
    spans, start = [], layers[0]
    for previous, current in zip(layers, layers[1:] + [None]):
        if current != previous + 1:
            spans.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(spans)


def massive_persistence(dims: pd.DataFrame) -> pd.DataFrame:
    """One row per dim that is massive in some layer: `first_layer`, `last_layer`, `n_layers`,
    `layers` (as ranges such as "11-28"), and the peak |x| with its layer."""
    massive = dims[dims["massive"]]
    rows = []
    for dim, group in massive.groupby("dim"):
        layers = sorted(group["layer"].tolist())
        peak = group.loc[group["max_abs"].idxmax()]
        rows.append({"dim": dim, "first_layer": layers[0], "last_layer": layers[-1], "n_layers": len(layers),
                     "layers": _ranges(layers), "peak_abs": peak["max_abs"], "peak_layer": peak["layer"]})
    columns = ["dim", "first_layer", "last_layer", "n_layers", "layers", "peak_abs", "peak_layer"]
    return pd.DataFrame(rows, columns=columns).sort_values(["first_layer", "dim"], ignore_index=True)


def intervention_target(dims: pd.DataFrame, min_value: float, min_ratio: float) -> tuple[int, list[int], float]:
    """The layer where massive activations first appear, its massive dims, and the |x| from
    which an entry counts as massive there."""
    massive = dims[dims["massive"]]
    if massive.empty:
        raise UserError(f"no massive activation (|x| > {min_value:g} and >= {min_ratio:g}x the median): "
                        "nothing to intervene on")
    layer = int(massive["layer"].min())
    median = massive.loc[massive["layer"] == layer, "median_abs"].iloc[0]
    return layer, sorted(massive.loc[massive["layer"] == layer, "dim"].tolist()), max(min_value, min_ratio * median)


def massive_intervention(loaded: LoadedModel, windows: TokenWindows, dims: pd.DataFrame, options: MassiveOptions,
                         progress: bool = False) -> pd.DataFrame:
    """Next-token loss with the massive entries of their first layer unchanged, set to zero,
    and set to their corpus mean (per dim, over the entries above the threshold)."""
    layer, chosen, threshold = intervention_target(dims, options.min_value, options.min_ratio)
    spec = ProbeSpec((ThresholdedMean(Point("resid_post", layer), tuple(chosen), threshold), NextTokenLoss()))
    clean = capture(loaded, windows, spec, backend="hooks", progress=progress)
    means, entries = clean["thresholded_mean"].mean, int(clean["thresholded_mean"].count.sum())
    clean_loss = clean["loss"].loss
    base = {"layer": layer, "dims": ",".join(map(str, chosen)), "threshold": threshold, "entries": entries}
    rows = [{"intervention": "none", **base, "values": "", "loss": clean_loss, "delta_loss": 0.0}]
    modes = ["zero", "mean"] if options.intervene == "both" else [options.intervene]
    for mode in modes:
        values = torch.zeros_like(means) if mode == "zero" else means
        with set_large_activations(loaded, layer, chosen, threshold, values):
            loss = mean_loss(loaded, windows, progress=progress)
        rows.append({"intervention": mode, **base, "values": ",".join(f"{v:.6g}" for v in values.tolist()),
                     "loss": loss, "delta_loss": loss - clean_loss})
    return pd.DataFrame(rows)


def tables(captured: Capture, loaded: LoadedModel, options: MassiveOptions) -> Tables:
    decode = loaded.tokenizer.decode
    dims = massive_dims(captured, options.min_ratio, decode)
    return {"massive_top": massive_activations(captured, options.min_ratio, decode), "massive_dims": dims,
            "massive_persistence": massive_persistence(dims),
            **magnitude_table(captured["magnitude_example"], decode)}


def magnitude_table(example: MagnitudeExampleResult | None, decode) -> Tables:
    """`massive_example`: |resid_post| of the first window, one row per (layer, position,
    dim) for the dims largest anywhere in it, plus `dim = -1` holding each token's largest
    |value| over every other dim."""
    if example is None:
        return {}
    # [layer position dim], the dims in `example.dims` order and then -1
    values = torch.cat([example.magnitude, example.rest_max[..., None]], dim=-1).double()
    n_layers, n_positions, n_dims = values.shape
    tokens = np.array(_tokens(decode, example.input_ids.tolist()), dtype=object)
    position = np.tile(np.repeat(np.arange(n_positions), n_dims), n_layers)
    return {"massive_example": pd.DataFrame({
        "layer": np.repeat(np.arange(n_layers), n_positions * n_dims), "position": position,
        "token": tokens[position], "dim": np.tile([*example.dims.tolist(), -1], n_layers * n_positions),
        "abs_value": values.flatten().numpy(),
    })}


def replay(loaded: LoadedModel, windows: TokenWindows, options: MassiveOptions, captured: Capture,
           found: Tables, progress: bool = False) -> Tables:
    if not options.intervene:
        return {}
    return {"massive_intervention": massive_intervention(loaded, windows, found["massive_dims"], options, progress)}


def massive_figure(top: pd.DataFrame) -> go.Figure:
    """Top-k |activation| and the median per layer on a log scale, as in Sun et al.'s Figure 1."""
    fig = go.Figure()
    for rank, rows in top.groupby("rank"):
        fig.add_scatter(x=rows["layer"], y=rows["abs_value"], mode="lines+markers", name=f"top {rank}",
                        customdata=np.column_stack([rows["dim"].astype(str), rows["position"].astype(str),
                                                    [shown_token(t) for t in rows["token"]]]),
                        hovertemplate="layer %{x}<br>|x| %{y:.4g}<br>dim %{customdata[0]}, position "
                                      "%{customdata[1]}<br>token %{customdata[2]}<extra></extra>")
    median = top.drop_duplicates("layer")
    fig.add_scatter(x=median["layer"], y=median["median_abs"], mode="lines", name="median", line={"dash": "dot"})
    fig.update_yaxes(type="log", title_text="|activation|")
    fig.update_xaxes(title_text="layer (block output)")
    fig.update_layout(title="Massive activations: largest |x| per layer")
    integer_axis(fig, "xaxis", top["layer"])
    return fig


def persistence_figure(dims: pd.DataFrame) -> go.Figure:
    """Each massive (layer, dim) cell, coloured by log10 max|x|: which dims stay massive over depth."""
    massive = dims[dims["massive"]]
    labels = [f"dim {d}" for d in massive["dim"]]
    order = [f"dim {d}" for d in sorted(massive["dim"].unique())]
    fig = go.Figure(go.Scatter(
        x=massive["layer"], y=labels, mode="markers",
        marker={"size": 14, "symbol": "square", "color": np.log10(massive["max_abs"]), "colorscale": "Viridis",
                "colorbar": {"title": "log10 max|x|"}},
        customdata=np.column_stack([massive["max_abs"].map("{:.4g}".format), massive["position"].astype(str),
                                    [shown_token(t) for t in massive["token"]]]) if len(massive) else None,
        hovertemplate="layer %{x}, %{y}<br>max |x| %{customdata[0]}<br>position %{customdata[1]}, "
                      "token %{customdata[2]}<extra></extra>"))
    if not len(massive):
        fig.add_annotation(text="no (layer, dim) reaches the massive threshold", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5, font={"size": 14})
        fig.update_yaxes(showticklabels=False)
    else:
        fig.update_xaxes(range=[-0.5, dims["layer"].max() + 0.5])
    fig.update_xaxes(title_text="layer (block output)")
    fig.update_yaxes(title_text="residual dim", type="category", categoryorder="array", categoryarray=order)
    fig.update_layout(title="Massive dims by layer" + ("" if len(massive) else ": none found"),
                      height=200 + 36 * max(len(order), 2))
    integer_axis(fig, "xaxis", dims["layer"])
    return fig


def magnitude_figure(example: pd.DataFrame, layer: int) -> go.Figure:
    """Token x dim |activation| of the first window at one layer (Sun et al.'s Figure 1):
    a massive activation is one bright cell, on a few dims of a few tokens."""
    rows = example[example["layer"] == layer]
    grid = rows.pivot(index="position", columns="dim", values="abs_value")
    dims = [d for d in grid.columns if d >= 0] + [-1]
    grid = grid[dims]
    tokens = rows.drop_duplicates("position").set_index("position")["token"]
    y = [f"{p}: {shown_token(tokens[p])}" for p in grid.index]
    x = [f"dim {d}" if d >= 0 else "every other dim (max)" for d in dims]
    fig = go.Figure(go.Heatmap(
        z=np.log10(np.maximum(grid.values, 1e-3)), x=x, y=y, customdata=grid.values, colorscale="Viridis",
        colorbar={"title": "|x|", "tickvals": list(range(-3, 7)), "ticktext": [f"1e{e}" for e in range(-3, 7)]},
        hovertemplate="%{y}<br>%{x}<br>|x| %{customdata:.4g}<extra></extra>"))
    fig.update_layout(title=f"|activation| per token and dim at the output of block {layer} (first window; "
                            f"the {len(dims) - 1} dims largest anywhere in it)",
                      xaxis={"title": "residual dim", "tickangle": -45}, yaxis={"title": "position: token",
                                                                                  "autorange": "reversed",
                                                                                  "tickfont": {"size": 10}},
                      height=max(420, 160 + 16 * len(y)))
    return fig


def _magnitude_controls(tables: Tables) -> dict:
    example = tables["massive_example"]
    dims = tables.get("massive_dims")
    layers = sorted(example["layer"].unique().tolist())
    massive = dims[dims["massive"]] if dims is not None else example.iloc[:0]
    # Where the massive activation appears; without one, the layer of the largest value.
    first = int(massive["layer"].min()) if len(massive) else int(example.loc[example["abs_value"].idxmax(), "layer"])
    return {"layer": (layers, first)}


MAGNITUDE_VIEW = View("token x dim magnitudes at one layer", _magnitude_controls,
                      lambda tables, layer: magnitude_figure(tables["massive_example"], layer),
                      needs=("massive_example",))


def _figures(tables: Tables) -> list[go.Figure]:
    return [massive_figure(tables["massive_top"]), persistence_figure(tables["massive_dims"])]


def _summarize(tables: Tables) -> list[str]:
    dims, top = tables["massive_dims"], tables["massive_top"]
    massive = dims[dims["massive"]]
    if massive.empty:
        peak = top.loc[top["ratio"].idxmax()] if not top.empty else None
        detail = f" (largest ratio {peak['ratio']:.4g}x the median, block {peak['layer']})" if peak is not None else ""
        return [f"massive: no massive activation in the block outputs{detail}"]
    layer = int(massive["layer"].min())
    first = massive[massive["layer"] == layer].sort_values("max_abs", ascending=False)
    carriers = top[(top["layer"] == layer) & top["massive"]]
    positions = ", ".join(f"{p} ({t!r})" for p, t in
                          carriers[["position", "token"]].drop_duplicates("position").itertuples(index=False))
    persistence = tables["massive_persistence"].set_index("dim")
    lines = [f"massive: dims {', '.join(map(str, first['dim']))} of the block output become massive at block {layer} "
             f"(max |x| {first['max_abs'].iloc[0]:.4g} = {first['ratio'].iloc[0]:.4g}x the median "
             f"{first['median_abs'].iloc[0]:.3g}), at position {positions}; dim {first['dim'].iloc[0]} stays massive "
             f"in blocks {persistence.loc[first['dim'].iloc[0], 'layers']}"]
    if "massive_intervention" in tables:
        rows = tables["massive_intervention"].set_index("intervention")
        changes = "; ".join(f"{mode} {rows.loc[mode, 'loss']:.4g} ({rows.loc[mode, 'delta_loss']:+.4g})"
                            for mode in rows.index if mode != "none")
        lines.append(f"massive --intervene at block {layer}: loss {rows.loc['none', 'loss']:.4g} unchanged; {changes}")
    return lines


def _display(tables: Tables) -> Tables:
    # Quoted, because whitespace tokens carry massive values too.
    shown = {"massive_top (per layer, over distinct position and dim)":
                 quoted_tokens(tables["massive_top"].drop(columns=["token_id"])),
             "massive_dims (massive cells only; --format json for every dim above min_value)":
                 quoted_tokens(tables["massive_dims"].query("massive").drop(columns=["token_id", "massive"])),
             "massive_persistence": tables["massive_persistence"]}
    if "massive_intervention" in tables:
        shown["massive_intervention"] = tables["massive_intervention"]
    return shown


METRIC = Metric("massive", "massive activations per layer (Sun et al.): top-k |x|, median, ratio, persistence, "
                "and zero/mean interventions", probe=probe, tables=tables, replay=replay, options=MassiveOptions, figures=_figures,
                views=(MAGNITUDE_VIEW,), summarize=_summarize, display=_display)
