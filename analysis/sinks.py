"""Attention sinks and residual sinks.

Attention sinks (Xiao et al. 2024, "Efficient Streaming Language Models with Attention
Sinks"; Gu et al. 2025, "When Attention Sink Emerges in Language Models"): per layer and
head,
- `alpha_k = sum_{t>=k} A[t,k] / (T-k)`, the mean attention that the queries able to see
  key k put on it (over all T queries in an encoder), for the first few keys;
- the sink rate, 100 x the fraction of (layer, head) pairs with `alpha_0 > eps`, taken per
  window and averaged over windows as Gu et al. do (also given for the corpus-mean alpha_0);
- the value-norm ratio `||v_0|| / mean_{t>=1} ||v_t||`: a sink key tends to carry a small
  value, so attending to it writes little.  Under grouped-query attention each query head
  reads the value of its KV head (query head h uses KV head h // (heads / kv_heads));
- the attention entropy `-sum_k A[t,k] log A[t,k]`, in nats, averaged over queries t >= 1
  (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy
  Collapse"); `entropy_uniform` is the same average for uniform attention.

Residual sinks ("A Unified View of Attention and Residual Sinks"): per block output, the
dims ranked by how often each is a token's argmax |h_td|, the mean over tokens of
`max_d |h_td| / ||h_t||`, and the weight of the norm that reads the residual (Pre-LN: the
next block's pre-attention norm, the final norm after the last block; Post-LN: the block's
own output norm) at those dims against its median |weight|.

Attention patterns need eager attention: the model is switched to it for the capture and
switched back afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from layerscope.analysis.metric import Metric, Tables, View
from layerscope.analysis.plots import integer_axis, shown_token
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.errors import UserError
from layerscope.probes.examples import PatternExample, PatternExampleResult
from layerscope.probes.outlier_reducers import AttentionSinks, AttentionSinksResult, ResidualSinks, ResidualSinksResult
from layerscope.probes.weight_edits import reading_norm_weights
from layerscope.probes.zoo import LoadedModel


@dataclass(frozen=True)
class SinkOptions:
    eps: float = field(default=0.3, metadata={"min": 0.0, "max": 1.0, "help": "a head sinks when alpha_0 > eps (Gu et al.); in (0, 1)"})
    keys: int = field(default=4, metadata={"min": 1, "max": 4096, "help": "first keys whose alpha_k is reported"})
    top_dims: int = field(default=3, metadata={"min": 1, "max": 4096, "help": "residual-sink dims reported per layer"})

    def __post_init__(self):
        if not 0 < self.eps < 1:
            raise UserError(f"eps must be in (0, 1), got {self.eps}")
        if self.keys < 1:
            raise UserError(f"keys must be at least 1, got {self.keys}")
        if self.top_dims < 1:
            raise UserError(f"top_dims must be at least 1, got {self.top_dims}")


def probe(options: SinkOptions, loaded: LoadedModel) -> ProbeSpec:
    if options.top_dims > loaded.d_model:
        raise UserError(f"top_dims {options.top_dims} is above d_model ({loaded.d_model}) of {loaded.spec.name}")
    if options.keys > loaded.max_context:
        raise UserError(f"keys {options.keys} is above the context ({loaded.max_context}) of {loaded.spec.name}")
    return ProbeSpec((AttentionSinks(eps=options.eps), ResidualSinks(), PatternExample()))


def kv_head_of(n_heads: int, n_kv_heads: int) -> list[int]:
    """The KV head each query head reads under grouped-query attention."""
    if n_heads % n_kv_heads:
        raise UserError(f"{n_heads} query heads do not split evenly over {n_kv_heads} KV heads")
    return [h // (n_heads // n_kv_heads) for h in range(n_heads)]


def uniform_entropy(length: int, causal: bool) -> float:
    """Mean over queries t >= 1 of the entropy of uniform attention: log(t+1) causal, log T otherwise."""
    if length < 2:
        return 0.0
    return float(np.mean(np.log(np.arange(2, length + 1)))) if causal else math.log(length)


@torch.no_grad()
def sink_heads(capture: Capture, n_kv_heads: int) -> pd.DataFrame:
    """One row per (layer, head): `kv_head`, `alpha_0`, `sink_fraction` (windows where
    alpha_0 > eps), `sinking` (corpus-mean alpha_0 > eps), `entropy`, and the value norms
    of the head's KV head at position 0 and elsewhere with their ratio."""
    result: AttentionSinksResult = capture["attention_sinks"]
    n_layers, n_heads = result.sink_fraction.shape
    kv = kv_head_of(n_heads, n_kv_heads)
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            first = result.value_norm_first[layer, kv[head]].item()
            rest = result.value_norm_rest[layer, kv[head]].item()
            alpha_0 = result.alpha[layer, head, 0].item()
            rows.append({"layer": layer, "head": head, "kv_head": kv[head], "alpha_0": alpha_0,
                         "sink_fraction": result.sink_fraction[layer, head].item(),
                         "sinking": alpha_0 > result.eps, "entropy": result.entropy[layer, head].item(),
                         "value_norm_first": first, "value_norm_rest": rest,
                         "value_norm_ratio": first / rest if rest else float("nan")})
    return pd.DataFrame(rows)


