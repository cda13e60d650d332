"""Super weights (Yu et al. 2024, "The Super Weight in Large Language Models").

For each block, the largest |x| of the MLP down-projection's input (`mlp_act`) and output
(`mlp_out`), with the dims where they occur.  In the block where the input spikes, the
super weight is `down_proj.weight[row, col]` with row = argmax |output| dim and
col = argmax |input| dim: one scalar that writes the massive activation (the "super
activation") into the residual stream.  With `ablate`, that weight is zeroed and the change
in next-token loss is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float

from layerscope.analysis.metric import Metric, Tables
from layerscope.analysis.plots import quoted_tokens
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.outlier_reducers import mean_loss
from layerscope.probes.reducers import MomentsResult, ResidualMoments
from layerscope.probes.weight_edits import down_proj_matrix, zeroed_down_proj_weights
from layerscope.probes.zoo import LoadedModel

KINDS = ("mlp_act", "mlp_out")
# The scan reads only the largest |x| of each point and where it was.
PROBE = ProbeSpec((ResidualMoments(kinds=KINDS, name="mlp_extremes", sums=False),))


@dataclass(frozen=True)
class SuperWeightOptions:
    layer: int | None = field(default=None, metadata={"min": 0, "max": 100_000,
        "help": "block to read the super weight from (default: the block whose down-projection input spikes)"})
    ablate: bool = field(default=False, metadata={"help": "zero the super weight and report the change in loss"})

    def __post_init__(self):
        if self.layer is not None and self.layer < 0:
            raise UserError(f"layer must be >= 0, got {self.layer}")


def lower_median(values: torch.Tensor) -> float:
    """The lower of the two middle values, as `torch.median`; numpy's selection finds it in
    a fraction of torch's time on CPU, which matters for a scan over every block's weights."""
    flat = values.detach().cpu()
    flat = (flat if flat.dtype in (torch.float32, torch.float64) else flat.float()).numpy().ravel()
    middle = (flat.size - 1) // 2
    return float(np.partition(flat, middle)[middle])


@torch.no_grad()
def super_weight_scan(capture: Capture, down_proj: list[Float[torch.Tensor, "d_model d_mlp"]],
                      decode=None) -> pd.DataFrame:
    """One row per block: `max_in` (largest |mlp_act|) with its `in_dim` and position, `max_out`
    (largest |mlp_out|) with its `out_dim`, position and token, and the down-projection weight
    at (out_dim, in_dim) with its |w| over the matrix's median |w|."""
    result: MomentsResult = capture["mlp_extremes"]
    act, out = (result[kind] for kind in KINDS)
    rows = []
    for layer in range(capture.n_layers):
        _, in_pos, in_dim, _ = act.max_at.at(layer)
        window, out_pos, out_dim, token = out.max_at.at(layer)
        matrix = down_proj[layer]
        weight = matrix[out_dim, in_dim].item()
        magnitude = matrix.abs()
        rows.append({
            "layer": layer, "max_in": act.max_abs[layer].item(), "in_dim": in_dim, "in_position": in_pos,
            "max_out": out.max_abs[layer].item(), "out_dim": out_dim, "out_window": window,
            "out_position": out_pos, "token": decode([token]) if decode else token, "weight": weight,
            "weight_ratio": abs(weight) / lower_median(magnitude),
            "weight_rank": int((magnitude > abs(weight)).sum().item()) + 1,
        })
    return pd.DataFrame(rows)


def spike_layer(scan: pd.DataFrame) -> int:
    """The block whose down-projection input reaches the largest |x|."""
    return int(scan.loc[scan["max_in"].idxmax(), "layer"])


def super_weight(scan: pd.DataFrame, layer: int | None = None) -> pd.DataFrame:
    """The super weight of `layer` (default: the spike layer) as one row: `layer`, `row`
    (output dim), `col` (input dim), `value`, and the activations that locate it."""
    layer = spike_layer(scan) if layer is None else layer
    if layer not in set(scan["layer"]):
        raise UserError(f"layer {layer} is out of range: the model has layers 0..{scan['layer'].max()}")
    row = scan.set_index("layer").loc[layer]
    return pd.DataFrame([{
        "layer": layer, "row": int(row["out_dim"]), "col": int(row["in_dim"]), "value": row["weight"],
        "weight_ratio": row["weight_ratio"], "weight_rank": int(row["weight_rank"]), "max_in": row["max_in"],
        "max_out": row["max_out"], "position": int(row["out_position"]), "token": row["token"],
        "spike": layer == spike_layer(scan),
    }])


