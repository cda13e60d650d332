"""Excess kurtosis of activations, the outlier measure of Outlier-Safe Pre-Training (Park et
al. 2025, "Outlier-Safe Pre-Training for Robust 4-Bit Quantization of Large Language Models").

For each token, `relu(m4 / m2^2 - 3)` of its vector over the d_model dims, with central
moments m2 and m4: near 0 for Gaussian-like activations, and up to about d_model when one
dim dominates (a massive activation).  It is averaged over tokens per layer, and over
layers for the whole model, at three sites: the block output (`resid_post`) and the
inputs of the attention and MLP projections (`attn_in`, `mlp_in`, what a quantised matmul
sees).  Position 0 is also reported apart, since the sink token carries the largest
outliers.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import torch

from layerscope.analysis.metric import Metric, NoOptions, Tables
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.outlier_reducers import KurtosisResult, TokenKurtosis
from layerscope.probes.zoo import LoadedModel

PROBE = ProbeSpec((TokenKurtosis(),))


@torch.no_grad()
def kurtosis_by_layer(capture: Capture) -> pd.DataFrame:
    """One row per (site, layer): mean excess `kurtosis` over all tokens, over positions >= 1
    (`kurtosis_rest`) and at position 0 (`kurtosis_first`)."""
    result: KurtosisResult = capture["kurtosis"]
    rows = []
    for site, sums in result.by_site().items():
        for layer in range(capture.n_layers):
            first, rest = sums.sum_first[layer].item(), sums.sum_rest[layer].item()
            n_first, n_rest = float(sums.tokens_first[layer]), float(sums.tokens_rest[layer])
            rows.append({"site": site, "layer": layer, "kurtosis": (first + rest) / (n_first + n_rest),
                         "kurtosis_rest": rest / n_rest if n_rest else float("nan"),
                         "kurtosis_first": first / n_first, "tokens": int(n_first + n_rest)})
    return pd.DataFrame(rows)


def kurtosis_overall(by_layer: pd.DataFrame) -> pd.DataFrame:
    """One row per site: the layer average of each column, and the layer with the largest kurtosis."""
    rows = []
    for site, group in by_layer.groupby("site", sort=False):
        peak = group.loc[group["kurtosis"].idxmax()]
        rows.append({"site": site, "kurtosis": group["kurtosis"].mean(), "kurtosis_rest": group["kurtosis_rest"].mean(),
                     "kurtosis_first": group["kurtosis_first"].mean(), "peak_layer": int(peak["layer"]),
                     "peak_kurtosis": peak["kurtosis"]})
    return pd.DataFrame(rows)


def tables(captured: Capture, loaded: LoadedModel, options: NoOptions) -> Tables:
    by_layer = kurtosis_by_layer(captured)
    return {"kurtosis": by_layer, "kurtosis_overall": kurtosis_overall(by_layer)}


def kurtosis_figure(by_layer: pd.DataFrame) -> go.Figure:
    """Mean excess kurtosis per layer and site on a log scale; dotted: position 0 alone."""
    fig = go.Figure()
    for site, rows in by_layer.groupby("site", sort=False):
        fig.add_scatter(x=rows["layer"], y=rows["kurtosis_rest"], mode="lines+markers", name=f"{site}, positions >= 1")
        fig.add_scatter(x=rows["layer"], y=rows["kurtosis_first"], mode="lines", line={"dash": "dot"},
                        name=f"{site}, position 0")
    fig.update_yaxes(type="log", title_text="excess kurtosis")
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title="Excess kurtosis of activations over d_model, by layer")
    return fig


def _figures(tables: Tables) -> list[go.Figure]:
    return [kurtosis_figure(tables["kurtosis"])]


def _summarize(tables: Tables) -> list[str]:
    overall = tables["kurtosis_overall"].set_index("site")
    parts = [f"{site} {row['kurtosis']:.4g} (peak {row['peak_kurtosis']:.4g} at block {int(row['peak_layer'])})"
             for site, row in overall.iterrows()]
    return ["kurtosis: mean excess kurtosis over layers: " + "; ".join(parts)]


METRIC = Metric("kurtosis", "excess kurtosis relu(m4/m2^2 - 3) of each token's activations, per layer and overall",
                probe=lambda options, loaded: PROBE, tables=tables, figures=_figures, summarize=_summarize)
