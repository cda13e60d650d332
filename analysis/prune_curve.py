"""Pruning curves: loss against the number of blocks removed.

Two orders: ShortGPT's (Men et al. 2024), which removes the blocks of lowest Block
Influence measured once on the intact model, and greedy removal with recomputation,
which at each step removes the block whose removal costs least given those already gone
(as in Gromov et al. 2024 and Csordás et al. 2025).

Greedy removal fits its order to the loss it is scored on, so an in-sample curve flatters
it.  The evaluated windows are therefore split: the order is chosen on the first ones (`ce`,
`delta_ce`) and both orders are scored again on the last `heldout` share (`heldout_ce`,
`heldout_delta_ce`), which neither order has seen.  The BI order needs no split: Block
Influence reads cosines of the residual stream, never the next token, so it is read from
the shared pass over the whole corpus.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import DEFAULT_PLOTLY_COLORS as PALETTE

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
# A held-out mean cross-entropy over fewer next-token positions than this moves by more than
# the differences between orders (on SmolLM2, 31 tokens gave a greedy gain of 0.5 nats).
MIN_HELDOUT_TOKENS = 256


@dataclass(frozen=True)
class PruneCurveOptions:
    max_removed: int | None = field(default=None, metadata={"min": 1, "max": 4096,
        "help": "remove up to this many blocks (default: 4, or one less than the depth)"})
    greedy: bool = field(default=True, metadata={"help": "also the greedy order with recomputation"})
    eval_tokens: int = field(default=1024, metadata={"min": 1, "max": 1_000_000,
        "help": "losses are measured on the corpus's first windows up to this many tokens"})
    heldout: float = field(default=0.25, metadata={"min": 0.0, "max": 0.5,
        "help": "share of those windows, the last ones, held out to score the orders on (0: none, in-sample only)"})

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


def split_windows(windows: TokenWindows, heldout: float) -> tuple[TokenWindows, TokenWindows | None]:
    """The windows the orders are chosen on and the last `heldout` share they are scored on:
    at least one window each when there are two or more, and no held-out part from one."""
    n = windows.input_ids.shape[0]
    held = min(n - 1, math.ceil(n * heldout)) if heldout > 0 else 0
    if held == 0:
        return windows, None
    return (replace(windows, input_ids=windows.input_ids[:n - held]),
            replace(windows, input_ids=windows.input_ids[n - held:]))


def next_token_positions(windows: TokenWindows | None) -> int:
    return 0 if windows is None else windows.input_ids.shape[0] * (windows.input_ids.shape[1] - 1)


def heldout_warning(heldout_tokens: int) -> str | None:
    """Why the held-out score means little, or None when it has enough tokens."""
    if heldout_tokens >= MIN_HELDOUT_TOKENS:
        return None
    if heldout_tokens == 0:
        return "no held-out windows: the pruning curve is scored only on the windows that chose it"
    return (f"the held-out part has {heldout_tokens} next-token positions, fewer than {MIN_HELDOUT_TOKENS}: "
            "its score is noise")


def replay(loaded: LoadedModel, windows: TokenWindows, options: PruneCurveOptions, captured: Capture,
           found: Tables, progress: bool = False) -> Tables:
    if options.max_removed is None:
        options = replace(options, max_removed=min(DEFAULT_MAX_REMOVED, loaded.n_layers - 1))
    order = removal_order(block_influence(captured))
    chosen_on, heldout = split_windows(windows.head(options.eval_tokens), options.heldout)
    warning = heldout_warning(next_token_positions(heldout))
    if warning and options.heldout > 0:
        warnings.warn(f"{warning} (raise --eval-tokens, the corpus's tokens or --heldout, now {options.heldout:g})",
                      stacklevel=1)  # attributed here, where the CLI shows its own
    base = mean_ce(loaded, chosen_on)
    rows = [{"method": "bi_order", "n_removed": 0, "removed": [], "layer_removed": -1, "ce": base}]
    for k in progress_bar(progress, range(1, options.max_removed + 1), desc="BI-order removal"):
        rows.append({"method": "bi_order", "n_removed": k, "removed": order[:k],
                     "layer_removed": order[k - 1], "ce": mean_ce(loaded, chosen_on, order[:k])})
    if options.greedy:
        rows.append({**rows[0], "method": "greedy"})
        total = sum(loaded.n_layers - k for k in range(options.max_removed)) * len(chosen_on)
        with progress_bar(progress, total=total, desc="greedy removal") as bar:
            path = greedy_removal(loaded, chosen_on, options.max_removed, progress=bar)
        for k, (layer, ce) in enumerate(path, start=1):
            rows.append({"method": "greedy", "n_removed": k, "removed": [l for l, _ in path[:k]],
                         "layer_removed": layer, "ce": ce})
    table = pd.DataFrame(rows)
    table["delta_ce"] = table["ce"] - base
    if heldout is not None:
        held_ce = {(): mean_ce(loaded, heldout)}
        for removed in progress_bar(progress, table["removed"], desc="held-out scores"):
            key = tuple(sorted(removed))
            if key not in held_ce:
                held_ce[key] = mean_ce(loaded, heldout, list(key))
        table["heldout_ce"] = [held_ce[tuple(sorted(r))] for r in table["removed"]]
        table["heldout_delta_ce"] = table["heldout_ce"] - held_ce[()]
    else:
        table["heldout_ce"] = table["heldout_delta_ce"] = math.nan
    table["removed"] = [",".join(map(str, sorted(r))) for r in table["removed"]]
    table["chosen_tokens"] = next_token_positions(chosen_on)
    table["heldout_tokens"] = next_token_positions(heldout)
    return {"prune_curve": table}


def _has_heldout(table: pd.DataFrame) -> bool:
    """Runs stored before the split have no held-out columns; runs without a held-out part have NaN."""
    return "heldout_ce" in table and bool(table["heldout_ce"].notna().any())


def figure(table: pd.DataFrame) -> go.Figure:
    """Each order's cross-entropy on the windows that chose it (solid) and on the held-out
    windows (dashed, same colour)."""
    fig = go.Figure()
    heldout = _has_heldout(table)
    for i, (method, rows) in enumerate(table.groupby("method", sort=False)):
        colour = {"color": PALETTE[i % len(PALETTE)]}
        fig.add_scatter(x=rows["n_removed"], y=rows["ce"], mode="lines+markers", line=colour,
                        name=f"{method}, chosen on" if heldout else method, customdata=rows[["removed"]].values,
                        hovertemplate="%{x} removed: [%{customdata[0]}]<br>CE %{y:.3f}<extra></extra>")
        if heldout:
            fig.add_scatter(x=rows["n_removed"], y=rows["heldout_ce"], mode="lines+markers", name=f"{method}, held out",
                            line={**colour, "dash": "dash"}, customdata=rows[["removed"]].values,
                            hovertemplate="%{x} removed: [%{customdata[0]}]<br>held-out CE %{y:.3f}<extra></extra>")
    title = "Pruning curve" + (": solid on the windows that chose each order, dashed on held-out windows"
                               if heldout else "")
    fig.update_layout(title=title, xaxis_title="blocks removed", yaxis_title="cross-entropy (nats)")
    integer_axis(fig, "xaxis", table["n_removed"])
    return fig


def summarize(tables: Tables) -> list[str]:
    table = tables["prune_curve"]
    last = table.groupby("method").tail(1).set_index("method")
    heldout = _has_heldout(table)
    parts = [f"{method} removes [{row['removed']}] for {row['delta_ce']:+.3f} CE"
             + (f" where chosen, {row['heldout_delta_ce']:+.3f} held out" if heldout else "")
             for method, row in last.iterrows()]
    lines = ["prune-curve: " + "; ".join(parts)]
    warning = heldout_warning(int(table["heldout_tokens"].iloc[0])) if "heldout_tokens" in table else None
    if warning:
        lines.append(f"prune-curve: warning: {warning}")
    return lines


METRIC = Metric("prune-curve", "loss against blocks removed, in BI order and greedily with recomputation",
                probe=probe, replay=replay, kind="replay", options=PruneCurveOptions, figures=lambda t: [figure(t["prune_curve"])],
                summarize=summarize, causal_only=True)
