"""Overlay the same figure from two runs, for example two models or two norm placements."""

from __future__ import annotations

import plotly.graph_objects as go

# Heatmaps and images cannot share axes with a second run's; those are shown side by side.
OVERLAYABLE = {"scatter", "scattergl", "bar"}


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
