"""Several models side by side by relative depth: how their norm placements shape the residual.

The Curse of Depth (Sun et al. 2025) and Peri-LN (Kim et al. 2025) argue about how fast the
residual stream grows with depth under each norm placement, and how much each layer then
still changes it.  Measured on trained weights rather than random initialisations, the
comparison puts every model on one axis, relative depth `(layer + 1) / n_layers`, and
reports per block output:

- the mean L2 norm, also divided by block 0's, and the fitted growth rate per layer and per
  tenth of depth (so models of different depths compare);
- Block Influence (ShortGPT);
- each sublayer's relative contribution, `||attn_out|| / ||resid_pre||` and
  `||mlp_out|| / ||resid_mid||`;
- the largest |activation| over the layer's median, and where activations become massive
  (Sun et al. 2024: > 100 and >= 1000x the median).

The tables come from one `measure` run per model (variance, block-influence, massive); this
module only joins them.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from layerscope.analysis.plots import themed
from layerscope.analysis.result import Result

COMPARED_METRICS = ["variance", "block-influence", "massive"]
MAX_COMPARED = 8


def depth_table(results: dict[str, Result], placements: dict[str, str]) -> pd.DataFrame:
    """One row per model and block output, keyed by relative depth."""
    rows = []
    for model, result in results.items():
        variance = result["variance"]
        post = variance[variance.point == "resid_post"].set_index("layer")
        n_layers = len(post)
        sublayers = result["sublayer_ratio"].set_index("layer")
        influence = result["block_influence"].set_index("layer")
        top = result["massive_top"]
        top = top[top["rank"] == top["rank"].min()].set_index("layer")
        first_norm = post["mean_norm"].iloc[0]
        for layer in post.index:
            rows.append({
                "model": model, "placement": placements[model], "layer": int(layer), "n_layers": n_layers,
                "relative_depth": (layer + 1) / n_layers,
                "mean_norm": post.loc[layer, "mean_norm"],
                "norm_over_block_0": post.loc[layer, "mean_norm"] / first_norm,
                "block_influence": influence.loc[layer, "block_influence"],
                "attn_ratio": sublayers.loc[layer, "attn_ratio"],
                "mlp_ratio": sublayers.loc[layer, "mlp_ratio"],
                "max_over_median": top.loc[layer, "ratio"],
                "massive": bool(top.loc[layer, "massive"]),
            })
    return pd.DataFrame(rows)


def growth_table(results: dict[str, Result], placements: dict[str, str]) -> pd.DataFrame:
    """Each model's fitted norm growth per layer, and per tenth of its depth."""
    rows = []
    for model, result in results.items():
        fit = result["growth_fit"].set_index("quantity").loc["mean_norm"]
        n_layers = result["block_influence"]["layer"].nunique()
        first_massive = _first_massive_layer(result)
        rows.append({
            "model": model, "placement": placements[model], "n_layers": n_layers,
            "growth_per_layer": fit["growth_per_layer"], "r2": fit["r2"],
            "growth_per_tenth_of_depth": math.exp(fit["slope"] * n_layers / 10),
            "first_massive_layer": first_massive,
            "first_massive_relative_depth": None if first_massive is None else (first_massive + 1) / n_layers,
        })
    return pd.DataFrame(rows)


def _first_massive_layer(result: Result) -> int | None:
    top = result["massive_top"]
    flagged = top[top["massive"]]
    return None if flagged.empty else int(flagged["layer"].min())


def tables(results: dict[str, Result], placements: dict[str, str]) -> dict[str, pd.DataFrame]:
    return {"depth_comparison": depth_table(results, placements),
            "growth_comparison": growth_table(results, placements)}


PANELS = [("norm_over_block_0", "mean norm / block 0's", "log"),
          ("block_influence", "Block Influence", "log"),
          ("mlp_ratio", "||mlp_out|| / ||resid_mid||", "log"),
          ("max_over_median", "max |x| / median |x|", "log")]


def figure(depth: pd.DataFrame) -> go.Figure:
    """Four panels against relative depth, one line per model."""
    fig = make_subplots(rows=2, cols=2, subplot_titles=[title for _, title, _ in PANELS],
                        horizontal_spacing=0.1, vertical_spacing=0.16)
    palette = plotly.colors.qualitative.Plotly
    for n, ((model, placement), rows) in enumerate(depth.groupby(["model", "placement"], sort=False)):
        label = f"{model} ({placement})"
        colour = palette[n % len(palette)]  # one colour per model in every panel, as its legend entry says
        for i, (column, title, _) in enumerate(PANELS):
            fig.add_trace(go.Scatter(x=rows["relative_depth"], y=rows[column], mode="lines+markers", name=label,
                                     legendgroup=label, showlegend=i == 0, line_color=colour, marker_color=colour,
                                     hovertemplate=f"{label}<br>layer %{{customdata}}<br>{title} %{{y:.4g}}"
                                                   "<extra></extra>",
                                     customdata=rows["layer"]),
                          row=i // 2 + 1, col=i % 2 + 1)
    for i, (_, title, axis) in enumerate(PANELS):
        fig.update_xaxes(title_text="relative depth (layer + 1) / layers", range=[0, 1.02], row=i // 2 + 1, col=i % 2 + 1)
        fig.update_yaxes(title_text=title, type=axis, row=i // 2 + 1, col=i % 2 + 1)
    fig.update_layout(title="Norm placements side by side, by relative depth", height=760)
    return themed(fig)


def summarize(growth: pd.DataFrame) -> list[str]:
    lines = []
    for row in growth.itertuples():
        where = ("no massive activation" if pd.isna(row.first_massive_layer) else
                 f"massive from block {int(row.first_massive_layer)} ({row.first_massive_relative_depth:.0%} of depth)")
        lines.append(f"{row.model} ({row.placement}-LN, {row.n_layers} blocks): norm x{row.growth_per_layer:.3f} per "
                     f"layer, x{row.growth_per_tenth_of_depth:.2f} per tenth of depth (R² {row.r2:.2f}); {where}")
    return lines
