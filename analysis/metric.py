"""What a measurement is: what it reads from a pass, how it builds its tables, what it
replays, how it is drawn and summarised.

There are two kinds.  A *streaming* measurement declares reducers (`probe`) and builds its
tables from the folded statistics (`tables`); the runner folds the reducers of every
requested streaming measurement in one pass.  A *replay* measurement also re-runs parts of
the model (`replay`): skipping blocks, pruning, intervening on activations or weights.  It
starts from what the shared pass measured.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from typing import Callable

import pandas as pd
import plotly.graph_objects as go

from layerscope.analysis.plots import themed
from layerscope.probes.capture import Capture, ProbeSpec
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import LoadedModel

Tables = dict[str, pd.DataFrame]


@dataclass(frozen=True)
class NoOptions:
    """This measurement has no options of its own."""


def _same(tables: Tables) -> Tables:
    return tables


def _nothing(tables: Tables) -> list:
    return []


def check_bounds(options) -> None:
    """Every number of an options dataclass is finite and inside its field's `min`/`max`
    metadata, so that no size option can ask for more than the data holds."""
    for f in fields(options):
        value = getattr(options, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise UserError(f"{f.name} must be a finite number, got {value}")
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            raise UserError(f"{f.name} must be between {low if low is not None else '-inf'} and "
                            f"{high if high is not None else 'inf'}, got {value}")


def no_probe(options, loaded: LoadedModel) -> ProbeSpec:
    return ProbeSpec(())


def no_tables(captured: Capture, loaded: LoadedModel, options) -> Tables:
    return {}


@dataclass(frozen=True)
class View:
    """A standard picture drawn at a point the reader picks: a layer, a head, a window or a
    position.  `controls(tables)` gives each control's name, its choices and its default
    (say the heaviest sink head); `draw(tables, **chosen)` draws the figure there.  The app
    shows the controls; the report and notebooks draw the defaults."""

    title: str
    controls: Callable[[Tables], dict[str, tuple[list, object]]]
    draw: Callable[..., go.Figure]
    # The tables the view reads; it is left out of a run that lacks one (an older run).
    needs: tuple[str, ...] = ()

    def available(self, tables: Tables) -> bool:
        return all(name in tables and len(tables[name]) for name in self.needs)

    def defaults(self, tables: Tables) -> dict:
        return {name: default for name, (_, default) in self.controls(tables).items()}

    def figure(self, tables: Tables, **chosen) -> go.Figure:
        return themed(self.draw(tables, **{**self.defaults(tables), **chosen}))


# replay(loaded, windows, options, captured, tables, progress) -> more tables
Replay = Callable[[LoadedModel, TokenWindows, object, Capture, Tables, bool], Tables]


@dataclass(frozen=True)
class Metric:
    """A measurement.

    `probe(options, loaded)` declares the reducers it needs from the shared pass (and checks
    the options against the model); `tables(capture, loaded, options)` builds named tidy
    tables from them; `replay(...)`, when given, adds tables that need the model run again
    and returns nothing extra when the options ask for no replay.  `kind` is "replay" for a
    measurement that always re-runs the model (layer skips, pruning).  `figures(tables)` draws,
    `summarize(tables)` gives one-line findings, `display(tables)` picks what the CLI prints.
    `options` is a frozen dataclass whose fields become CLI flags and app controls.
    """

    name: str
    summary: str
    probe: Callable[[object, LoadedModel], ProbeSpec] = no_probe
    tables: Callable[[Capture, LoadedModel, object], Tables] = no_tables
    replay: Replay | None = None
    # The replay over this rank's share of the windows in a data-parallel run, combined on
    # rank 0 (None on the others); replays without one run whole on rank 0.
    sharded_replay: Replay | None = None
    options: type = NoOptions
    figures: Callable[[Tables], list[go.Figure]] = _nothing
    summarize: Callable[[Tables], list[str]] = _nothing
    display: Callable[[Tables], Tables] = _same
    causal_only: bool = False
    # "replay" when re-running the model is the measurement itself, not an option of it.
    kind: str = "streaming"
    views: tuple[View, ...] = ()
    option_names: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        object.__setattr__(self, "option_names", tuple(f.name for f in fields(self.options)))

    @property
    def about(self) -> str:
        """The measurement module's docstring: what it measures and which paper it follows."""
        defined_by = next(f for f in (self.tables, self.replay, self.figures) if f not in (no_tables, None))
        return sys.modules[defined_by.__module__].__doc__ or ""

    def draw(self, tables: Tables) -> list[go.Figure]:
        """The measurement's figures in the shared theme."""
        return [themed(fig) for fig in self.figures(tables)]

    def views_for(self, tables: Tables) -> list[View]:
        return [view for view in self.views if view.available(tables)]

    def applies_to(self, loaded: LoadedModel) -> bool:
        return loaded.adapter.causal or not self.causal_only

    def check_applies(self, loaded: LoadedModel) -> None:
        if not self.applies_to(loaded):
            raise UserError(f"{self.name} needs a causal language model with an unembedding; "
                            f"{loaded.spec.name} is an encoder ({loaded.adapter.name})")

    def __call__(self, loaded: LoadedModel, windows: TokenWindows, options=None, backend: str = "hooks",
                 progress: bool = False) -> Tables:
        """This measurement alone, through the runner."""
        from layerscope.analysis.runner import measure

        chosen = {self.name: options} if options is not None else None
        return measure(loaded, windows, [self.name], options=chosen, backend=backend, progress=progress).tables
