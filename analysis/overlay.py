"""Two runs of the same measurement side by side: their figures overlaid (two models, or
two norm placements), and their tables subtracted row by row."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go

from layerscope.analysis.plots import integer_axis
from layerscope.probes.errors import UserError

# Heatmaps and images cannot share axes with a second run's; those are shown side by side.
OVERLAYABLE = {"scatter", "scattergl", "bar"}


def measurements_of(run: dict) -> set[str]:
    """The measurements a row of the run list holds (a survey holds several)."""
    return set(run.get("metrics") or [run["metric"]])


def partner_run(runs: list[dict], first: str) -> str | None:
    """The run Compare puts beside `first` unless told otherwise: the first other run in
    `runs` (the run list, newest first) that shares a measurement with it; None if none does."""
    chosen = next(run for run in runs if run["run_id"] == first)
    return next((run["run_id"] for run in runs
                 if run["run_id"] != first and measurements_of(run) & measurements_of(chosen)), None)


def can_overlay(first: go.Figure, second: go.Figure) -> bool:
    return all(trace.type in OVERLAYABLE for trace in (*first.data, *second.data))


def overlay(first: go.Figure, second: go.Figure, first_label: str, second_label: str) -> go.Figure:
    """One figure with both runs' traces on the same axes: the second run dashed or hatched."""
    if not can_overlay(first, second):
        raise ValueError("only line and bar figures can be overlaid")
    merged = go.Figure(first)
    for trace in merged.data:
        trace.update(name=f"{trace.name or trace.type} · {first_label}", legendgroup=first_label,
                     showlegend=True)
    for source in second.data:
        merged.add_trace(source.to_plotly_json())
        added = merged.data[-1]
        added.update(name=f"{source.name or source.type} · {second_label}", legendgroup=second_label,
                     showlegend=True)
        if added.type == "bar":
            added.update(marker_pattern_shape="/")
        else:
            added.update(line_dash="dash")
    title = first.layout.title.text or ""
    merged.update_layout(title=f"{title} — {first_label} vs {second_label}", barmode="group")
    return merged


@dataclass(frozen=True)
class Difference:
    """Two runs' table of the same name, row against matching row: `keys` are the columns
    that name a row, and every other numeric column shared by both holds second minus first."""

    keys: tuple[str, ...]
    table: pd.DataFrame

    @property
    def columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in self.keys]


def _numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def row_keys(table: pd.DataFrame) -> tuple[str, ...]:
    """The shortest run of leading columns, none of them floats, that names every row once
    (`layer`; `method, n_removed`; `layer, head`); () when there is none."""
    keys: list[str] = []
    for column in table.columns:
        if pd.api.types.is_float_dtype(table[column]) or pd.api.types.is_bool_dtype(table[column]):
            break
        keys.append(column)
        if not table.duplicated(keys).any():
            return tuple(keys)
    return ()


def difference(first: pd.DataFrame, second: pd.DataFrame) -> Difference:
    """`second - first` for every numeric column the two tables share, on the rows whose
    keys (`row_keys` of the first) both tables hold.  A table whose rows no column names (a
    one-row summary) is matched row by row when both have as many rows."""
    keys = row_keys(first)
    if keys and (set(keys) - set(second.columns) or second.duplicated(list(keys)).any()):
        raise UserError(f"the second table's rows are not named by {', '.join(keys)} as the first's are")
    if not keys:
        if len(first) != len(second):
            raise UserError(f"these tables have no column that names their rows and differ in length "
                            f"({len(first)} and {len(second)} rows)")
        first, second = first.reset_index(names="row"), second.reset_index(names="row")
        keys = ("row",)
    values = [c for c in first.columns if c not in keys and c in second and _numeric(first[c]) and _numeric(second[c])]
    if not values:
        raise UserError("these tables share no numeric column to subtract")
    joined = first[[*keys, *values]].merge(second[[*keys, *values]], on=list(keys), suffixes=("_first", "_second"))
    if joined.empty:
        raise UserError(f"the two tables have no row in common on {', '.join(keys)}")
    table = joined[list(keys)].copy()
    for column in values:
        table[column] = joined[f"{column}_second"].astype(float) - joined[f"{column}_first"].astype(float)
    return Difference(tuple(keys), table)


def difference_figure(diff: Difference, column: str, title: str) -> go.Figure:
    """One column of a difference: lines against the last key (a layer, a count) with one
    line per value of the keys before it, or bars when the last key is not a number."""
    fig = go.Figure()
    *groups, along = diff.keys
    table = diff.table
    if not _numeric(table[along]):
        fig.add_bar(x=table[list(diff.keys)].astype(str).agg(" · ".join, axis=1), y=table[column], name=column,
                    hovertemplate="%{x}<br>difference %{y:.4g}<extra></extra>")
    else:
        parts = table.groupby(groups, sort=False) if groups else [((), table)]
        for group, rows in parts:
            label = " · ".join(map(str, group if isinstance(group, tuple) else (group,))) or column
            fig.add_scatter(x=rows[along], y=rows[column], mode="lines+markers", name=label,
                            hovertemplate=f"{along} %{{x}}<br>difference %{{y:.4g}}<extra>{label}</extra>")
        integer_axis(fig, "xaxis", table[along].dropna())
    fig.add_hline(y=0, line={"color": "grey", "width": 1})
    fig.update_layout(title=title, xaxis_title=along.replace("_", " "), yaxis_title=f"difference in {column}",
                      showlegend=bool(groups))
    return fig
