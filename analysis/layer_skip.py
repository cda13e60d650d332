"""Layer-skip effects: what skipping one block (or only its attention or MLP) costs.

For each block *l* skipped alone: the change in mean next-token cross-entropy, the KL
from the full model's distribution, top-1 agreement with it, and the relative change of
the final residual.  With `future`, the effect on every later block's contribution
`||c_m - c'_m|| / ||c_m||`, `c_m = resid_post[m] - resid_pre[m]` (Csordás et al. 2025,
"Do Language Models Use Their Depth Efficiently?").  Sublayer skips follow He et al.
2024, "What Matters in Transformers? Not All Attention is Needed".

The sweep reuses the clean pass's `resid_pre[l]`, so layers before *l* are not recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from layerscope.analysis.metric import Metric, Tables
from layerscope.analysis.plots import integer_axis
from layerscope.probes import distributed
from layerscope.probes.capture import Capture
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.progress import progress_bar
from layerscope.probes.replay import SkipSweep, skip_sweep
from layerscope.probes.zoo import LoadedModel

PARTS = ("block", "attn", "mlp")


@dataclass(frozen=True)
class LayerSkipOptions:
    part: str = field(default="block", metadata={"help": "what to skip", "choices": PARTS})
    future: bool = field(default=False, metadata={"help": "also the effect on every later block's contribution"})
    layers: str = field(default="", metadata={"help": "comma-separated layers to skip (default: all)"})

    def __post_init__(self):
        if self.part not in PARTS:
            raise UserError(f"--part must be one of {', '.join(PARTS)}, got {self.part!r}")


def chosen_layers(options: LayerSkipOptions, n_layers: int) -> list[int]:
    if not options.layers:
        return list(range(n_layers))
    try:
        layers = [int(x) for x in options.layers.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--layers must be comma-separated integers, got {options.layers!r}") from None
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise UserError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}")
    repeated = sorted({l for l in layers if layers.count(l) > 1})
    if repeated:
        raise UserError(f"--layers names layer {repeated[0]} more than once")
    if not layers:
        raise UserError(f"--layers names no layer: give comma-separated integers, got {options.layers!r}")
    return layers


def skip_tables(sweep: SkipSweep) -> Tables:
    """`layer_skip`: one row per skipped layer; `skip_future`: skipped layer x later layer."""
    n = sweep.tokens
    ce_full = sweep.ce_full / n
    table = pd.DataFrame({
        "layer": sweep.layers,
        "part": sweep.part,
        "ce_full": ce_full,
        "ce_skipped": (sweep.ce_skip / n).tolist(),
        "delta_ce": (sweep.ce_skip / n - ce_full).tolist(),
        "kl": (sweep.kl / n).tolist(),
        "top1_agreement": (sweep.top1_agree / n).tolist(),
        "final_change": (sweep.final_change / n).tolist(),
    })
    future = pd.DataFrame([
        {"skipped_layer": layer, "later_layer": m, "effect": sweep.future[i, m].item() / n}
        for i, layer in enumerate(sweep.layers) for m in range(layer + 1, sweep.future.shape[1])
    ], columns=["skipped_layer", "later_layer", "effect"])
    return {"layer_skip": table, "skip_future": future}


def replay(loaded: LoadedModel, windows: TokenWindows, options: LayerSkipOptions, captured: Capture | None,
           found: Tables, progress: bool = False) -> Tables:
    layers = chosen_layers(options, loaded.n_layers)
    with progress_bar(progress, total=len(windows) * len(layers), unit="skip",
                      desc=f"skip sweep ({options.part})") as bar:
        sweep = skip_sweep(loaded, windows, layers, options.part, progress=bar)
    return _chosen_tables(sweep, loaded, options)


def sharded_replay(loaded: LoadedModel, windows: TokenWindows, options: LayerSkipOptions, captured: Capture | None,
                   found: Tables, progress: bool = False) -> Tables | None:
    """The sweep over this rank's windows of a data-parallel run, summed on rank 0 (None elsewhere)."""
    mine, _ = distributed.shard(windows)
    layers = chosen_layers(options, loaded.n_layers)
    sweep = distributed.merged_on_rank0(skip_sweep(loaded, mine, layers, options.part))
    return None if sweep is None else _chosen_tables(sweep, loaded, options)


