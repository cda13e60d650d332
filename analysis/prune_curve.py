"""Pruning curves: loss against the number of blocks removed.

Two orders: ShortGPT's (Men et al. 2024), which removes the blocks of lowest Block
Influence measured once on the intact model, and greedy removal with recomputation,
which at each step removes the block whose removal costs least given those already gone
(as in Gromov et al. 2024 and Csordás et al. 2025).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pandas as pd
import plotly.graph_objects as go

from layerscope.analysis.block_influence import BlockInfluenceOptions, block_influence, removal_order
from layerscope.analysis.block_influence import probe as block_influence_probe
from layerscope.analysis.metric import Metric, Tables
from layerscope.analysis.plots import integer_axis
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.interventions import skip_blocks
from layerscope.probes.outlier_reducers import mean_loss
from layerscope.probes.progress import progress_bar
from layerscope.probes.replay import greedy_removal
from layerscope.probes.zoo import LoadedModel

DEFAULT_MAX_REMOVED = 4


@dataclass(frozen=True)
class PruneCurveOptions:
    max_removed: int | None = field(default=None, metadata={"min": 1, "max": 4096,
        "help": "remove up to this many blocks (default: 4, or one less than the depth)"})
    greedy: bool = field(default=True, metadata={"help": "also the greedy order with recomputation"})
    eval_tokens: int = field(default=1024, metadata={"min": 1, "max": 1_000_000,
        "help": "losses are measured on the corpus's first windows up to this many tokens"})

    def __post_init__(self):
        if self.max_removed is not None and self.max_removed < 1:
            raise UserError(f"--max-removed must be at least 1, got {self.max_removed}")


def probe(options: PruneCurveOptions, loaded: LoadedModel) -> ProbeSpec:
    """The Block Influence that orders the removals comes from the shared pass."""
    if loaded.n_layers < 2:
        raise UserError(f"a pruning curve needs at least 2 blocks; {loaded.spec.name} has {loaded.n_layers}")
    if options.max_removed is not None and options.max_removed >= loaded.n_layers:
        raise UserError(f"--max-removed {options.max_removed} must be below the depth ({loaded.n_layers})")
    if options.eval_tokens < 1:
        raise UserError(f"--eval-tokens must be positive, got {options.eval_tokens}")
    return block_influence_probe(BlockInfluenceOptions(), loaded)


def mean_ce(loaded: LoadedModel, windows: TokenWindows, removed: list[int] = ()) -> float:
    """Mean next-token cross-entropy over the windows with the `removed` blocks skipped."""
    with skip_blocks(loaded, removed):
        return mean_loss(loaded, windows)


def replay(loaded: LoadedModel, windows: TokenWindows, options: PruneCurveOptions, captured: Capture,
           found: Tables, progress: bool = False) -> Tables:
    if options.max_removed is None:
        options = replace(options, max_removed=min(DEFAULT_MAX_REMOVED, loaded.n_layers - 1))
    order = removal_order(block_influence(captured))
    windows = windows.head(options.eval_tokens)
    base = mean_ce(loaded, windows)
    rows = [{"method": "bi_order", "n_removed": 0, "removed": "", "layer_removed": -1, "ce": base}]
    for k in progress_bar(progress, range(1, options.max_removed + 1), desc="BI-order removal"):
        rows.append({"method": "bi_order", "n_removed": k, "removed": ",".join(map(str, sorted(order[:k]))),
                     "layer_removed": order[k - 1], "ce": mean_ce(loaded, windows, order[:k])})
    if options.greedy:
        rows.append({**rows[0], "method": "greedy"})
        total = sum(loaded.n_layers - k for k in range(options.max_removed)) * len(windows)
        with progress_bar(progress, total=total, desc="greedy removal") as bar:
            path = greedy_removal(loaded, windows, options.max_removed, progress=bar)
        for k, (layer, ce) in enumerate(path, start=1):
            rows.append({"method": "greedy", "n_removed": k,
                         "removed": ",".join(map(str, sorted(l for l, _ in path[:k]))), "layer_removed": layer,
                         "ce": ce})
    table = pd.DataFrame(rows)
    table["delta_ce"] = table["ce"] - base
    return {"prune_curve": table}


def figure(table: pd.DataFrame) -> go.Figure:
    fig = go.Figure()
    for method, rows in table.groupby("method", sort=False):
        fig.add_scatter(x=rows["n_removed"], y=rows["ce"], mode="lines+markers", name=method,
                        customdata=rows[["removed"]].values,
                        hovertemplate="%{x} removed: [%{customdata[0]}]<br>CE %{y:.3f}<extra></extra>")
    fig.update_layout(title="Pruning curve", xaxis_title="blocks removed", yaxis_title="cross-entropy (nats)")
    integer_axis(fig, "xaxis", table["n_removed"])
    return fig


def summarize(tables: Tables) -> list[str]:
    table = tables["prune_curve"]
    last = table.groupby("method").tail(1).set_index("method")
    parts = [f"{method} removes [{row['removed']}] for {row['delta_ce']:+.3f} CE" for method, row in last.iterrows()]
    return ["prune-curve: " + "; ".join(parts)]


METRIC = Metric("prune-curve", "loss against blocks removed, in BI order and greedily with recomputation",
                probe=probe, replay=replay, kind="replay", options=PruneCurveOptions, figures=lambda t: [figure(t["prune_curve"])],
                summarize=summarize, causal_only=True)
