"""LLM.int8() outlier features (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix
Multiplication for Transformers at Scale").

The inputs of the attention projections and of the MLP up-projection (what 8-bit matmuls
quantise) are scanned for feature dims with |x| >= 6.  A dim is an outlier feature when,
in at least 25% of the layers, it reaches that magnitude on at least 6% of the tokens.
A layer counts for a dim when either of its two inputs qualifies.  The three thresholds
are options.  Counts are folded per batch; nothing per token is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import torch

from layerscope.analysis.metric import Metric, Tables
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.errors import UserError
from layerscope.probes.outlier_reducers import PROJECTION_SITES, ProjectionOutliers, ProjectionOutliersResult
from layerscope.probes.zoo import LoadedModel


def _fraction(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise UserError(f"{name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class Int8Options:
    threshold: float = field(default=6.0, metadata={"min": 0.0, "help": "an outlier has |value| >= this"})
    min_layer_frac: float = field(default=0.25, metadata={"min": 0.0, "max": 1.0, "help": "fraction of layers a dim must affect"})
    min_token_frac: float = field(default=0.06, metadata={"min": 0.0, "max": 1.0, "help": "fraction of tokens it must affect in such a layer"})

    def __post_init__(self):
        if self.threshold <= 0:
            raise UserError(f"threshold must be positive, got {self.threshold}")
        _fraction("min_layer_frac", self.min_layer_frac)
        _fraction("min_token_frac", self.min_token_frac)


def probe(options: Int8Options, loaded: LoadedModel) -> ProbeSpec:
    return ProbeSpec((ProjectionOutliers(threshold=options.threshold),))


@torch.no_grad()
def outlier_cells(capture: Capture) -> pd.DataFrame:
    """One row per (layer, site, dim) with at least one |x| >= threshold: `token_frac`, the
    fraction of tokens reaching it, and `max_abs`.  Sites: attn_in, mlp_in."""
    result: ProjectionOutliersResult = capture["projection_outliers"]
    names, by_site = zip(*result.by_site().items())
    # [layer site dim], so that rows come by layer, then site, then dim
    counts = torch.stack([site.counts for site in by_site], dim=1)
    max_abs = torch.stack([site.max_abs for site in by_site], dim=1)
    layers, sites, dims = torch.nonzero(counts > 0, as_tuple=True)
    return pd.DataFrame({
        "layer": layers.numpy(), "site": [names[s] for s in sites.tolist()], "dim": dims.numpy(),
        "token_frac": (counts[layers, sites, dims].double() / result.tokens).numpy(),
        "max_abs": max_abs[layers, sites, dims].numpy(),
    })


def outlier_features(cells: pd.DataFrame, n_layers: int, min_layer_frac: float = 0.25,
                     min_token_frac: float = 0.06) -> pd.DataFrame:
    """One row per outlier feature dim: `layers_affected` (layers where an input reaches the
    threshold on >= min_token_frac of tokens), `layer_frac`, the largest `token_frac`, the
    largest `max_abs`, and the `sites` where it qualifies."""
    columns = ["dim", "layers_affected", "layer_frac", "max_token_frac", "max_abs", "sites", "first_layer", "last_layer"]
    affected = cells[cells["token_frac"] >= min_token_frac]
    rows = []
    for dim, group in affected.groupby("dim"):
        layers = sorted(group["layer"].unique())
        if len(layers) / n_layers < min_layer_frac:
            continue
        rows.append({"dim": dim, "layers_affected": len(layers), "layer_frac": len(layers) / n_layers,
                     "max_token_frac": group["token_frac"].max(), "max_abs": cells.loc[cells["dim"] == dim, "max_abs"].max(),
                     "sites": ",".join(sorted(group["site"].unique())), "first_layer": layers[0], "last_layer": layers[-1]})
    return pd.DataFrame(rows, columns=columns).sort_values(["layers_affected", "max_abs"], ascending=False,
                                                             ignore_index=True)


def outlier_layers(cells: pd.DataFrame, n_layers: int, min_token_frac: float = 0.06) -> pd.DataFrame:
    """One row per (layer, site): how many dims reach the threshold at all (`dims_over`) and on
    >= min_token_frac of tokens (`dims_affected`), and the largest |x| with its dim."""
    every = pd.MultiIndex.from_product([range(n_layers), PROJECTION_SITES], names=["layer", "site"])
    by_cell = cells.groupby(["layer", "site"])
    # The first dim of a (layer, site) that reaches its largest |x|: cells come in dim order.
    peaks = cells.loc[by_cell["max_abs"].idxmax()].set_index(["layer", "site"])
    return pd.DataFrame({
        "dims_over": by_cell.size().reindex(every, fill_value=0),
        "dims_affected": (cells["token_frac"] >= min_token_frac).groupby([cells["layer"], cells["site"]]).sum()
                         .reindex(every, fill_value=0).astype(int),
        "max_abs": peaks["max_abs"].reindex(every, fill_value=0.0).astype(float),
        "max_dim": peaks["dim"].reindex(every, fill_value=-1).astype(int),
    }, index=every).reset_index()


def tables(captured: Capture, loaded: LoadedModel, options: Int8Options) -> Tables:
    cells = outlier_cells(captured)
    features = outlier_features(cells, loaded.n_layers, options.min_layer_frac, options.min_token_frac)
    return {"int8_features": features,
            "int8_layers": outlier_layers(cells, loaded.n_layers, options.min_token_frac),
            "int8_cells": cells}


def int8_figure(cells: pd.DataFrame, features: pd.DataFrame) -> go.Figure:
    """Token fraction reaching the threshold, per layer, for each outlier feature dim."""
    chosen = cells[cells["dim"].isin(features["dim"])]
    per_layer = chosen.groupby(["dim", "layer"], as_index=False)["token_frac"].max()
    fig = go.Figure()
    for dim, rows in per_layer.groupby("dim"):
        fig.add_scatter(x=rows["layer"], y=rows["token_frac"], mode="lines+markers", name=f"dim {dim}")
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(title_text="fraction of tokens with |x| >= threshold", tickformat=".0%")
    fig.update_layout(title=f"LLM.int8 outlier features ({len(features)} dims)")
    return fig


def _figures(tables: Tables) -> list[go.Figure]:
    return [int8_figure(tables["int8_cells"], tables["int8_features"])]


def _summarize(tables: Tables) -> list[str]:
    features, layers = tables["int8_features"], tables["int8_layers"]
    peak = layers.loc[layers["max_abs"].idxmax()]
    head = f"int8-outliers: {len(features)} outlier feature dim{'' if len(features) == 1 else 's'}"
    if features.empty:
        return [f"{head}; the largest projection input is |x| {peak['max_abs']:.4g} (block {peak['layer']}, "
                f"{peak['site']}, dim {peak['max_dim']})"]
    listed = ", ".join(f"{r.dim} ({r.layer_frac:.0%} of layers, up to {r.max_token_frac:.0%} of tokens)"
                       for r in features.head(5).itertuples())
    return [f"{head}: {listed}; largest |x| {peak['max_abs']:.4g} at block {peak['layer']} {peak['site']} dim {peak['max_dim']}"]


def _display(tables: Tables) -> Tables:
    return {"int8_features": tables["int8_features"],
            "int8_layers (inputs with any |x| >= threshold; --format json for all)":
                tables["int8_layers"].query("dims_over > 0")}


METRIC = Metric("int8-outliers", "LLM.int8 outlier features: dims with |x| >= 6 at the projection inputs in >= 25% "
                "of layers and >= 6% of tokens", probe=probe, tables=tables, options=Int8Options, figures=_figures, summarize=_summarize,
                display=_display)
