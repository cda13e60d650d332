"""Streaming reducers: fixed-size running statistics folded batch by batch.

Each reducer holds tensors whose size depends on the model (layers, d_model), never on
the number of tokens seen.  Sums are kept in float64 so that long corpora do not lose
precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float

from layerscope.probes.backends import Activations, Point, execution_order
from layerscope.probes.capture import Batch
from layerscope.probes.zoo import LoadedModel

FIRST, REST = 0, 1
# sum_x_sq is also the sum of squared token norms, so it is not kept twice.
MOMENT_FIELDS = ("tokens", "sum_norm", "elements", "sum_x", "sum_x_sq")


@dataclass(frozen=True)
class ResidualMoments:
    """Per point: token count, sum of L2 norms, element count, sum and sum of
    squares (position 0 apart from the rest), and the largest |x| with its location."""

    kinds: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
    name: str = "moments"
    pointwise = True

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
        self._shared = _SharedTensor()

    def update(self, acts: Activations, batch: Batch) -> None:
        for (k, l), x in _by_index(acts, self.kinds):
            moments, value, flat = self._shared.reduce(x, _moments_and_max)
            self.moments[k, l] += moments
            if value.item() > self.max_abs[k, l]:
                window, pos, dim = torch.unravel_index(flat, x.shape)
                self.max_abs[k, l] = value.item()
                self.max_where[k, l] = torch.stack(
                    [window + batch.offset, pos, dim, batch.input_ids[window, pos]])

    def result(self) -> dict[str, torch.Tensor]:
        self._shared = _SharedTensor()
        return {"kinds": list(self.kinds), "moments": self.moments, "max_abs": self.max_abs,
                "max_where": self.max_where}


def _moments_and_max(x: torch.Tensor) -> tuple:
    value, flat = x.abs().flatten().max(dim=0)
    return batch_moments(x), value, flat


def _storage_key(x: torch.Tensor) -> tuple:
    return x.data_ptr(), tuple(x.shape), tuple(x.stride())


class _SharedTensor:
    """resid_post[l] and resid_pre[l+1] are one tensor, and in execution order they come
    one after the other: what was computed from the last tensor is reused when the next
    point is the same one.  The tensor is kept alive so that its address cannot be reused."""

    def __init__(self):
        self._last: tuple[torch.Tensor, object] | None = None

    def reduce(self, x: torch.Tensor, compute):
        if self._last is None or _storage_key(self._last[0]) != _storage_key(x):
            self._last = (x, compute(x))
        return self._last[1]


def _by_index(acts: Activations, kinds: tuple[str, ...]):
    for p in sorted(acts, key=execution_order):
        yield (kinds.index(p.kind), p.layer), acts[p]


def batch_moments(x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "2 field"]:
    """A batch's MOMENT_FIELDS for position 0 and for the other positions.

    Sums run in float32 over one batch and are accumulated across batches in float64."""
    out = torch.empty(2, len(MOMENT_FIELDS), dtype=torch.float64)
    for slot, part in ((FIRST, x[:, :1]), (REST, x[:, 1:])):
        norm_sq = part.square().sum(dim=-1)
        out[slot] = torch.stack([
            torch.tensor(float(norm_sq.numel())), norm_sq.sqrt().sum(),
            torch.tensor(float(part.numel())), part.sum(), norm_sq.sum(),
        ]).double()
    return out


def fold_moments(into: Float[torch.Tensor, "2 field"], x: Float[torch.Tensor, "batch pos d_model"]) -> None:
    """Add a batch's first-position and other-position moments into `into`."""
    into += batch_moments(x)


def moment_summary(moments: Float[torch.Tensor, "... 2 field"], slot: int) -> dict[str, torch.Tensor]:
    """Mean norm, and the mean, variance and std over all elements, from folded moments."""
    m = moments[..., slot, :]
    tokens, sum_norm, elements, sum_x, sum_x_sq = m.unbind(-1)
    mean = sum_x / elements
    # Unbiased, as torch.var's default.
    variance = (sum_x_sq - elements * mean.square()) / (elements - 1)
    return {"mean_norm": sum_norm / tokens, "mean": mean, "variance": variance, "std": variance.clamp_min(0).sqrt()}


@dataclass(frozen=True)
class LayerCosines:
    """Per layer, token sums of cos(resid_pre, resid_post), cos(resid_pre, resid_mid) and
    cos(resid_mid, resid_post); with `span` n > 0 also of the angular distance
    arccos(cos(resid_pre[l], resid_post[l+n-1]))/pi.  `exclude_first` drops position 0.

    Pointwise: a layer's cosines are taken as soon as its three points have arrived, so a
    streaming backend leaves only the current layer's points (and `span` earlier inputs)
    in memory."""

    span: int = 0
    exclude_first: bool = False
    name: str = "cosines"
    pointwise = True

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point(k, l) for k in ("resid_pre", "resid_mid", "resid_post") for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_CosinesState":
        return _CosinesState(self, loaded.n_layers)


