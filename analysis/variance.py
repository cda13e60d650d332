"""Variance growth with depth (the Curse of Depth).

Per layer and residual point: mean L2 norm, and std and variance over all dims and
non-first positions (position 0 apart); each sublayer's relative contribution
`||attn_out|| / ||resid_pre||` and `||mlp_out|| / ||resid_mid||`; and a log-linear fit of
the block outputs' mean norm and variance against depth, whose slope is the growth rate
(Sun et al. 2025, "The Curse of Depth in Large Language Models"; Pre-LN variance grows
with depth, LayerNorm Scaling and Peri-LN (Kim et al. 2025) are meant to tame it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from layerscope.analysis.metric import Metric, Tables
from layerscope.analysis.residual_stats import residual_stats
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.reducers import ResidualMoments, SublayerRatioMeans, SublayerRatios
from layerscope.probes.zoo import LoadedModel

PROBE = ProbeSpec(reducers=(ResidualMoments(kinds=("resid_pre", "resid_mid", "resid_post")), SublayerRatios()))
FITTED = ("mean_norm", "variance")


@dataclass(frozen=True)
class VarianceOptions:
    placements: str = field(default="", metadata={
        "help": "compare norm placements of a tiny-*/config: model, e.g. pre,post,peri,mix,lns"})


def growth_fit(layers: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """Slope and R² of log(values) against layer: values grow by exp(slope) per layer."""
    logs = np.log(values)
    slope, intercept = np.polyfit(layers, logs, 1)
    residual = logs - (slope * layers + intercept)
    total = ((logs - logs.mean()) ** 2).sum()
    return float(slope), float(1 - (residual ** 2).sum() / total) if total > 0 else float("nan")


def variance_tables(captured: Capture, loaded: LoadedModel | None = None, options: VarianceOptions | None = None) -> Tables:
    stats = residual_stats(captured)[["point", "layer", "mean_norm", "std", "variance", "mean_norm_first", "std_first"]]
    ratios: SublayerRatioMeans = captured["sublayer_ratios"]
    sublayer = pd.DataFrame({"layer": range(captured.n_layers), "attn_ratio": ratios.attn.tolist(),
                             "mlp_ratio": ratios.mlp.tolist()})
    post = stats[stats["point"] == "resid_post"]
    fits = []
    for quantity in FITTED:
        slope, r2 = growth_fit(post["layer"].to_numpy(float), post[quantity].to_numpy(float))
        fits.append({"point": "resid_post", "quantity": quantity, "slope": slope,
                     "growth_per_layer": float(np.exp(slope)), "r2": r2})
    return {"variance": stats, "sublayer_ratio": sublayer, "growth_fit": pd.DataFrame(fits)}




def figure(tables: Tables) -> go.Figure:
    """Mean norm, std and variance of block outputs against depth, log scale, with the fit."""
    variance, fits = tables["variance"], tables["growth_fit"]
    groups = variance.groupby("placement", sort=False) if "placement" in variance else [("", variance)]
    fig = go.Figure()
    names = {"mean_norm": "mean L2 norm", "std": "std", "variance": "variance"}
    for placement, table in groups:
        post = table[table["point"] == "resid_post"]
        suffix = f" ({placement})" if placement else ""
        for quantity in ("mean_norm", "std", "variance"):
            fig.add_scatter(x=post["layer"], y=post[quantity], mode="lines+markers", name=f"{names[quantity]}{suffix}",
                            hovertemplate="layer %{x}<br>" + names[quantity] + " %{y:.4g}<extra></extra>")
        fit = fits[fits["quantity"] == "mean_norm"]
        if placement:
            fit = fit[fit["placement"] == placement]
        slope = fit["slope"].iloc[0]
        first = post["mean_norm"].iloc[0]
        layers = post["layer"].to_numpy(float)
        fig.add_scatter(x=layers, y=first * np.exp(slope * (layers - layers[0])), mode="lines",
                        line={"dash": "dot"}, name=f"fit: x{np.exp(slope):.3f}/layer{suffix}")
    fig.update_yaxes(type="log", title_text="magnitude of the block output")
    fig.update_layout(title="Residual growth with depth (block outputs)", xaxis_title="layer (block output)")
    return fig


def summarize(tables: Tables) -> list[str]:
    fits = tables["growth_fit"]
    lines = []
    for _, row in fits[fits["quantity"] == "mean_norm"].iterrows():
        label = f" [{row['placement']}]" if "placement" in fits else ""
        lines.append(f"variance{label}: residual norm grows x{row['growth_per_layer']:.3f} per layer "
                     f"(log-linear slope {row['slope']:.4f}, R² {row['r2']:.3f})")
    return lines


METRIC = Metric("variance", "norm, std and variance growth with depth, sublayer ratios and growth fit",
                probe=lambda options, loaded: PROBE, tables=variance_tables, options=VarianceOptions, figures=lambda t: [figure(t)], summarize=summarize)
