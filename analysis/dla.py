"""Direct logit attribution (DLA): how much of a token's logit each component writes
directly, through the final norm and the unembedding.

The components are the embedding (with position embeddings, where the family has them)
and each attention and MLP output; `bias` is the constant `W_U[t] . b_norm + b_U[t]`.
The final norm's per-token scale is held at its value on the actual forward, so the
terms always add up to the logit; the gap to the model's own logit is reported.

On a norm-free model (Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning";
Baroni et al. 2025, "Transformers Don't Need LayerNorm at Inference Time") each term is
also the component's exact direct effect: removing it from the final residual changes the
logit by exactly that much.  On a model with a real final norm the scale moves when a
component is removed, so a term is only an approximation of the direct effect;
`mean_abs_dla_minus_direct` and `direct_sum_gap` measure by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from layerscope.analysis.metric import Metric, Tables, View
from layerscope.analysis.plots import COMPONENT_COLOURS, quoted_tokens, shown_token
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.direct_logit import DirectLogitAttribution, DLAResult
from layerscope.probes.zoo import LoadedModel


@dataclass(frozen=True)
class DLAOptions:
    token: str = field(default="next", metadata={
        "help": "whose logit: 'next' (the true next token), 'top' (the model's top-1), a token's text, or 'id:N'"})


def _label(component: str, layer) -> str:
    return component if pd.isna(layer) else f"{component} {int(layer)}"


@torch.no_grad()
def dla(capture: Capture, decode=None) -> Tables:
    """Three tables from a DLA capture.

    - `dla`: one row per component: mean attribution `value` over scored tokens, `mean_abs`,
      the mean `direct_effect`, and `mean_abs_dla_minus_direct`.
    - `dla_check`: scored `tokens`, `mean_logit`, `mean_dla_sum`, `mean_abs_gap` and
      `max_abs_gap` (sum of terms minus the model's logit), `direct_sum_gap` (mean |sum of
      direct effects - logit|), `max_residual_gap` (|sum of components - final residual|),
      whether the model is `norm_free`, and the final norm's kind.
    - `dla_tokens`: the first window, one row per (position, component).
    """
    result: DLAResult = capture["dla"]
    check, sums = result.check, result.sums
    n = max(check.tokens, 1.0)
    rows = []
    for i, (component, layer) in enumerate(result.components):
        rows.append({"component": component, "layer": layer, "value": sums.dla[i].item() / n,
                     "mean_abs": sums.abs_dla[i].item() / n, "direct_effect": sums.direct_effect[i].item() / n,
                     "mean_abs_dla_minus_direct": sums.abs_dla_minus_direct[i].item() / n})
    table = pd.DataFrame(rows).astype({"layer": "Int64"})
    summary = pd.DataFrame([{
        "token": result.token, "tokens": int(check.tokens), "mean_logit": check.logit / n,
        "mean_dla_sum": check.dla_sum / n, "mean_abs_gap": check.abs_gap / n,
        "max_abs_gap": check.max_abs_gap, "direct_sum_gap": check.abs_direct_sum_gap / n,
        "max_residual_gap": check.max_residual_gap, "norm_free": result.norm_free,
        "final_norm": result.final_norm_kind,
    }])
    example = result.example
    token_rows = []
    if example is not None:
        ids, targets = example.input_ids.tolist(), example.target.tolist()
        for pos in range(len(ids)):
            if not example.valid[pos]:
                continue
            token, target = (decode([ids[pos]]), decode([targets[pos]])) if decode else (ids[pos], targets[pos])
            logit = example.logit[pos].item()
            for (component, layer), value in zip(result.components, example.terms[:, pos].tolist()):
                token_rows.append({"position": pos, "token": token, "target": target, "component": component,
                                   "layer": layer, "value": value, "logit": logit})
    tokens = pd.DataFrame(token_rows, columns=["position", "token", "target", "component", "layer", "value", "logit"])
    return {"dla": table, "dla_check": summary, "dla_tokens": tokens.astype({"layer": "Int64"})}


def probe(options: DLAOptions, loaded: LoadedModel) -> ProbeSpec:
    return ProbeSpec(reducers=(DirectLogitAttribution(token=options.token),))


def tables(captured: Capture, loaded: LoadedModel, options: DLAOptions) -> Tables:
    return dla(captured, decode=loaded.tokenizer.decode)


def _component_axis(fig: go.Figure, labels: list[str]) -> None:
    # Every label drawn: left to plotly, a category axis of 60 components shows every other one.
    fig.update_xaxes(tickmode="array", tickvals=labels, ticktext=labels, tickangle=-90,
                     tickfont={"size": 10 if len(labels) <= 40 else 9}, categoryorder="array", categoryarray=labels)


def _component_bars(fig: go.Figure, labels: list[str], components, values, hover: str) -> None:
    """One bar trace per component kind, so that the legend names each colour."""
    frame = pd.DataFrame({"label": labels, "component": list(components), "value": list(values)})
    for component, rows in frame.groupby("component", sort=False):
        fig.add_bar(x=rows["label"], y=rows["value"], name=component, legendgroup=component,
                    marker_color=COMPONENT_COLOURS.get(component, "#888"), hovertemplate=hover)


def dla_figure(table: pd.DataFrame, check: pd.DataFrame | None = None) -> go.Figure:
    """Mean direct logit attribution of each component in residual order, with the mean
    direct effect beside it (the two coincide on a norm-free model)."""
    labels = [_label(c, l) for c, l in zip(table["component"], table["layer"])]
    fig = go.Figure()
    _component_bars(fig, labels, table["component"], table["value"],
                    "%{x}<br>mean DLA %{y:.4f}<extra></extra>")
    fig.add_scatter(x=labels, y=table["direct_effect"], name="direct effect (component removed)",
                    mode="markers", marker={"color": "black", "symbol": "x", "size": 6},
                    hovertemplate="%{x}<br>direct effect %{y:.4f}<extra></extra>")
    title = "Direct logit attribution by component"
    if check is not None and not check.empty:
        row = check.iloc[0]
        kind = "norm-free model" if row["norm_free"] else "real final norm"
        title += (f"<br><sub>{kind}; token {row['token']}: mean logit {row['mean_logit']:.3f}, "
                  f"max |sum - logit| {row['max_abs_gap']:.2g}, mean |sum of direct effects - logit| "
                  f"{row['direct_sum_gap']:.2g}</sub>")
    fig.update_layout(title=title, xaxis_title="component (residual order)",
                      yaxis_title="mean logit contribution", barmode="overlay", height=520)
    _component_axis(fig, labels)
    return fig


def dla_tokens_figure(tokens: pd.DataFrame) -> go.Figure:
    """Heatmap of the first window: component by position, each cell a term of that
    position's logit."""
    if tokens.empty:
        return go.Figure().update_layout(title="DLA per token: no scored token")
    tokens = tokens.assign(label=[_label(c, l) for c, l in zip(tokens["component"], tokens["layer"])])
    grid = tokens.pivot(index="label", columns="position", values="value")
    order = list(dict.fromkeys(tokens["label"]))
    grid = grid.loc[order]
    axis = tokens.drop_duplicates("position").set_index("position")
    targets = np.array([[shown_token(axis.loc[p, "target"]) for p in grid.columns]] * len(order))
    fig = go.Figure(go.Heatmap(
        z=grid.values, x=[f"{p}: {shown_token(axis.loc[p, 'token'])}" for p in grid.columns], y=order,
        colorscale="RdBu", zmid=0, colorbar={"title": "logit"}, customdata=targets,
        hovertemplate="%{y}<br>position %{x}<br>target %{customdata}<br>term %{z:.3f}<extra></extra>"))
    fig.update_layout(title="Direct logit attribution per token of the first window<br><sub>target: the next token "
                            "unless chosen otherwise</sub>", yaxis={"autorange": "reversed", "tickfont": {"size": 10}},
                      xaxis_title="position: input token", yaxis_title="component",
                      height=max(420, 160 + 11 * len(order)), xaxis={"tickangle": -60})
    return fig