@torch.no_grad()
def sink_alpha(capture: Capture, keys: int = 4) -> pd.DataFrame:
    """One row per (layer, head, key) for the first `keys` keys: `alpha` = alpha_k of Gu et al."""
    alpha = capture["attention_sinks"].alpha[..., :keys]
    layers, heads, key = np.meshgrid(*(np.arange(n) for n in alpha.shape), indexing="ij")
    return pd.DataFrame({"layer": layers.ravel(), "head": heads.ravel(), "key": key.ravel(),
                         "alpha": alpha.numpy().ravel()})


def sink_summary(heads: pd.DataFrame, eps: float, windows: int, length: int, causal: bool) -> pd.DataFrame:
    """The model's sink rate (per window, averaged; and of the corpus-mean alpha_0), with context."""
    return pd.DataFrame([{
        "eps": eps, "sink_rate": 100 * heads["sink_fraction"].mean(),
        "sink_rate_of_mean_alpha": 100 * heads["sinking"].mean(), "layers": heads["layer"].nunique(),
        "heads": heads["head"].nunique(), "windows": windows, "length": length,
        "mean_entropy": heads["entropy"].mean(), "entropy_uniform": uniform_entropy(length, causal),
        "median_value_norm_ratio": heads["value_norm_ratio"].median(),
    }])


@torch.no_grad()
def residual_sinks(capture: Capture, norm_weights: list[tuple[str, torch.Tensor | None]],
                   top_dims: int = 3) -> pd.DataFrame:
    """One row per (layer, rank) for the `top_dims` dims most often a token's argmax |h|:
    `argmax_share`, the layer's `mean_max_share` (mean_t max_d|h_td| / ||h_t||), and the
    reading norm's weight at that dim against the norm's median |weight|."""
    result: ResidualSinksResult = capture["residual_sinks"]
    counts = result.argmax_counts
    rows = []
    for layer in range(counts.shape[0]):
        path, weight = norm_weights[layer]
        median = weight.abs().median().item() if weight is not None else float("nan")
        shares, dims = (counts[layer].double() / max(result.tokens, 1)).topk(top_dims)
        for rank, (share, dim) in enumerate(zip(shares.tolist(), dims.tolist()), start=1):
            w = weight[dim].item() if weight is not None else float("nan")
            rows.append({"layer": layer, "rank": rank, "dim": dim, "argmax_share": share,
                         "mean_max_share": result.mean_share[layer].item(), "norm": path, "norm_weight": w,
                         "norm_median_weight": median, "weight_ratio": abs(w) / median if median else float("nan")})
    return pd.DataFrame(rows)


def tables(captured: Capture, loaded: LoadedModel, options: SinkOptions) -> Tables:
    result: AttentionSinksResult = captured["attention_sinks"]
    heads = sink_heads(captured, loaded.n_kv_heads)
    return {"sink_summary": sink_summary(heads, options.eps, result.windows, result.length, loaded.adapter.causal),
            "sink_heads": heads, "sink_alpha": sink_alpha(captured, options.keys),
            "residual_sinks": residual_sinks(captured, reading_norm_weights(loaded), options.top_dims),
            **pattern_tables(captured["pattern_example"], loaded.tokenizer.decode, loaded.adapter.causal)}