def super_weight_ablation(loaded: LoadedModel, windows: TokenWindows, weight: pd.DataFrame,
                          progress: bool = False) -> pd.DataFrame:
    """Next-token loss with the super weight in place and zeroed."""
    coords = [(int(weight["layer"].iloc[0]), int(weight["row"].iloc[0]), int(weight["col"].iloc[0]))]
    clean = mean_loss(loaded, windows, progress=progress)
    with zeroed_down_proj_weights(loaded, coords):
        ablated = mean_loss(loaded, windows, progress=progress)
    layer, row, col = coords[0]
    return pd.DataFrame([{"intervention": "none", "layer": layer, "row": row, "col": col, "loss": clean,
                          "delta_loss": 0.0},
                         {"intervention": "zero", "layer": layer, "row": row, "col": col, "loss": ablated,
                          "delta_loss": ablated - clean}])


def probe(options: SuperWeightOptions, loaded: LoadedModel) -> ProbeSpec:
    if options.ablate and not loaded.adapter.causal:
        raise UserError(f"--ablate compares next-token losses; {loaded.spec.name} is an encoder")
    if options.layer is not None and options.layer >= loaded.n_layers:
        raise UserError(f"layer {options.layer} is out of range: {loaded.spec.name} has layers 0..{loaded.n_layers - 1}")
    return PROBE


def tables(captured: Capture, loaded: LoadedModel, options: SuperWeightOptions) -> Tables:
    matrices = [down_proj_matrix(loaded, layer) for layer in range(loaded.n_layers)]
    scan = super_weight_scan(captured, matrices, decode=loaded.tokenizer.decode)
    return {"super_weight": super_weight(scan, options.layer), "super_weight_scan": scan}


def replay(loaded: LoadedModel, windows: TokenWindows, options: SuperWeightOptions, captured: Capture,
           found: Tables, progress: bool = False) -> Tables:
    if not options.ablate:
        return {}
    return {"super_weight_ablation": super_weight_ablation(loaded, windows, found["super_weight"], progress)}


def super_weight_figure(scan: pd.DataFrame, weight: pd.DataFrame) -> go.Figure:
    """Largest |input| and |output| of each block's down-projection on a log scale (Yu et al.'s Figure 2)."""
    fig = go.Figure()
    for column, dim, name in (("max_in", "in_dim", "down_proj input"), ("max_out", "out_dim", "down_proj output")):
        fig.add_scatter(x=scan["layer"], y=scan[column], mode="lines+markers", name=name, customdata=scan[[dim]].values,
                        hovertemplate="layer %{x}<br>|x| %{y:.4g}<br>dim %{customdata[0]}<extra></extra>")
    chosen = weight.iloc[0]
    fig.add_vline(x=int(chosen["layer"]), line_dash="dot",
                  annotation_text=f"W[{chosen['row']}, {chosen['col']}] = {chosen['value']:.3g}")
    fig.update_yaxes(type="log", title_text="max |activation|")
    fig.update_xaxes(title_text="layer (MLP down-projection)")
    fig.update_layout(title="Super weight: spikes of the MLP down-projection")
    return fig


def _figures(tables: Tables) -> list[go.Figure]:
    return [super_weight_figure(tables["super_weight_scan"], tables["super_weight"])]


def _summarize(tables: Tables) -> list[str]:
    w = tables["super_weight"].iloc[0]
    line = (f"super-weights: block {w['layer']} down_proj.weight[{w['row']}, {w['col']}] = {w['value']:.4g} "
            f"(|w| rank {w['weight_rank']} in its matrix, {w['weight_ratio']:.3g}x the median |w|); its input dim "
            f"{w['col']} reaches {w['max_in']:.4g} and output dim {w['row']} reaches {w['max_out']:.4g} at position "
            f"{w['position']} ({w['token']!r})")
    lines = [line]
    if "super_weight_ablation" in tables:
        rows = tables["super_weight_ablation"].set_index("intervention")
        lines.append(f"super-weights --ablate: zeroing it moves the loss {rows.loc['none', 'loss']:.4g} -> "
                     f"{rows.loc['zero', 'loss']:.4g} ({rows.loc['zero', 'delta_loss']:+.4g})")
    return lines


def _display(tables: Tables) -> Tables:
    return {name: quoted_tokens(table) for name, table in tables.items()}


METRIC = Metric("super-weights", "super weights (Yu et al.): the down-projection weight behind the massive activation, "
                "and the loss without it", probe=probe, tables=tables, replay=replay, options=SuperWeightOptions, figures=_figures, summarize=_summarize,
                display=_display)
