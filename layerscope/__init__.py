"""layerscope: measure what each layer of a transformer does.

    import layerscope as ls
    model = ls.load_model("smollm2-135m")
    result = ls.measure(model, ls.windows(model, "stdlib", max_tokens=2048), ["block-influence", "massive"])
    result.show()

Names are imported on first use, so `import layerscope` (and the CLI's `--help`) stays
light until a model is touched.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "layerscope.probes.zoo",
    "LoadedModel": "layerscope.probes.zoo",
    "windows": "layerscope.probes.inputs",
    "text_windows": "layerscope.probes.inputs",
    "measure": "layerscope.analysis.runner",
    "Result": "layerscope.analysis.result",
    "METRICS": "layerscope.analysis.registry",
    "activations": "layerscope.probes.capture",
    "capture": "layerscope.probes.capture",
    "ProbeSpec": "layerscope.probes.capture",
    "Point": "layerscope.probes.backends",
    "skip_blocks": "layerscope.probes.interventions",
    "ablate_sublayer": "layerscope.probes.interventions",
    "set_activations": "layerscope.probes.interventions",
    "frozen_norms": "layerscope.probes.interventions",
    "UserError": "layerscope.probes.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'layerscope' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
