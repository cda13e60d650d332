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
    "norm_sensitivity",
)


def _collect() -> dict[str, Metric]:
    found = {}
    for module_name in METRIC_MODULES:
        metric = importlib.import_module(f"layerscope.analysis.{module_name}").METRIC
        found[metric.name] = metric
    return found


METRICS: dict[str, Metric] = _collect()


def _experiments() -> dict[str, Metric]:
    """Stored runs that are not measurements of a pass (LayerNorm removal by fine-tuning):
    the report and the app draw them, and the menus of measurements leave them out."""
    from layerscope.analysis import ln_removal

    experiment = Metric(ln_removal.METRIC_NAME, "LayerNorm removal by fine-tuning: loss per step and eval CE",
                        figures=ln_removal.figures, summarize=ln_removal.summarize, kind="experiment")
    return {experiment.name: experiment}


# Everything a stored run can hold, by the name its manifest gives.
DRAWN: dict[str, Metric] = {**METRICS, **_experiments()}
