"""The registry of measurements: the CLI, the app, the demo survey and the report build
their menus from it.  Each measurement module defines one `METRIC`; adding a module name
to `METRIC_MODULES` registers it."""

from __future__ import annotations

import importlib

from layerscope.analysis.metric import Metric

METRIC_MODULES = (
    "residual_stats",
    "massive",
    "super_weights",
    "int8_outliers",
    "kurtosis",
    "sinks",
    "block_influence",
    "layer_skip",
    "variance",
    "logit_lens",
    "prune_curve",
    "dla",
)


def _collect() -> dict[str, Metric]:
    found = {}
    for module_name in METRIC_MODULES:
        metric = importlib.import_module(f"layerscope.analysis.{module_name}").METRIC
        found[metric.name] = metric
    return found


METRICS: dict[str, Metric] = _collect()
