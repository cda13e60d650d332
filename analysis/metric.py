"""What a measurement is: how it runs, what it returns, how it is drawn and summarised."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import pandas as pd
import plotly.graph_objects as go

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


@dataclass(frozen=True)
class Metric:
    """A measurement.

    `run(loaded, windows, options, backend=..., progress=...)` returns named tidy tables;
    `figures(tables)` draws them; `summarize(tables)` gives one-line findings for the demo;
    `display(tables)` picks what the CLI prints as a table (JSON and runs keep everything).
    `options` is a frozen dataclass whose fields become CLI flags (help in field metadata).
    """

    name: str
    summary: str
    run: Callable[..., Tables]
    options: type = NoOptions
    figures: Callable[[Tables], list[go.Figure]] = _nothing
    summarize: Callable[[Tables], list[str]] = _nothing
    display: Callable[[Tables], Tables] = _same
    causal_only: bool = False
    option_names: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self):
        object.__setattr__(self, "option_names", tuple(f.name for f in fields(self.options)))

    def check_applies(self, loaded: LoadedModel) -> None:
        if self.causal_only and not loaded.adapter.causal:
            raise UserError(f"{self.name} needs a causal language model with an unembedding; "
                            f"{loaded.spec.name} is an encoder ({loaded.adapter.name})")

    def __call__(self, loaded: LoadedModel, windows: TokenWindows, options=None, backend: str = "hooks",
                 progress: bool = False) -> Tables:
        self.check_applies(loaded)
        return self.run(loaded, windows, options if options is not None else self.options(),
                        backend=backend, progress=progress)