def pattern_tables(example: PatternExampleResult | None, decode, causal: bool) -> Tables:
    """The first window's attention patterns: `attention_pattern`, one row per (layer, head,
    query, key) that the query can see, with its weight; `pattern_tokens`, each position's token."""
    if example is None:
        return {}
    pattern = example.pattern
    n_layers, n_heads, t, _ = pattern.shape
    layer, head, query, key = np.meshgrid(*(np.arange(n) for n in pattern.shape), indexing="ij")
    seen = (key <= query) if causal else np.ones_like(key, dtype=bool)
    frame = pd.DataFrame({"layer": layer[seen].astype(np.int16), "head": head[seen].astype(np.int16),
                          "query": query[seen].astype(np.int16), "key": key[seen].astype(np.int16),
                          "weight": pattern.numpy()[seen].astype(np.float32)})
    tokens = pd.DataFrame({"position": range(t), "token": [decode([i]) for i in example.input_ids.tolist()]})
    return {"attention_pattern": frame, "pattern_tokens": tokens}


def sinks_figure(heads: pd.DataFrame) -> go.Figure:
    """Heatmaps over layer and head: alpha_0, value-norm ratio and attention entropy, each
    with its own colour bar."""
    panels = (("alpha_0", "alpha_0 (mass on key 0)"), ("value_norm_ratio", "||v_0|| / mean ||v||"),
              ("entropy", "attention entropy (nats)"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[title for _, title in panels], horizontal_spacing=0.11)
    for col, (column, _) in enumerate(panels, start=1):
        grid = heads.pivot(index="layer", columns="head", values=column)
        right = fig.layout[f"xaxis{col if col > 1 else ''}"].domain[1]
        # Each panel's own colour bar, just right of it; the panel's title names the value.
        fig.add_heatmap(z=grid.values, x=grid.columns, y=grid.index, row=1, col=col, colorscale="Viridis",
                        colorbar={"x": right + 0.005, "xanchor": "left", "thickness": 10, "len": 0.9,
                                  "tickfont": {"size": 10}},
                        hovertemplate=f"layer %{{y}}, head %{{x}}<br>{column} %{{z:.3g}}<extra></extra>")
        fig.update_xaxes(title_text="head", row=1, col=col, dtick=1)
        fig.update_yaxes(title_text="layer" if col == 1 else None, row=1, col=col, dtick=2 if len(grid) > 16 else 1)
    fig.update_layout(title="Attention sinks per head", height=max(380, 140 + 16 * heads["layer"].nunique()))
    return fig


def pattern_figure(pattern: pd.DataFrame, tokens: pd.DataFrame, layer: int, head: int) -> go.Figure:
    """One head's attention pattern on the first window, query by key, as in Gu et al.'s
    and CircuitsVis' figures: the sink is the bright column at key 0."""
    rows = pattern[(pattern["layer"] == layer) & (pattern["head"] == head)]
    grid = rows.pivot(index="query", columns="key", values="weight")
    labels = [f"{p}: {shown_token(t)}" for p, t in zip(tokens["position"], tokens["token"])]
    n = len(labels)
    full = np.full((n, n), np.nan)
    full[np.ix_(grid.index, grid.columns)] = grid.values
    text = np.array([[f"{labels[q]} \u2192 {labels[k]}" for k in range(n)] for q in range(n)])
    sink = float(np.nanmean(full[1:, 0])) if n > 1 else float(full[0, 0])
    fig = go.Figure(go.Heatmap(z=full, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1, customdata=text,
                               colorbar={"title": "attention"}, xgap=1, ygap=1,
                               hovertemplate="query %{customdata}<br>weight %{z:.3f}<extra></extra>"))
    fig.add_shape(type="rect", xref="x", yref="paper", x0=-0.5, x1=0.5, y0=0, y1=1,
                  line={"color": "#d62728", "width": 2})
    fig.add_annotation(x=0, y=1, xref="x", yref="paper", yanchor="bottom", showarrow=False,
                       text=f"sink column: key 0, mean weight {sink:.2f}", font={"color": "#d62728", "size": 12},
                       xanchor="left")
    side = max(480, 160 + 16 * n)
    fig.update_layout(title=f"Attention pattern of layer {layer}, head {head} (first window)",
                      xaxis={"title": "key position: token", "tickangle": -60, "tickfont": {"size": 10},
                             "side": "bottom"},
                      yaxis={"title": "query position: token", "autorange": "reversed", "tickfont": {"size": 10}},
                      height=side + 60)
    return fig


def _pattern_controls(tables: Tables) -> dict:
    heads = tables["sink_heads"]
    heaviest = heads.loc[heads["alpha_0"].idxmax()]
    return {"layer": (sorted(heads["layer"].unique().tolist()), int(heaviest["layer"])),
            "head": (sorted(heads["head"].unique().tolist()), int(heaviest["head"]))}


PATTERN_VIEW = View("attention pattern of one head", _pattern_controls,
                    lambda tables, layer, head: pattern_figure(tables["attention_pattern"], tables["pattern_tokens"],
                                                               layer, head),
                    needs=("attention_pattern", "pattern_tokens", "sink_heads"))


def residual_sinks_figure(sinks: pd.DataFrame) -> go.Figure:
    """Per layer: the share of tokens whose argmax |h| is the top dim, and mean max|h|/||h||."""
    top = sinks[sinks["rank"] == 1]
    fig = go.Figure()
    fig.add_scatter(x=top["layer"], y=top["argmax_share"], mode="lines+markers", name="share of tokens, top dim",
                    customdata=top[["dim", "weight_ratio"]].values,
                    hovertemplate="layer %{x}<br>share %{y:.2f}<br>dim %{customdata[0]}<br>"
                                  "norm |w| / median %{customdata[1]:.3g}<extra></extra>")
    fig.add_scatter(x=top["layer"], y=top["mean_max_share"], mode="lines", name="mean max|h| / ||h||")
    fig.update_xaxes(title_text="layer (block output)")
    fig.update_yaxes(range=[0, 1], title_text="share", tickformat=".0%")
    fig.update_layout(title="Residual sinks")
    integer_axis(fig, "xaxis", top["layer"])
    return fig


def _figures(tables: Tables) -> list[go.Figure]:
    return [sinks_figure(tables["sink_heads"]), residual_sinks_figure(tables["residual_sinks"])]


def _summarize(tables: Tables) -> list[str]:
    summary = tables["sink_summary"].iloc[0]
    heads = tables["sink_heads"]
    top = tables["residual_sinks"].query("rank == 1")
    dim_counts = top["dim"].value_counts()
    mine = top[top["dim"] == dim_counts.index[0]]
    strongest = mine.loc[mine["argmax_share"].idxmax()]
    return [
        f"sinks: sink rate {summary['sink_rate']:.3g}% of {int(summary['layers'])}x{int(summary['heads'])} heads "
        f"(alpha_0 > {summary['eps']:g}, per window); median alpha_0 {heads['alpha_0'].median():.3g}; median "
        f"||v_0||/mean||v|| {summary['median_value_norm_ratio']:.3g}; mean attention entropy "
        f"{summary['mean_entropy']:.3g} nats (uniform {summary['entropy_uniform']:.3g})",
        f"sinks: top residual-sink dim {dim_counts.index[0]} (the argmax |h| dim in {dim_counts.iloc[0]} of "
        f"{len(top)} block outputs; at block {strongest['layer']} it is the argmax for {strongest['argmax_share']:.0%} "
        f"of tokens, mean max|h|/||h|| {strongest['mean_max_share']:.2f}, norm weight {strongest['norm_weight']:.3g} "
        f"vs median {strongest['norm_median_weight']:.3g})",
    ]


def _display(tables: Tables) -> Tables:
    heads = tables["sink_heads"]
    per_layer = heads.groupby("layer", as_index=False).agg(
        alpha_0=("alpha_0", "mean"), sink_rate=("sink_fraction", lambda s: 100 * s.mean()),
        entropy=("entropy", "mean"), value_norm_ratio=("value_norm_ratio", "mean"))
    return {"sink_summary": tables["sink_summary"],
            "sinks per layer (mean over heads; --format json for every head and key)": per_layer,
            "residual_sinks (top dim per layer)": tables["residual_sinks"].query("rank == 1").drop(columns=["rank"])}


METRIC = Metric("sinks", "attention sinks (alpha_k and sink rate of Gu et al., value-norm ratio, entropy) and "
                "residual sinks", probe=probe, tables=tables, options=SinkOptions, figures=_figures, views=(PATTERN_VIEW,), summarize=_summarize,
                display=_display)
