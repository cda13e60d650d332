"""The registry of measurements: the CLI and the app build their menus from it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import pandas as pd

from layerscope.probes.capture import capture
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.zoo import LoadedModel


@dataclass(frozen=True)
class NoOptions:
    """This measurement has no options of its own."""


@dataclass(frozen=True)
class Metric:
    """A measurement: how to run it on a model and corpus, and what it returns."""

    name: str
    summary: str
    run: Callable[..., dict[str, pd.DataFrame]]
    options: type = NoOptions
    needs_lm_head: bool = False
    # What the CLI prints as a table; the run store and JSON keep the full tables.
    display: Callable[[dict[str, pd.DataFrame]], dict[str, pd.DataFrame]] = lambda tables: tables
    option_names: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        object.__setattr__(self, "option_names", tuple(f.name for f in fields(self.options)))


def _run_residual_stats(loaded: LoadedModel, windows: TokenWindows, options: NoOptions,
                        backend: str = "hooks", progress: bool = True) -> dict[str, pd.DataFrame]:
    from layerscope.analysis.residual_stats import PROBE, residual_stats

    captured = capture(loaded, windows, PROBE, backend=backend, progress=progress)
    return {"residual_stats": residual_stats(captured, decode=loaded.tokenizer.decode)}


def _block_outputs(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    table = tables["residual_stats"]
    shown = table[table["point"] == "resid_post"].drop(columns=["point", "max_window"])
    return {"residual_stats (resid_post, block outputs; --format json for resid_pre/mid)": shown}


METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("residual-stats", "per-layer mean norm, std, variance and max|x| of the residual stream",
               _run_residual_stats, display=_block_outputs),
    ]
}