def position_figure(tokens: pd.DataFrame, position: int) -> go.Figure:
    """What each component writes into the target token's logit at one position of the
    first window (the LLM Transparency Tool's per-token view), with the model's logit."""
    rows = tokens[tokens["position"] == position]
    labels = [_label(c, l) for c, l in zip(rows["component"], rows["layer"])]
    first = rows.iloc[0]
    fig = go.Figure()
    _component_bars(fig, labels, rows["component"], rows["value"], "%{x}<br>term %{y:.4f}<extra></extra>")
    fig.update_layout(title=f"Direct logit attribution at position {position} ({shown_token(first['token'])}) "
                            f"to the target {shown_token(first['target'])}<br><sub>terms sum to "
                            f"{rows['value'].sum():.3f}; the model's logit is {first['logit']:.3f}</sub>",
                      xaxis_title="component (residual order)", yaxis_title="logit contribution", height=480)
    _component_axis(fig, labels)
    return fig


def _position_controls(tables: Tables) -> dict:
    tokens = tables["dla_tokens"]
    positions = sorted(tokens["position"].unique().tolist())
    return {"position": (positions, positions[-1])}


POSITION_VIEW = View("DLA at a chosen position", _position_controls,
                     lambda tables, position: position_figure(tables["dla_tokens"], position), needs=("dla_tokens",))


def _figures(tables: Tables) -> list[go.Figure]:
    return [dla_figure(tables["dla"], tables.get("dla_check")), dla_tokens_figure(tables["dla_tokens"])]


def _summarize(tables: Tables) -> list[str]:
    check = tables["dla_check"].iloc[0]
    table = tables["dla"]
    parts = table[table["component"] != "bias"]
    top = parts.loc[parts["value"].abs().idxmax()]
    kind = "norm-free" if check["norm_free"] else "real final norm"
    return [f"dla ({kind}, token {check['token']}): components sum to the logit within {check['max_abs_gap']:.2g} "
            f"(mean logit {check['mean_logit']:.4g}); largest mean term {_label(top['component'], top['layer'])} "
            f"{top['value']:+.4g}; direct effects sum to the logit within {check['direct_sum_gap']:.2g} on average "
            f"(mean |term - direct effect| {parts['mean_abs_dla_minus_direct'].mean():.2g})"]


def _display(tables: Tables) -> Tables:
    return {"dla (mean over scored tokens)": tables["dla"], "dla_check": quoted_tokens(tables["dla_check"])}


METRIC = Metric("dla", "direct logit attribution of the embedding and each attention and MLP output "
                "(exact on a norm-free model)", probe=probe, tables=tables, options=DLAOptions, figures=_figures,
                views=(POSITION_VIEW,), summarize=_summarize, display=_display, causal_only=True)