class _CosinesState:
    FIELDS = ("block", "attn", "mlp", "angular")

    def __init__(self, spec: LayerCosines, n_layers: int):
        self.spec = spec
        self.n_layers = n_layers
        self.sums = torch.zeros(n_layers, len(self.FIELDS), dtype=torch.float64)
        self.tokens = 0
        # Points of the current layer in float64 with their token norms, and the inputs an
        # angular span still needs, by layer.
        self.waiting: dict[Point, tuple[torch.Tensor, torch.Tensor]] = {}
        self.span_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._shared = _SharedTensor()

    def update(self, acts: Activations, batch: Batch) -> None:
        start = 1 if self.spec.exclude_first else 0

        def widen(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            wide = x[:, start:].double()
            return wide, wide.norm(dim=-1)

        for p in sorted(acts, key=execution_order):
            self.waiting[p] = self._shared.reduce(acts[p], widen)
            self._close_if_complete(p.layer)

    def _close_if_complete(self, layer: int) -> None:
        # A backend may stream some points and return the rest after the pass (a derived
        # resid_mid), so a layer closes when its last point arrives, whichever that is.
        # Either way layers complete in ascending order, which the angular span relies on.
        wanted = [Point(kind, layer) for kind in ("resid_pre", "resid_mid", "resid_post")]
        if not all(p in self.waiting for p in wanted):
            return
        pre, mid, post = (self.waiting.pop(p) for p in wanted)
        self.sums[layer, 0] += _cosine_sum(pre, post)
        self.sums[layer, 1] += _cosine_sum(pre, mid)
        self.sums[layer, 2] += _cosine_sum(mid, post)
        if layer == 0:
            self.tokens += pre[1].numel()
        span = self.spec.span
        if span > 0:
            self.span_inputs[layer] = pre
            first = layer - span + 1
            if first >= 0:
                start = self.span_inputs.pop(first)
                cos = (_dot(start, post) / (start[1] * post[1]).clamp_min(_EPS)).clamp(-1, 1)
                self.sums[first, 3] += (torch.arccos(cos) / torch.pi).sum()
            if layer == self.n_layers - 1:
                self.span_inputs.clear()

    def result(self) -> dict:
        self._shared = _SharedTensor()
        mean = self.sums / self.tokens
        if self.spec.span > 0:
            mean[self.n_layers - self.spec.span + 1:, 3] = float("nan")
        else:
            mean[:, 3] = float("nan")
        return {"fields": list(self.FIELDS), "mean": mean, "tokens": self.tokens}


# torch.nn.functional.cosine_similarity's floor on the product of norms
_EPS = 1e-8


def _dot(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> Float[torch.Tensor, "batch pos"]:
    return (a[0] * b[0]).sum(dim=-1)


def _cosine_sum(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Token sum of cos(a, b), from float64 values and their precomputed token norms."""
    return (_dot(a, b) / (a[1] * b[1]).clamp_min(_EPS)).sum()


@dataclass(frozen=True)
class SublayerRatios:
    """Token means (non-first positions) of ||attn_out|| / ||resid_pre|| and
    ||mlp_out|| / ||resid_mid||: how much each sublayer writes relative to what it reads."""

    name: str = "sublayer_ratios"

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point(k, l) for k in ("resid_pre", "resid_mid", "attn_out", "mlp_out") for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_RatiosState":
        return _RatiosState(loaded.n_layers)


class _RatiosState:
    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.sums = torch.zeros(n_layers, 2, dtype=torch.float64)
        self.tokens = 0

    def update(self, acts: Activations, batch: Batch) -> None:
        norm = lambda kind, layer: acts[Point(kind, layer)][:, 1:].double().norm(dim=-1)
        for layer in range(self.n_layers):
            self.sums[layer, 0] += (norm("attn_out", layer) / norm("resid_pre", layer)).sum()
            self.sums[layer, 1] += (norm("mlp_out", layer) / norm("resid_mid", layer)).sum()
        x = next(iter(acts.values()))
        self.tokens += x.shape[0] * (x.shape[1] - 1)

    def result(self) -> dict:
        return {"mean": self.sums / self.tokens}


@dataclass(frozen=True)
class LogitLens:
    """Per layer, token sums of the next-token cross-entropy and top-1 accuracy of
    `unembed(final_norm(resid_post[l]))`, and its KL from the model's final distribution;
    plus, for the corpus's first window, each layer's top token and its probability at
    every position (nostalgebraist 2020, "interpreting GPT: the logit lens")."""

    name: str = "logit_lens"

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point("resid_post", l) for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_LensState":
        return _LensState(loaded)


class _LensState:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.sums = torch.zeros(loaded.n_layers, 3, dtype=torch.float64)
        self.tokens = 0
        self.grid: dict[str, torch.Tensor] = {}

    def update(self, acts: Activations, batch: Batch) -> None:
        from layerscope.probes.replay import Reference, compare_to_reference, unembed

        targets = batch.input_ids[:, 1:]
        final = Reference.of(batch.logits, batch.input_ids)
        top_ids, top_probs = [], []
        for layer in range(self.loaded.n_layers):
            logits = unembed(self.loaded, acts[Point("resid_post", layer)])
            compared = compare_to_reference(logits, final)
            self.sums[layer] += torch.tensor([compared["ce"], compared["correct"], compared["kl"]], dtype=torch.float64)
            if batch.offset == 0:
                prob, token = torch.softmax(logits[0], dim=-1).max(dim=-1)
                top_ids.append(token)
                top_probs.append(prob)
        if batch.offset == 0:
            self.grid = {"top_token": torch.stack(top_ids), "top_prob": torch.stack(top_probs),
                         "input_ids": batch.input_ids[0]}
        self.tokens += targets.numel()

    def result(self) -> dict:
        return {"mean": self.sums / self.tokens, **self.grid}
