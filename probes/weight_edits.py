"""Reading weights (the down-projection, the norms that read each block output) and
temporarily editing single weights of the MLP down-projection.

"The Super Weight in Large Language Models" (Yu et al. 2024) finds one scalar of an early
layer's down-projection whose removal destroys the model; these helpers read that matrix
in one orientation for every family and zero chosen entries for the length of a block.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from jaxtyping import Float

from layerscope.probes.families import get_module
from layerscope.probes.zoo import LoadedModel


def down_proj_matrix(loaded: LoadedModel, layer: int) -> Float[torch.Tensor, "d_model d_mlp"]:
    """The down-projection weight of a block as [output dim, input dim] (a view, not a copy)."""
    weight = loaded.adapter.layer_part(loaded.model, layer, loaded.adapter.down_proj).weight
    # GPT-2's Conv1D stores [in, out].
    return weight.T if loaded.adapter.down_proj_transposed else weight


@contextlib.contextmanager
def zeroed_down_proj_weights(loaded: LoadedModel, coords: list[tuple[int, int, int]]) -> Iterator[None]:
    """Set down_proj.weight[row, col] of each (layer, row, col) to zero, and restore it on exit.

    `row` is the output (residual) dim and `col` the input (MLP activation) dim.
    """
    saved = []
    try:
        with torch.no_grad():
            for layer, row, col in coords:
                matrix = down_proj_matrix(loaded, layer)
                saved.append((matrix, row, col, matrix[row, col].clone()))
                matrix[row, col] = 0
        yield
    finally:
        with torch.no_grad():
            for matrix, row, col, value in reversed(saved):
                matrix[row, col] = value


def reading_norm_weights(loaded: LoadedModel) -> list[tuple[str | None, Float[torch.Tensor, "d_model"] | None]]:
    """Per block output, the path and effective weight (with the family's offset) of the norm
    that reads it (Pre-LN) or wrote it (Post-LN); None where that norm has no weight."""
    adapter, n = loaded.adapter, loaded.n_layers
    if adapter.placement == "post":
        paths = [f"{adapter.layers}.{l}.{adapter.ln2}" for l in range(n)]
    else:  # a block with no pre-attention norm (OLMo 2) has no norm reading its input
        paths = [f"{adapter.layers}.{l + 1}.{adapter.ln1}" if adapter.ln1 else None
                 for l in range(n - 1)] + [adapter.final_norm]
    out = []
    for path in paths:
        weight = getattr(get_module(loaded.model, path), "weight", None) if path else None
        out.append((path, None if weight is None else weight.detach() + adapter.norm_weight_offset))
    return out
