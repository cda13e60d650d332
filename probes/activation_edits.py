"""Overwriting the large entries of chosen dims of a block output, wherever they occur.

Sun et al. (2024, "Massive Activations in Large Language Models") set the massive
activations to zero, or to their mean over a corpus, at the layer where they appear, and
compare the loss.  Massive activations sit at the first token and at delimiter tokens,
whose positions vary between windows, so the entries to edit are chosen by magnitude.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from jaxtyping import Float

from layerscope.probes.families import output_item, with_first_output
from layerscope.probes.interventions import _check_layers, _hooked
from layerscope.probes.zoo import LoadedModel


@contextlib.contextmanager
def set_large_activations(loaded: LoadedModel, layer: int, dims: list[int], threshold: float,
                          values: Float[torch.Tensor, "dim"]) -> Iterator[None]:
    """In resid_post[layer], replace every entry of `dims` with |x| >= threshold by that dim's value."""
    _check_layers(loaded, [layer])
    block = loaded.adapter.layer_modules(loaded.model)[layer]
    dims_t = torch.tensor(dims)

    def write(module, args, output):
        x = output_item(output).clone()
        chosen = x[..., dims_t]
        replacement = values.to(x).expand_as(chosen)
        x[..., dims_t] = torch.where(chosen.abs() >= threshold, replacement, chosen)
        return with_first_output(output, x)

    with _hooked([lambda: block.register_forward_hook(write)]):
        yield
