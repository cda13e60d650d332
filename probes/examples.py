"""Reducers that keep one window whole, for the pictures the papers draw of a single input:
the per-head attention pattern (Gu et al. 2025, "When Attention Sink Emerges"; CircuitsVis)
and the token x dim magnitudes of the residual stream (Sun et al. 2024, "Massive
Activations in Large Language Models", Figure 1).

Each keeps the first `positions` positions of the corpus's window `window`, so its size is
fixed by the model and the cap, never by the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from layerscope.probes.backends import Activations, Point
from layerscope.probes.capture import Batch, PortableState

MAX_POSITIONS = 48


def _row_of(batch: Batch, window: int) -> int | None:
    hit = (batch.windows == window).nonzero()
    return int(hit[0, 0]) if len(hit) else None


class _ExampleState(PortableState):
    """Holds the one window's tensors once its batch has passed; merging two states that
    both hold it means their windows overlapped."""

    def __init__(self, window: int, positions: int):
        self.window, self.positions = window, positions
        self.example = None

    def merge(self, other: "_ExampleState") -> None:
        if other.example is not None:
            if self.example is not None:
                raise ValueError(f"both states hold window {self.window}: their windows overlap")
            self.example = other.example

    def result(self):
        return self.example


@dataclass(frozen=True)
class PatternExampleResult:
    input_ids: Int[torch.Tensor, "pos"]
    pattern: Float[torch.Tensor, "layer head pos pos"]


@dataclass(frozen=True)
class PatternExample:
    """Every layer's and head's attention pattern (query x key) on one window."""

    window: int = 0
    positions: int = MAX_POSITIONS
    name: str = "pattern_example"

    def points(self, loaded) -> list[Point]:
        return [Point("attn_pattern", layer) for layer in range(loaded.n_layers)]

    def start(self, loaded) -> "_PatternState":
        return _PatternState(self.window, self.positions, loaded.n_layers)


class _PatternState(_ExampleState):
    def __init__(self, window: int, positions: int, n_layers: int):
        super().__init__(window, positions)
        self.n_layers = n_layers

    def update(self, acts: Activations, batch: Batch) -> None:
        row = _row_of(batch, self.window)
        if row is None:
            return
        p = self.positions
        pattern = torch.stack([acts[Point("attn_pattern", layer)][row, :, :p, :p].float()
                               for layer in range(self.n_layers)])
        self.example = PatternExampleResult(batch.input_ids[row, :p].clone(), pattern)


@dataclass(frozen=True)
class MagnitudeExampleResult:
    input_ids: Int[torch.Tensor, "pos"]
    dims: Int[torch.Tensor, "dim"]
    magnitude: Float[torch.Tensor, "layer pos dim"]
    rest_max: Float[torch.Tensor, "layer pos"]


@dataclass(frozen=True)
class MagnitudeExample:
    """|resid_post| of one window at every layer, for the `dims` dims largest anywhere in
    it, and the largest |value| over every other dim of each token."""

    window: int = 0
    positions: int = MAX_POSITIONS
    dims: int = 16
    name: str = "magnitude_example"

    def points(self, loaded) -> list[Point]:
        return [Point("resid_post", layer) for layer in range(loaded.n_layers)]

    def start(self, loaded) -> "_MagnitudeState":
        return _MagnitudeState(self.window, self.positions, min(self.dims, loaded.d_model), loaded.n_layers)


class _MagnitudeState(_ExampleState):
    def __init__(self, window: int, positions: int, dims: int, n_layers: int):
        super().__init__(window, positions)
        self.dims, self.n_layers = dims, n_layers

    def update(self, acts: Activations, batch: Batch) -> None:
        row = _row_of(batch, self.window)
        if row is None:
            return
        p = self.positions
        magnitude = torch.stack([acts[Point("resid_post", layer)][row, :p].float().abs()
                                 for layer in range(self.n_layers)])  # [layer pos d_model]
        dims = magnitude.amax(dim=(0, 1)).topk(self.dims).indices.sort().values
        rest = magnitude.clone()
        rest[..., dims] = 0
        self.example = MagnitudeExampleResult(batch.input_ids[row, :p].clone(), dims, magnitude[..., dims],
                                              rest.amax(-1))
