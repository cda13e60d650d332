"""layerscope: measure what each layer of a transformer does."""

__version__ = "0.1.0"