def _chosen_tables(sweep: SkipSweep, loaded: LoadedModel, options: LayerSkipOptions) -> Tables:
    tables = skip_tables(sweep)
    if not loaded.adapter.causal:
        tables["layer_skip"] = tables["layer_skip"].drop(columns=["ce_full", "ce_skipped", "delta_ce", "kl",
                                                                  "top1_agreement"])
    if not options.future:
        del tables["skip_future"]
    return tables


# Axis titles by column: what a reader calls the quantity, with its unit.
AXIS_TITLES = {"delta_ce": "change in cross-entropy (nats)", "final_change": "relative change of the final state"}


def effect_figure(table: pd.DataFrame) -> go.Figure:
    value = "delta_ce" if "delta_ce" in table else "final_change"
    extra = [c for c in ("kl", "top1_agreement") if c in table]
    hover = "skip layer %{x}<br>" + AXIS_TITLES[value] + " %{y:.4f}"
    hover += "".join(f"<br>{name} %{{customdata[{i}]:.4f}}" for i, name in enumerate(extra))
    fig = go.Figure(go.Bar(x=table["layer"], y=table[value], name=AXIS_TITLES[value],
                           customdata=table[extra].values if extra else None,
                           hovertemplate=hover + "<extra></extra>"))
    fig.update_layout(title=f"Cost of skipping each {table['part'].iloc[0]} alone", xaxis_title="skipped layer",
                      yaxis_title=AXIS_TITLES[value])
    integer_axis(fig, "xaxis", table["layer"])
    return fig


def future_figure(future: pd.DataFrame) -> go.Figure:
    """Csordás et al.'s picture: the relative change of each later layer's contribution when
    one layer is skipped.  Coloured on a log scale, because skipping block 0 changes
    everything after it and would saturate a linear one."""
    grid = future.pivot(index="skipped_layer", columns="later_layer", values="effect")
    values = grid.to_numpy(dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    low = math.floor(math.log10(positive.min())) if len(positive) else -3
    high = math.ceil(math.log10(positive.max())) if len(positive) else 0
    low = max(low, high - 4)
    ticks = list(range(low, high + 1))
    fig = go.Figure(go.Heatmap(
        z=np.log10(np.clip(values, 10.0 ** low, None)), x=grid.columns, y=grid.index, customdata=values,
        colorscale="Viridis", zmin=low, zmax=high,
        colorbar={"title": "||c - c'|| / ||c||", "tickvals": ticks, "ticktext": [f"{10.0 ** t:g}" for t in ticks]},
        hovertemplate="skip %{y} -> layer %{x}<br>||c - c'||/||c|| %{customdata:.3g}<extra></extra>"))
    fig.update_layout(title="Effect of a skipped layer on later layers' contributions (log colour)",
                      xaxis_title="later layer", yaxis_title="skipped layer", yaxis={"autorange": "reversed"})
    integer_axis(fig, "xaxis", grid.columns)
    integer_axis(fig, "yaxis", grid.index)
    return fig


def figures(tables: Tables) -> list[go.Figure]:
    out = [effect_figure(tables["layer_skip"])]
    if "skip_future" in tables and len(tables["skip_future"]):
        out.append(future_figure(tables["skip_future"]))
    return out


def summarize(tables: Tables) -> list[str]:
    table = tables["layer_skip"].set_index("layer")
    if "delta_ce" not in table:
        worst = table["final_change"].idxmax()
        return [f"layer-skip: skipping layer {worst} changes the final state most ({table.loc[worst, 'final_change']:.3f})"]
    n = len(table)
    middle = table.iloc[n // 3: 2 * n // 3]
    line = (f"layer-skip: full CE {table['ce_full'].iloc[0]:.3f}; skipping layer 0 adds "
            f"{table['delta_ce'].iloc[0]:+.3f}, the middle third at most {middle['delta_ce'].max():+.3f} "
            f"(layer {middle['delta_ce'].idxmax()}); cheapest skip: layer {table['delta_ce'].idxmin()} "
            f"({table['delta_ce'].min():+.3f})")
    return [line]


METRIC = Metric("layer-skip", "cost of skipping each block or sublayer, and its effect on later layers",
                replay=replay, sharded_replay=sharded_replay, kind="replay", options=LayerSkipOptions, figures=figures, summarize=summarize)
