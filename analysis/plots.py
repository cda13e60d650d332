"""Figure builders: tidy DataFrame in, plotly Figure out.  No model runs here.

`themed` is the one look of every figure, in the app, the report and notebooks: axis
titles that fit, titles wrapped to the figure's width, log axes labelled at whole decades
only, and integer ticks on axes that count layers or blocks.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
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
    fig.update_yaxes(type="log", title_text="magnitude", row=1, col=1)
    fig.update_yaxes(type="log", title_text="max |activation|", row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title=f"Residual stream ({point}) by depth")
    return fig


TITLE_CHARS = 90
FONT = {"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 13}
COMPONENT_COLOURS = {"embed": "#636efa", "attn": "#ef553b", "mlp": "#00cc96", "bias": "#ab63fa"}


def wrapped_title(text: str, width: int = TITLE_CHARS) -> str:
    """A long title broken into lines, so that none is cut off at the figure's right edge."""
    if "<br>" in text or len(text) <= width:
        return text
    return "<br>".join(textwrap.wrap(text, width))


def shown_token(token) -> str:
    """A token as a person can read it: quoted, with spaces, tabs and newlines made visible,
    so that " the" and "the" differ and a whitespace token is not empty."""
    text = str(token)
    return '"' + text.replace(" ", "\u2423").replace("\t", "\u2192").replace("\n", "\u21b5") + '"'


def is_token_column(name: str) -> bool:
    """Whether a table column holds token texts: `token`, `target` (DLA's target token) or `*_token`."""
    return name in ("token", "target") or name.endswith("_token")


def quoted_tokens(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every token-text column's strings as `shown_token` writes them; other
    values (numbers, missing) are left as they are."""
    quoted = {name: table[name].map(lambda v: shown_token(v) if isinstance(v, str) else v)
              for name in table.columns if isinstance(name, str) and is_token_column(name)}
    return table.assign(**quoted) if quoted else table


def _axis_values(fig: go.Figure, axis: str) -> np.ndarray:
    """Every number plotted against one layout axis ("yaxis", "yaxis2", ...)."""
    letter = axis[0]
    values = []
    for trace in fig.data:
        ref = getattr(trace, f"{letter}axis", None) or letter
        if ref.replace(letter, f"{letter}axis", 1) == axis and getattr(trace, letter, None) is not None:
            data = np.asarray(getattr(trace, letter), dtype=object).ravel()
            values.append(pd.to_numeric(pd.Series(data), errors="coerce").to_numpy(dtype=float))
    return np.concatenate(values) if values else np.array([])


def _decade_ticks(fig: go.Figure, axis: str) -> None:
    """A log axis labelled with numbers a reader can take at face value: powers of ten
    when the values span more than three decades, else 1-2-5 steps (or every digit)
    inside their range.  Plotly's own choice labels the minor ticks 2 and 5 with bare digits,
    which read as values."""
    values = _axis_values(fig, axis)
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return
    low, high = float(values.min()), float(values.max())
    if math.log10(high / low) > 3:
        fig.layout[axis].update(dtick=1, exponentformat="power", showexponent="all")
        return
    decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
    for mantissas in ((1, 2, 5), range(1, 10)):
        # Plotly pads the range a little beyond the data; a tick there is still drawn.
        ticks = [m * 10.0 ** k for k in decades for m in mantissas if low / 1.25 <= m * 10.0 ** k <= high * 1.25]
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:
        ticks = [low, high]
    fig.layout[axis].update(tickmode="array", tickvals=ticks, ticktext=[f"{t:,.0f}" if t >= 1000 else f"{t:.3g}" for t in ticks])


def themed(fig: go.Figure) -> go.Figure:
    """The shared look, applied in place and returned."""
    title = fig.layout.title.text or ""
    lines = wrapped_title(title).count("<br>") + 1
    fig.update_layout(template="plotly_white", font=FONT, title={"text": wrapped_title(title), "x": 0.01,
                                                                  "xanchor": "left", "font": {"size": 15}},
                      margin={"t": 50 + 20 * lines, "l": 70, "r": 30, "b": 60}, hoverlabel={"font_size": 12},
                      legend={"orientation": "v", "yanchor": "top", "y": 1, "xanchor": "left",
                              # clear of a right-hand axis's tick labels and title
                              "x": 1.12 if fig.layout.to_plotly_json().get("yaxis2", {}).get("side") == "right" else 1.02})
    for axis in [name for name in fig.layout if name.startswith(("xaxis", "yaxis"))]:
        layout_axis = fig.layout[axis]
        layout_axis.update(automargin=True)
        if layout_axis.type == "log":
            _decade_ticks(fig, axis)
    return fig


def integer_axis(fig: go.Figure, axis: str = "xaxis", values=None) -> None:
    """Whole-number ticks for an axis that counts (layers, blocks removed): never 0.5."""
    count = len(set(values)) if values is not None else None
    step = 1 if count is None or count <= 32 else math.ceil(count / 32)
    fig.layout[axis].update(tickmode="linear", tick0=0, dtick=step, tickformat="d")
    if values is not None and count:
        # Just past the first and last value: plotly's own padding can reach one more tick.
        low, high = float(min(values)), float(max(values))
        reversed_axis = fig.layout[axis].autorange == "reversed"
        fig.layout[axis].update(range=[high + 0.6, low - 0.6] if reversed_axis else [low - 0.6, high + 0.6],
                                autorange=False)


FIGURES = {"residual_stats": residual_stats_figure}
