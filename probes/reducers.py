"""Streaming reducers: fixed-size running statistics folded batch by batch.

Each reducer holds tensors whose size depends on the model (layers, d_model), never on
the number of tokens seen.  Sums are kept in float64 so that long corpora do not lose
precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from layerscope.probes.backends import Activations, Point
from layerscope.probes.capture import Batch
from layerscope.probes.zoo import LoadedModel

FIRST, REST = 0, 1
MOMENT_FIELDS = ("tokens", "sum_norm", "sum_norm_sq", "elements", "sum_x", "sum_x_sq")


@dataclass(frozen=True)
class ResidualMoments:
    """Per point: token count, sums of L2 norm and squared norm, element sums and sums of
    squares (position 0 apart from the rest), and the largest |x| with its location."""

    kinds: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
    name: str = "moments"

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point(k, l) for k in self.kinds for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_MomentsState":
        return _MomentsState(self.kinds, loaded.n_layers)


class _MomentsState:
    def __init__(self, kinds: tuple[str, ...], n_layers: int):
        self.kinds = kinds
        shape = (len(kinds), n_layers)
        self.moments = torch.zeros(*shape, 2, len(MOMENT_FIELDS), dtype=torch.float64)
        self.max_abs = torch.full(shape, -1.0, dtype=torch.float64)
        # window, position, dim, token id of the largest |x|
        self.max_where = torch.zeros(*shape, 4, dtype=torch.long)

    def update(self, acts: Activations, batch: Batch) -> None:
        # resid_post[l] and resid_pre[l+1] are one tensor; reduce it once.
        seen: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for (k, l), x in _by_index(acts, self.kinds):
            key = (x.data_ptr(), tuple(x.shape))
            if key not in seen:
                value, flat = x.abs().flatten().max(dim=0)
                seen[key] = (batch_moments(x), value, flat)
            moments, value, flat = seen[key]
            self.moments[k, l] += moments
            if value.item() > self.max_abs[k, l]:
                window, pos, dim = torch.unravel_index(flat, x.shape)
                self.max_abs[k, l] = value.item()
                self.max_where[k, l] = torch.stack(
                    [window + batch.offset, pos, dim, batch.input_ids[window, pos]])

    def result(self) -> dict[str, torch.Tensor]:
        return {"kinds": list(self.kinds), "moments": self.moments, "max_abs": self.max_abs,
                "max_where": self.max_where}


def _by_index(acts: Activations, kinds: tuple[str, ...]):
    for p, x in acts.items():
        yield (kinds.index(p.kind), p.layer), x


def batch_moments(x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "2 field"]:
    """A batch's MOMENT_FIELDS for position 0 and for the other positions.

    Sums run in float32 over one batch and are accumulated across batches in float64."""
    out = torch.empty(2, len(MOMENT_FIELDS), dtype=torch.float64)
    for slot, part in ((FIRST, x[:, :1]), (REST, x[:, 1:])):
        squares = part.square()
        norm_sq = squares.sum(dim=-1)
        out[slot] = torch.stack([
            torch.tensor(float(norm_sq.numel())), norm_sq.sqrt().sum(), norm_sq.sum(),
            torch.tensor(float(part.numel())), part.sum(), norm_sq.sum(),
        ]).double()
    return out


def fold_moments(into: Float[torch.Tensor, "2 field"], x: Float[torch.Tensor, "batch pos d_model"]) -> None:
    """Add a batch's first-position and other-position moments into `into`."""
    into += batch_moments(x)


def moment_summary(moments: Float[torch.Tensor, "... 2 field"], slot: int) -> dict[str, torch.Tensor]:
    """Mean norm, and the mean, variance and std over all elements, from folded moments."""
    m = moments[..., slot, :]
    tokens, sum_norm, _, elements, sum_x, sum_x_sq = m.unbind(-1)
    mean = sum_x / elements
    # Unbiased, as torch.var's default.
    variance = (sum_x_sq - elements * mean.square()) / (elements - 1)
    return {"mean_norm": sum_norm / tokens, "mean": mean, "variance": variance, "std": variance.clamp_min(0).sqrt()}
