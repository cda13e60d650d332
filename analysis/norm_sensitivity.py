"""Norm sensitivity: what freezing each normalisation layer at its average scale costs,
with no fine-tuning (Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning";
Baroni et al. 2025, "Transformers Don't Need LayerNorm at Inference Time").

For every norm (each block's pre-attention `ln1`, pre-MLP `ln2`, post-sublayer norms where
the family has them, and the final norm), frozen alone at its mean scale over non-first
positions: the change in next-token cross-entropy and the KL from the full model's
distribution, once with that one scale at every position and once with position 0 (the
BOS/sink token) given its own mean scale.  Also every norm of one kind frozen at once,
and the per-token spread of each norm's scale (99th over 1st percentile over non-first
positions), which says how far one constant is from what the norm divides by.  A norm
whose input has the same scale at every token does no non-linear work: freezing it
changes nothing.  Encoders get the relative change of the final residual instead of
CE and KL (so a norm in the masked-LM head, after the final residual, shows none).

It tells which norms LN removal has to work hardest on, and `ln-removal --order
sensitivity` removes the least sensitive first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from tqdm.auto import tqdm

from layerscope.analysis.metric import Metric, Tables
from layerscope.probes.capture import Capture
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.norm_sweep import (VARIANTS, FreezeSweep, ScaleStats, freeze_sweep, kind_groups,
                                          measure_scales, site_kind, site_layer)
from layerscope.probes.norms import require_norms
from layerscope.probes.zoo import LoadedModel


@dataclass(frozen=True)
class NormSensitivityOptions:
    groups: bool = field(default=True, metadata={"help": "also freeze every norm of one kind at once"})


def sensitivity_tables(stats: ScaleStats, sweep: FreezeSweep, layers: list[int | None], causal: bool) -> Tables:
    """`norm_sensitivity`: one row per norm; `norm_sensitivity_groups`: one row per kind
    frozen at once.  Means are per next-token position."""
    n, k = sweep.tokens, len(stats.sites)
    ce_full = sweep.ce_full / n
    p1, p99 = stats.percentile(1), stats.percentile(99)
    suffix = {"shared": "", "own_first": "_own_first"}

    def measured(index: list[int]) -> dict:
        out = {}
        for variant in VARIANTS:
            s = suffix[variant]
            if causal:
                out[f"delta_ce{s}"] = [sweep.ce[variant][i] / n - ce_full for i in index]
                out[f"kl{s}"] = [sweep.kl[variant][i] / n for i in index]
                out[f"top1_agreement{s}"] = [sweep.agree[variant][i] / n for i in index]
            out[f"final_change{s}"] = [sweep.final_change[variant][i] / n for i in index]
        return out

    table = pd.DataFrame({
        "role": [site.role for site in stats.sites],
        "kind": [site_kind(site) for site in stats.sites],
        "layer": pd.array(layers, dtype="Int64"),
        "path": [site.path for site in stats.sites],
        "scale": stats.mean_rest,
        "scale_first": stats.mean_first,
        "scale_p1": p1,
        "scale_p99": p99,
        "spread_p99_p1": [b / a for a, b in zip(p1, p99)],
        **({"ce_full": ce_full} if causal else {}),
        **measured(list(range(k))),
    })
    group_index = list(range(k, len(sweep.items)))
    groups = pd.DataFrame({
        "kind": [sweep.items[i].removeprefix("all ") for i in group_index],
        **measured(group_index),
    })
    return {"norm_sensitivity": table, "norm_sensitivity_groups": groups}


def replay(loaded: LoadedModel, windows: TokenWindows, options: NormSensitivityOptions, captured: Capture | None,
           found: Tables, progress: bool = False) -> Tables:
    sites = require_norms(loaded)
    stats = measure_scales(loaded, windows, sites)
    groups = kind_groups(loaded, sites) if options.groups else {}
    total = len(windows) * (len(sites) + len(groups)) * len(VARIANTS)
    with tqdm(total=total, disable=not progress, unit="freeze", desc="norm sensitivity") as bar:
        sweep = freeze_sweep(loaded, windows, stats, groups, progress=bar)
    layers = [site_layer(loaded, site) for site in sites]
    return sensitivity_tables(stats, sweep, layers, loaded.adapter.causal)


def _value(table: pd.DataFrame) -> str:
    return "kl_own_first" if "kl_own_first" in table else "final_change_own_first"


def heatmap_figure(table: pd.DataFrame, value: str | None = None) -> go.Figure:
    """Norm kind x layer: the cost of freezing that norm alone (log10 colour scale)."""
    value = value or _value(table)
    cells = table.assign(column=table["layer"].astype("object").where(table["layer"].notna(), "final/other"))
    kinds = list(dict.fromkeys(cells["kind"]))
    columns = list(dict.fromkeys(sorted([c for c in cells["column"] if c != "final/other"])
                                 + [c for c in cells["column"] if c == "final/other"]))
    z = np.full((len(kinds), len(columns)), np.nan)
    text = np.full((len(kinds), len(columns)), "", dtype=object)
    for row in cells.itertuples():
        r, c = kinds.index(row.kind), columns.index(row.column)
        v = getattr(row, value)
        z[r, c] = np.log10(max(v, 1e-12)) if np.isfinite(v) else np.nan
        extra = f"<br>delta CE {row.delta_ce_own_first:+.4f}" if hasattr(row, "delta_ce_own_first") else ""
        text[r, c] = f"{row.role}<br>{value} {v:.4g}{extra}<br>scale spread p99/p1 {row.spread_p99_p1:.3g}"
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in columns], y=kinds, text=text, colorscale="Viridis",
                               hovertemplate="%{text}<extra></extra>", colorbar={"title": f"log10 {value}"}))
    fig.update_layout(title=f"Freezing one norm at its mean scale (position 0 its own): {value}",
                      xaxis_title="layer", yaxis_title="norm", xaxis={"type": "category"})
    return fig


def spread_figure(table: pd.DataFrame) -> go.Figure:
    """Per norm, the 99th over 1st percentile of its per-token scale."""
    fig = go.Figure()
    for kind, rows in table.groupby("kind", sort=False):
        fig.add_scatter(x=rows["layer"].astype("float"), y=rows["spread_p99_p1"], name=kind, mode="lines+markers")
    fig.update_layout(title="Per-token spread of each norm's scale (p99 / p1, non-first positions)",
                      xaxis_title="layer", yaxis_title="p99 / p1", yaxis_type="log")
    return fig


def figures(tables: Tables) -> list[go.Figure]:
    return [heatmap_figure(tables["norm_sensitivity"]), spread_figure(tables["norm_sensitivity"])]


def summarize(tables: Tables) -> list[str]:
    table = tables["norm_sensitivity"]
    value = _value(table)
    worst = table.sort_values(value, ascending=False, na_position="first").head(3)
    named = ", ".join(f"{row.role} ({value} {getattr(row, value):.3g})" for row in worst.itertuples())
    widest = table.loc[table["spread_p99_p1"].idxmax()]
    lines = [f"norm-sensitivity: most sensitive alone: {named}; widest scale spread: {widest['role']} "
             f"(p99/p1 {widest['spread_p99_p1']:.3g})"]
    if "kl" in table:
        gain = (table["kl"] - table["kl_own_first"]).median()
        lines.append(f"norm-sensitivity: position 0's own scale lowers the median KL by {gain:.3g}")
    groups = tables.get("norm_sensitivity_groups")
    if groups is not None and len(groups):
        column = "delta_ce_own_first" if "delta_ce_own_first" in groups else "final_change_own_first"
        lines.append("norm-sensitivity: every norm of a kind frozen at once: " + ", ".join(
            f"{row.kind} {column} {getattr(row, column):+.3g}" for row in groups.itertuples()))
    return lines


def display(tables: Tables) -> Tables:
    """What the CLI prints: per norm, its scale, spread and what freezing it costs."""
    table = tables["norm_sensitivity"]
    costs = [c for c in ("delta_ce", "kl", "delta_ce_own_first", "kl_own_first") if c in table] or [
        "final_change", "final_change_own_first"]
    return {"norm_sensitivity": table[["role", "scale", "scale_first", "spread_p99_p1", *costs]],
            **{k: v for k, v in tables.items() if k != "norm_sensitivity"}}


METRIC = Metric("norm-sensitivity", "cost of freezing each norm alone at its mean scale, and its scale spread",
                replay=replay, kind="replay", options=NormSensitivityOptions, figures=figures, summarize=summarize,
                display=display)
