"""Block Influence: how little a block changes the residual stream.

`BI_l = 1 - mean_t cos(resid_pre[l]_t, resid_post[l]_t)` (Men et al. 2024, "ShortGPT:
Layers in Large Language Models are More Redundant Than You Expect"); per sublayer,
`1 - cos(resid_pre, resid_mid)` for attention and `1 - cos(resid_mid, resid_post)` for
the MLP (He et al. 2024, "What Matters in Transformers? Not All Attention is Needed");
and the angular distance `arccos(cos(resid_pre[l], resid_post[l+n-1]))/pi` over n blocks
(Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers").

Block outputs are the raw `resid_post`: ShortGPT's reference code reads the last block
after the final norm, which this does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from layerscope.analysis.metric import Metric, Tables
from layerscope.analysis.plots import integer_axis
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.errors import UserError
from layerscope.probes.reducers import CosineMeans, LayerCosines
from layerscope.probes.zoo import LoadedModel


@dataclass(frozen=True)
class BlockInfluenceOptions:
    angular: int = field(default=0, metadata={"min": 0, "max": 4096, "help": "also the angular distance over this many blocks (0: off)"})
    exclude_first: bool = field(default=False, metadata={"help": "leave out position 0 (the sink)"})
    placements: str = field(default="", metadata={
        "help": "compare norm placements of a tiny-*/config: model, e.g. pre,post,peri,mix,lns"})

    def __post_init__(self):
        if self.angular < 0:
            raise UserError(f"--angular must be 0 or a positive number of blocks, got {self.angular}")


def probe(options: BlockInfluenceOptions, loaded: LoadedModel) -> ProbeSpec:
    if options.angular > loaded.n_layers:
        raise UserError(f"--angular {options.angular} is larger than the depth of {loaded.spec.name} "
                        f"({loaded.n_layers} blocks)")
    return ProbeSpec(reducers=(LayerCosines(span=options.angular, exclude_first=options.exclude_first),))


@torch.no_grad()
def block_influence(capture: Capture) -> pd.DataFrame:
    """One row per layer: `block_influence`, `attn_influence`, `mlp_influence`, the angular
    distance when asked for, and `removal_rank` (ShortGPT order: 0 = lowest BI, dropped first)."""
    cosines: CosineMeans = capture["cosines"]
    table = pd.DataFrame({
        "layer": range(capture.n_layers),
        "block_influence": (1 - cosines.block).tolist(),
        "attn_influence": (1 - cosines.attn).tolist(),
        "mlp_influence": (1 - cosines.mlp).tolist(),
        "angular_distance": cosines.angular.tolist(),
    })
    if table["angular_distance"].isna().all():
        table = table.drop(columns="angular_distance")
    table["removal_rank"] = table["block_influence"].rank(method="first").astype(int) - 1
    return table


def removal_order(table: pd.DataFrame) -> list[int]:
    """Layers in ShortGPT removal order, lowest Block Influence first."""
    return table.sort_values("block_influence")["layer"].tolist()


def tables(captured: Capture, loaded: LoadedModel, options: BlockInfluenceOptions) -> Tables:
    return {"block_influence": block_influence(captured)}


def figure(table: pd.DataFrame) -> go.Figure:
    """Bars per layer for the attention and MLP influence, the block's as a line."""
    fig = go.Figure()
    for placement, rows in _by_placement(table):
        suffix = f" ({placement})" if placement else ""
        fig.add_bar(x=rows["layer"], y=rows["attn_influence"], name=f"attention{suffix}",
                    hovertemplate="layer %{x}<br>attention BI %{y:.4f}<extra></extra>")
        fig.add_bar(x=rows["layer"], y=rows["mlp_influence"], name=f"MLP{suffix}",
                    hovertemplate="layer %{x}<br>MLP BI %{y:.4f}<extra></extra>")
        fig.add_scatter(x=rows["layer"], y=rows["block_influence"], mode="lines+markers", name=f"block{suffix}",
                        hovertemplate="layer %{x}<br>block BI %{y:.4f}<extra></extra>")
    fig.update_layout(title="Block Influence (1 - cos) per layer", barmode="group",
                      xaxis_title="layer", yaxis_title="Block Influence (1 - mean cosine)")
    integer_axis(fig, "xaxis", table["layer"])
    return fig


def sorted_figure(table: pd.DataFrame) -> go.Figure:
    """The blocks in ShortGPT's removal order, lowest Block Influence first, on a log scale,
    so that one large block (often block 0) does not flatten the rest."""
    fig = go.Figure()
    for placement, rows in _by_placement(table):
        ordered = rows.sort_values("block_influence")
        suffix = f" ({placement})" if placement else ""
        fig.add_bar(x=[f"block {l}" for l in ordered["layer"]], y=ordered["block_influence"].clip(lower=1e-6),
                    name=f"block{suffix}", customdata=np.arange(len(ordered)),
                    hovertemplate="%{x}<br>BI %{y:.4g}<br>removal rank %{customdata} (0 = first)<extra></extra>")
    fig.update_layout(title="Block Influence in removal order (log scale)", barmode="group",
                      xaxis_title="block, lowest influence first", yaxis_title="Block Influence (1 - mean cosine)",
                      xaxis={"tickangle": -60})
    fig.update_yaxes(type="log")
    return fig


def _by_placement(table: pd.DataFrame):
    if "placement" not in table:
        return [("", table)]
    return list(table.groupby("placement", sort=False))


def summarize(tables: Tables) -> list[str]:
    lines = []
    for placement, table in _by_placement(tables["block_influence"]):
        n = len(table)
        half = n // 2
        ratio = table["block_influence"].iloc[half:].mean() / table["block_influence"].iloc[:half].mean()
        drop = sorted(removal_order(table)[: max(1, n // 4)])
        prefix = f"block-influence [{placement}]" if placement else "block-influence"
        lines.append(f"{prefix}: ShortGPT would drop layers {drop} first (lowest BI, 25% of depth); "
                     f"mean BI second half / first half = {ratio:.3f}")
    return lines


METRIC = Metric("block-influence", "Block Influence (ShortGPT) per block and sublayer, with removal order",
                probe=probe, tables=tables, options=BlockInfluenceOptions, figures=lambda t: [figure(t["block_influence"]),
                                                                            sorted_figure(t["block_influence"])],
                summarize=summarize)
