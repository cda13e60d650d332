"""Figure builders: tidy DataFrame in, plotly Figure out.  No model runs here."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def residual_stats_figure(table: pd.DataFrame, point: str = "resid_post") -> go.Figure:
    """Mean norm, std and max|x| of one residual point against depth, on a log scale."""
    rows = table[table["point"] == point].sort_values("layer")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean L2 norm and std", "max |activation|"))
    fig.add_scatter(x=rows["layer"], y=rows["mean_norm"], name="mean norm", row=1, col=1)
    fig.add_scatter(x=rows["layer"], y=rows["std"], name="std", row=1, col=1)
    fig.add_scatter(x=rows["layer"], y=rows["max_abs"], name="max |x|", row=1, col=2,
                    customdata=rows[["max_position", "max_dim", "max_token"]].astype(str).values,
                    hovertemplate="layer %{x}<br>max |x| %{y:.1f}<br>position %{customdata[0]}, "
                                  "dim %{customdata[1]}<br>token %{customdata[2]}<extra></extra>")
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title=f"Residual stream ({point}) by depth")
    return fig


FIGURES = {"residual_stats": residual_stats_figure}
