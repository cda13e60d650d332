"""Run one measurement over several norm placements of the same model, on the same inputs."""

from __future__ import annotations

from typing import Callable

import pandas as pd

from layerscope.probes.errors import UserError
from layerscope.probes.placements import PLACEMENTS
from layerscope.probes.zoo import LoadedModel, load_model


def parse_placements(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PLACEMENTS]
    if unknown:
        raise UserError(f"unknown norm placement(s) {', '.join(unknown)}; known: {', '.join(PLACEMENTS)}")
    return chosen


def over_placements(loaded: LoadedModel, placements: str,
                    measure: Callable[[LoadedModel], pd.DataFrame]) -> pd.DataFrame:
    """`measure(loaded)`, or, when placements are given, one table per placement variant of
    the same base model stacked with a `placement` column."""
    if not placements:
        return measure(loaded)
    base = loaded.spec.name.partition("@")[0]
    tables = []
    for placement in parse_placements(placements):
        variant = load_model(f"{base}@{placement}", attn_implementation=loaded.spec.attn_implementation)
        tables.append(measure(variant).assign(placement=placement))
    return pd.concat(tables, ignore_index=True)
