"""Streaming reducers for the outlier measurements: massive activations, LLM.int8 outlier
features, kurtosis, attention sinks, residual sinks, and the next-token loss that
interventions are judged by.

Every state here has a size set by the model (layers, heads, d_model), the window length
and the options, never by the number of windows seen: top-k lists are merged batch by
batch, counts and sums are folded, and medians come from fixed-bin log histograms.
States reach model modules only through closures, so `tensor_bytes` counts the
statistics and not the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from jaxtyping import Float, Int

from layerscope.probes.backends import Activations, Point
from layerscope.probes.capture import Batch, PortableState, ProbeSpec, capture, require_same
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module
from layerscope.probes.replay import next_token_rows, score_tokens
from layerscope.probes.reducers import Location, abs_of, beats, per_tensor, token_norms64
from layerscope.probes.zoo import LoadedModel

# Log histogram of |x|: 100 bins a decade from 1e-8 to 1e8; |x| below the range lands in
# the first bin and above it in the last.
LOG_LOW, LOG_HIGH, BINS_PER_DECADE = -8, 8, 100
N_LOG_BINS = (LOG_HIGH - LOG_LOW) * BINS_PER_DECADE
PROJECTION_SITES = ("attn_in", "mlp_in")


# ---------------------------------------------------------------- log histograms

def log_bins(x: Float[torch.Tensor, "*shape"]) -> Int[torch.Tensor, "*shape"]:
    """The log-histogram bin of each |x|."""
    return _log_bins_of_abs(x.abs())


def _log_bins_of_abs(absx: Float[torch.Tensor, "*shape"]) -> Int[torch.Tensor, "*shape"]:
    # In place on one float32 buffer: the same float32 operations, without a tensor each.
    index = absx.float().log10()
    index.sub_(LOG_LOW).mul_(BINS_PER_DECADE).floor_().clamp_(0, N_LOG_BINS - 1)
    return index.to(torch.int32)


def log_histogram_quantile(counts: Int[torch.Tensor, "*rows bin"], q: float = 0.5) -> Float[torch.Tensor, "*rows"]:
    """The q-quantile of |x| per histogram, as the geometric centre of the bin that holds it.

    The true quantile lies in that bin, so the relative error is at most half a bin:
    10**(0.5/100) - 1, about 1.2%.
    """
    cumulative = counts.cumsum(-1)
    target = (q * cumulative[..., -1:].double()).ceil().clamp_min(1).long()
    index = torch.searchsorted(cumulative, target).squeeze(-1)
    return 10.0 ** (LOG_LOW + (index.double() + 0.5) / BINS_PER_DECADE)


# ---------------------------------------------------------------- projection inputs and values

def projection_inputs(loaded: LoadedModel) -> tuple[tuple[str, ...], Callable, Callable]:
    """What the attention projections and the MLP up-projection read, rebuilt from residual points.

    Returns the point kinds needed and `attn_in(acts, layer)`, `mlp_in(acts, layer)`.  Pre-LN
    blocks read their norms' outputs, so the block's own norm modules are applied to the
    captured residual; Post-LN blocks read the residual itself; parallel blocks feed the
    MLP from resid_pre.  Recomputing keeps every backend usable and costs one norm call.
    The calls run without autograd: a graph would tie each batch to the folded sums.
    """
    adapter = loaded.adapter
    blocks = adapter.layer_modules(loaded.model)
    parallel = adapter.resid_mid_from == "derived"
    kinds = ("resid_pre",) if parallel else ("resid_pre", "resid_mid")

    @torch.no_grad()
    def normed(norm_path: str | None, x: torch.Tensor, layer: int) -> torch.Tensor:
        if adapter.placement == "post" or norm_path is None:
            return x
        norm = get_module(blocks[layer], norm_path)
        # Shared by the reducers that read the same projection input in one pass.  `forward`
        # rather than a call: reducers run while a pass streams its points, and a capture hook
        # on this module would fire again.
        return per_tensor(x, f"norm {id(norm)}", norm.forward)

    def attn_in(acts: Activations, layer: int) -> torch.Tensor:
        return normed(adapter.ln1, acts[Point("resid_pre", layer)], layer)

    # A parallel block with one norm (GPT-J, Falcon, Phi) feeds both sublayers from it.
    mlp_norm = adapter.ln2 or (adapter.ln1 if parallel else None)

    def mlp_in(acts: Activations, layer: int) -> torch.Tensor:
        return normed(mlp_norm, acts[Point(kinds[-1], layer)], layer)

    return kinds, attn_in, mlp_in


def sites_of(point: Point, sites: tuple[tuple[str, Callable], ...]):
    """(site index, the site's input) for each site that `point` feeds, where each site is
    (the point kind it reads, `read(acts, layer)`): a pointwise reducer's view of one point."""
    for index, (kind, read) in enumerate(sites):
        if point.kind == kind:
            yield index, read


def projection_sites(loaded: LoadedModel) -> tuple[tuple[str, Callable], tuple[str, Callable]]:
    """`projection_inputs`' two sites (attention input, MLP input), each with the point kind it reads."""
    kinds, attn_in, mlp_in = projection_inputs(loaded)
    return ("resid_pre", attn_in), (kinds[-1], mlp_in)


def head_dim(loaded: LoadedModel) -> int:
    return getattr(loaded.config, "head_dim", None) or loaded.d_model // loaded.n_heads


def value_vectors(loaded: LoadedModel) -> Callable:
    """`values(attn_in, layer) -> [batch pos kv_head d_head]`: the value projection of each
    key, in the family's fused or separate layout (the adapter's `qkv_layout`)."""
    adapter = loaded.adapter
    blocks = adapter.layer_modules(loaded.model)
    d_head, n_heads, n_kv = head_dim(loaded), loaded.n_heads, loaded.n_kv_heads

    @torch.no_grad()
    def values(attn_in: torch.Tensor, layer: int) -> torch.Tensor:
        out = get_module(blocks[layer], adapter.attn_projections[-1]).forward(attn_in)  # no hooks: see `normed`
        b, t = out.shape[:2]
        if adapter.qkv_layout == "separate":
            return out.view(b, t, n_kv, d_head)
        if adapter.qkv_layout == "concat":  # [q | k | v], the value rows last
            return out[..., -n_kv * d_head:].reshape(b, t, n_kv, d_head)
        return out.view(b, t, n_heads, 3 * d_head)[..., 2 * d_head:]

    return values


# ---------------------------------------------------------------- next-token loss

@dataclass(frozen=True)
class LossResult:
    """`NextTokenLoss`' result: the mean next-token cross-entropy over `predictions` predictions."""

    loss: float
    predictions: int


@dataclass(frozen=True)
class NextTokenLoss:
    """Summed cross-entropy of every next-token prediction inside the windows, unembedded
    here in chunks of positions from the final norm's output as the pass produced it (so
    any intervention on the model is seen), without the model's full logits."""

    name: str = "loss"

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point("final_norm")]

    def start(self, loaded: LoadedModel) -> "_LossState":
        if not loaded.adapter.causal:
            raise UserError(f"a loss needs a causal language model; {loaded.spec.name} is an encoder")
        return _LossState(loaded)


class _LossState(PortableState):
    model_bound = ("loaded",)

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.ce = torch.zeros((), dtype=torch.float64)
        self.predictions = 0

    def update(self, acts: Activations, batch: Batch) -> None:
        normed = acts[Point("final_norm")]
        targets = batch.input_ids[:, 1:].reshape(-1).to(normed.device)
        self.ce += score_tokens(self.loaded, next_token_rows(normed)[None], targets).ce.double().sum().cpu()
        self.predictions += batch.input_ids[:, 1:].numel()

    def merge(self, other: "_LossState") -> None:
        self.ce += other.ce
        self.predictions += other.predictions

    def result(self) -> LossResult:
        return LossResult(loss=(self.ce / self.predictions).item(), predictions=self.predictions)


def mean_loss(loaded: LoadedModel, windows: TokenWindows, progress: bool = False) -> float:
    """Mean next-token cross-entropy over the windows, read through the hooks backend, which
    runs the HF module tree itself and so sees any intervention active on it."""
    return capture(loaded, windows, ProbeSpec((NextTokenLoss(),)), backend="hooks", progress=progress)["loss"].loss


# ---------------------------------------------------------------- massive activations

@dataclass(frozen=True)
class TopActivations:
    """Per layer, the top-k |x| over distinct (position, dim) pairs, largest first: `abs`
    (-1 where fewer than k were seen), the signed `value`, and where each peaked."""

    abs: Float[torch.Tensor, "layer rank"]
    value: Float[torch.Tensor, "layer rank"]
    at: Location


@dataclass(frozen=True)
class DimMax:
    """Per layer and dim, the largest |x| and where it occurred (`at.dim` is the dim itself)."""

    abs: Float[torch.Tensor, "layer d_model"]
    at: Location


@dataclass(frozen=True)
class MassiveResult:
    """`MassiveActivations`' result for the block outputs (`kind`) per layer: the `top` k,
    the log `histogram` of |x| and the `median` |x| read from it, each dim's largest |x|
    (`dim_max`), and per dim how many tokens exceed `min_value` at position 0
    (`over_first`) and at the other positions (`over_rest`)."""

    kind: str
    k: int
    min_value: float
    tokens: int
    top: TopActivations
    histogram: Int[torch.Tensor, "layer bin"]
    median: Float[torch.Tensor, "layer"]
    dim_max: DimMax
    over_first: Int[torch.Tensor, "layer d_model"]
    over_rest: Int[torch.Tensor, "layer d_model"]


@dataclass(frozen=True)
class MassiveActivations:
    """Per layer of `kind`: the top-k |x| over distinct (position, dim) pairs with the window
    and token where each peaked, a log histogram of |x| (for the median), each dim's largest
    |x| with where it occurred, and per dim the number of tokens with |x| > `min_value` at
    position 0 and at the other positions (Sun et al. 2024)."""

    k: int = 3
    min_value: float = 100.0
    kind: str = "resid_post"
    name: str = "massive"
    pointwise = True

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point(self.kind, l) for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_MassiveState":
        return _MassiveState(self.k, self.min_value, self.kind, loaded.n_layers, loaded.d_model)


class _MassiveState(PortableState):
    def __init__(self, k: int, min_value: float, kind: str, n_layers: int, d_model: int):
        self.k, self.min_value, self.kind = k, min_value, kind
        self.top_abs = torch.full((n_layers, k), -1.0, dtype=torch.float64)
        self.top_value = torch.zeros(n_layers, k, dtype=torch.float64)
        self.top_at = torch.zeros(n_layers, k, 4, dtype=torch.long)  # window, position, dim, token
        self.histogram = torch.zeros(n_layers, N_LOG_BINS, dtype=torch.long)
        self.dim_max = torch.full((n_layers, d_model), -1.0, dtype=torch.float64)
        self.dim_at = torch.zeros(n_layers, d_model, 3, dtype=torch.long)  # window, position, token
        self.over = torch.zeros(n_layers, d_model, 2, dtype=torch.long)  # position 0, other positions
        self.tokens = 0

    def update(self, acts: Activations, batch: Batch) -> None:
        for point, x in acts.items():
            layer, absx = point.layer, abs_of(x)
            if layer == 0:  # each point arrives once a batch
                self.tokens += batch.input_ids.numel()
            self.histogram[layer] += torch.bincount(_log_bins_of_abs(absx).flatten(), minlength=N_LOG_BINS)
            # int32 sums: a bool reduction into int64 costs several times more
            self.over[layer, :, 0] += (absx[:, 0] > self.min_value).sum(0, dtype=torch.int32)
            self.over[layer, :, 1] += (absx[:, 1:] > self.min_value).sum((0, 1), dtype=torch.int32)
            self._fold_dim_max(layer, absx, batch)
            self._fold_top(layer, x, absx, batch)

    def _fold_dim_max(self, layer: int, absx: torch.Tensor, batch: Batch) -> None:
        t = absx.shape[1]
        # The first of equal maxima over (window, position): the lowest window.
        value, flat = absx.flatten(0, 1).max(0)
        row, pos = flat // t, flat % t
        at = torch.stack([batch.windows[row], pos, batch.input_ids[row, pos]], dim=-1)
        self._keep_dim_max(layer, value.double(), at)

    def _keep_dim_max(self, layer, value: torch.Tensor, at: torch.Tensor) -> None:
        better = beats(value, at[..., 0], self.dim_max[layer], self.dim_at[layer, ..., 0])
        self.dim_max[layer] = torch.where(better, value, self.dim_max[layer])
        self.dim_at[layer] = torch.where(better[..., None], at, self.dim_at[layer])

    def _fold_top(self, layer: int, x: torch.Tensor, absx: torch.Tensor, batch: Batch) -> None:
        # The largest |x| of each (position, dim) over the batch's windows first: a pair
        # in the global top-k is then in the top-k of the batch where it peaks.
        per_pair = absx.amax(0)
        d = absx.shape[-1]
        value, flat = per_pair.flatten().topk(min(self.k, per_pair.numel()))
        pos, dim = flat // d, flat % d
        # The window of each chosen pair: its first where |x| reaches the pair's maximum
        # (a reduction with indices over k pairs rather than over every pair).
        win = (absx[:, pos, dim] == value).int().argmax(0)
        at = torch.stack([batch.windows[win], pos, dim, batch.input_ids[win, pos]], dim=-1)
        self._keep_top(layer, value.double(), x[win, pos, dim].double(), at)

    def _keep_top(self, layer: int, cand_abs: torch.Tensor, cand_value: torch.Tensor, cand_at: torch.Tensor) -> None:
        """Merge candidates into a layer's top-k: the k largest over distinct (position, dim),
        each pair with its largest |x|, the lower window first where equal."""
        candidates_abs = torch.cat([self.top_abs[layer], cand_abs])
        candidates_value = torch.cat([self.top_value[layer], cand_value])
        candidates_at = torch.cat([self.top_at[layer], cand_at])
        by_window = candidates_at[:, 0].argsort(stable=True)
        order = by_window[candidates_abs[by_window].argsort(descending=True, stable=True)]
        kept, seen = [], set()
        for i in order.tolist():
            key = tuple(candidates_at[i, 1:3].tolist())
            if candidates_abs[i] < 0 or key in seen:
                continue
            seen.add(key)
            kept.append(i)
            if len(kept) == self.k:
                break
        n = len(kept)
        self.top_abs[layer, :n] = candidates_abs[kept]
        self.top_value[layer, :n] = candidates_value[kept]
        self.top_at[layer, :n] = candidates_at[kept]

    def merge(self, other: "_MassiveState") -> None:
        require_same(self, other, "k", "min_value", "kind")
        self.tokens += other.tokens
        self.histogram += other.histogram
        self.over += other.over
        for layer in range(self.top_abs.shape[0]):
            self._keep_dim_max(layer, other.dim_max[layer], other.dim_at[layer])
            self._keep_top(layer, other.top_abs[layer], other.top_value[layer], other.top_at[layer])

    def result(self) -> MassiveResult:
        dims = torch.arange(self.dim_max.shape[1]).expand_as(self.dim_max)
        window, position, token = self.dim_at.clone().unbind(-1)
        return MassiveResult(
            kind=self.kind, k=self.k, min_value=self.min_value, tokens=self.tokens,
            top=TopActivations(self.top_abs.clone(), self.top_value.clone(), Location(*self.top_at.clone().unbind(-1))),
            histogram=self.histogram.clone(), median=log_histogram_quantile(self.histogram),
            dim_max=DimMax(self.dim_max.clone(), Location(window, position, dims, token)),
            over_first=self.over[..., 0].clone(), over_rest=self.over[..., 1].clone())


@dataclass(frozen=True)
class ThresholdedMeanResult:
    """`ThresholdedMean`'s result: per chosen dim, the mean of the values at or over the
    threshold and how many there were."""

    dims: list[int]
    mean: Float[torch.Tensor, "dim"]
    count: Int[torch.Tensor, "dim"]


@dataclass(frozen=True)
class ThresholdedMean:
    """Per dim of one point: the mean of the values whose |x| >= threshold, and how many there were."""

    point: Point
    dims: tuple[int, ...]
    threshold: float
    name: str = "thresholded_mean"

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [self.point]

    def start(self, loaded: LoadedModel) -> "_ThresholdedMeanState":
        return _ThresholdedMeanState(self.point, list(self.dims), self.threshold)


class _ThresholdedMeanState(PortableState):
    def __init__(self, point: Point, dims: list[int], threshold: float):
        self.point, self.dims, self.threshold = point, dims, threshold
        self.sums = torch.zeros(len(dims), dtype=torch.float64)
        self.counts = torch.zeros(len(dims), dtype=torch.long)

    def update(self, acts: Activations, batch: Batch) -> None:
        x = acts[self.point][..., self.dims]
        hit = x.abs() >= self.threshold
        self.sums += torch.where(hit, x, 0).double().sum((0, 1))
        self.counts += hit.sum((0, 1))

    def merge(self, other: "_ThresholdedMeanState") -> None:
        require_same(self, other, "point", "dims", "threshold")
        self.sums += other.sums
        self.counts += other.counts

    def result(self) -> ThresholdedMeanResult:
        return ThresholdedMeanResult(dims=list(self.dims), mean=self.sums / self.counts.clamp_min(1),
                                     count=self.counts.clone())


# ---------------------------------------------------------------- LLM.int8 outlier features

@dataclass(frozen=True)
class OutlierCounts:
    """At one projection input, per layer and dim: how many tokens reach the threshold, and the largest |x|."""

    counts: Int[torch.Tensor, "layer d_model"]
    max_abs: Float[torch.Tensor, "layer d_model"]


@dataclass(frozen=True)
class ProjectionOutliersResult:
    """`ProjectionOutliers`' result: the counts at the attention projections' input
    (`attn_in`) and the MLP up-projection's (`mlp_in`), over `tokens` tokens."""

    threshold: float
    tokens: int
    attn_in: OutlierCounts
    mlp_in: OutlierCounts

    def by_site(self) -> dict[str, OutlierCounts]:
        return {site: getattr(self, site) for site in PROJECTION_SITES}


@dataclass(frozen=True)
class ProjectionOutliers:
    """Per layer, per projection input (attention, MLP up-projection) and per dim: how many
    tokens have |x| >= threshold, and the largest |x| (Dettmers et al. 2022, LLM.int8())."""

    threshold: float = 6.0
    name: str = "projection_outliers"
    pointwise = True

    def points(self, loaded: LoadedModel) -> list[Point]:
        kinds = projection_inputs(loaded)[0]
        return [Point(k, l) for k in kinds for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_ProjectionOutlierState":
        return _ProjectionOutlierState(self.threshold, projection_sites(loaded), loaded.n_layers, loaded.d_model)


class _ProjectionOutlierState(PortableState):
    model_bound = ("inputs",)

    def __init__(self, threshold: float, inputs: tuple[tuple[str, Callable], ...], n_layers: int, d_model: int):
        self.threshold, self.inputs, self.n_layers = threshold, inputs, n_layers
        # [layer site dim], sites in PROJECTION_SITES order
        self.counts = torch.zeros(n_layers, len(PROJECTION_SITES), d_model, dtype=torch.long)
        self.max_abs = torch.zeros(n_layers, len(PROJECTION_SITES), d_model, dtype=torch.float64)
        self.tokens = 0

    def update(self, acts: Activations, batch: Batch) -> None:
        for point, x in acts.items():
            for site, read in sites_of(point, self.inputs):
                if site == 0 and point.layer == 0:  # each point arrives once a batch
                    self.tokens += batch.input_ids.numel()
                absx = abs_of(read({point: x}, point.layer)).flatten(0, 1)
                self.counts[point.layer, site] += (absx >= self.threshold).sum(0, dtype=torch.int32)
                self.max_abs[point.layer, site] = torch.maximum(self.max_abs[point.layer, site],
                                                                absx.amax(0).double())

    def merge(self, other: "_ProjectionOutlierState") -> None:
        require_same(self, other, "threshold", "n_layers")
        self.counts += other.counts
        self.max_abs = torch.maximum(self.max_abs, other.max_abs)
        self.tokens += other.tokens

    def result(self) -> ProjectionOutliersResult:
        sites = [OutlierCounts(self.counts[:, s].clone(), self.max_abs[:, s].clone())
                 for s in range(len(PROJECTION_SITES))]
        return ProjectionOutliersResult(self.threshold, self.tokens, *sites)


# ---------------------------------------------------------------- kurtosis

KURTOSIS_SITES = ("resid_post", *PROJECTION_SITES)


def token_excess_kurtosis(x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos"]:
    """relu(m4 / m2^2 - 3) of each token's vector over its dims, with central moments
    (scipy.stats.kurtosis with fisher=True, bias=True, floored at 0)."""
    # One float64 copy, worked on in place: centred, then squared, then to the fourth power.
    squared = x.to(torch.float64, copy=True)
    squared.sub_(squared.mean(-1, keepdim=True)).square_()
    m2 = squared.mean(-1)
    m4 = squared.square_().mean(-1)
    return (m4 / m2.square().clamp_min(torch.finfo(torch.float64).tiny) - 3).clamp_min(0)


@dataclass(frozen=True)
class KurtosisSums:
    """At one site, per layer: the summed per-token excess kurtosis and the token count, at
    position 0 and at the other positions."""

    sum_first: Float[torch.Tensor, "layer"]
    sum_rest: Float[torch.Tensor, "layer"]
    tokens_first: Int[torch.Tensor, "layer"]
    tokens_rest: Int[torch.Tensor, "layer"]


@dataclass(frozen=True)
class KurtosisResult:
    """`TokenKurtosis`' result at the block output and the two projection inputs."""

    resid_post: KurtosisSums
    attn_in: KurtosisSums
    mlp_in: KurtosisSums

    def by_site(self) -> dict[str, KurtosisSums]:
        return {site: getattr(self, site) for site in KURTOSIS_SITES}


@dataclass(frozen=True)
class TokenKurtosis:
    """Per layer and site (block output, attention input, MLP input): the summed per-token
    excess kurtosis and token count, position 0 apart from the rest."""

    name: str = "kurtosis"
    pointwise = True

    def points(self, loaded: LoadedModel) -> list[Point]:
        kinds = projection_inputs(loaded)[0]
        return [Point(k, l) for k in (*kinds, "resid_post") for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_KurtosisState":
        block_out = ("resid_post", lambda acts, layer: acts[Point("resid_post", layer)])
        return _KurtosisState((block_out, *projection_sites(loaded)), loaded.n_layers)


class _KurtosisState(PortableState):
    model_bound = ("sites",)

    def __init__(self, sites: tuple[tuple[str, Callable], ...], n_layers: int):
        self.sites, self.n_layers = sites, n_layers
        # [site layer slot], sites in KURTOSIS_SITES order; slot 0 is position 0
        self.sums = torch.zeros(len(KURTOSIS_SITES), n_layers, 2, dtype=torch.float64)
        self.counts = torch.zeros(len(KURTOSIS_SITES), n_layers, 2, dtype=torch.long)

    def update(self, acts: Activations, batch: Batch) -> None:
        for point, x in acts.items():
            for site, read in sites_of(point, self.sites):
                kurt = token_excess_kurtosis(read({point: x}, point.layer))
                self.sums[site, point.layer] += torch.stack([kurt[:, 0].sum(), kurt[:, 1:].sum()])
                self.counts[site, point.layer] += torch.tensor([kurt[:, 0].numel(), kurt[:, 1:].numel()])

    def merge(self, other: "_KurtosisState") -> None:
        require_same(self, other, "n_layers")
        self.sums += other.sums
        self.counts += other.counts

    def result(self) -> KurtosisResult:
        return KurtosisResult(*(KurtosisSums(self.sums[s, :, 0].clone(), self.sums[s, :, 1].clone(),
                                             self.counts[s, :, 0].clone(), self.counts[s, :, 1].clone())
                                for s in range(len(KURTOSIS_SITES))))


# ---------------------------------------------------------------- attention sinks

def attention_entropy(pattern: Float[torch.Tensor, "batch head pos pos"], causal: bool = False
                      ) -> Float[torch.Tensor, "batch head pos"]:
    """-sum_k A[t,k] log A[t,k] of each query's attention distribution, in nats.

    Each term in float32 (within 1.2e-7 of its value: float64 logarithms cost several times
    more), summed in float64.  Under a causal mask the first half of the queries sees only
    the first half of the keys, so the zeros beyond are not visited."""
    wide = pattern if pattern.dtype == torch.float64 else pattern.float()
    if causal and wide.shape[-1] > 1:
        half = wide.shape[-1] // 2
        return torch.cat([_entropy(wide[..., :half, :half]), _entropy(wide[..., half:, :])], dim=-1)
    return _entropy(wide)


def _entropy(pattern: torch.Tensor) -> torch.Tensor:
    # a log a with log(0) clamped to a finite value, so 0 log 0 = 0: the vectorised log
    # costs half of xlogy.
    logs = pattern.clamp_min(torch.finfo(pattern.dtype).tiny).log_()
    return -logs.mul_(pattern).sum(-1, dtype=torch.float64)


@dataclass(frozen=True)
class AttentionSinksResult:
    """`AttentionSinks`' result over `windows` windows of `length` tokens, per layer and head:
    `alpha` (alpha_k of Gu et al. for every key position k), `sink_fraction` (the fraction
    of windows whose alpha_0 exceeds `eps`), the mean `entropy` of queries t >= 1; and per
    KV head the mean value norm at position 0 (`value_norm_first`) and at the others."""

    eps: float
    windows: int
    length: int
    alpha: Float[torch.Tensor, "layer head pos"]
    sink_fraction: Float[torch.Tensor, "layer head"]
    entropy: Float[torch.Tensor, "layer head"]
    value_norm_first: Float[torch.Tensor, "layer kv_head"]
    value_norm_rest: Float[torch.Tensor, "layer kv_head"]


@dataclass(frozen=True)
class AttentionSinks:
    """Per layer and head: the attention mass summed over queries on each key position, the
    number of windows whose alpha_0 exceeds `eps` (Gu et al. 2025), the summed attention
    entropy of queries t >= 1, and per KV head the summed value norms at position 0 and at
    the other positions (StreamingLLM; Gu et al.).

    Attention patterns need eager attention; the backends switch to it when asked for one.
    """

    eps: float = 0.3
    name: str = "attention_sinks"
    pointwise = True

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point(k, l) for k in ("attn_pattern", "resid_pre") for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_SinkState":
        attn_in = projection_inputs(loaded)[1]
        values = value_vectors(loaded)
        return _SinkState(self.eps, lambda x, layer: values(attn_in({Point("resid_pre", layer): x}, layer), layer),
                          loaded.n_layers, loaded.n_heads, loaded.n_kv_heads, loaded.adapter.causal)


class _SinkState(PortableState):
    model_bound = ("values",)

    def __init__(self, eps: float, values: Callable, n_layers: int, n_heads: int, n_kv: int, causal: bool):
        self.eps, self.values, self.causal = eps, values, causal
        self.n_layers, self.n_heads = n_layers, n_heads
        self.key_mass = None  # [layer head key], sized by the first batch's window length
        self.sink_windows = torch.zeros(n_layers, n_heads, dtype=torch.long)
        self.entropy = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.value_norms = torch.zeros(n_layers, n_kv, 2, dtype=torch.float64)  # position 0, others summed
        self.windows = 0
        self.length = 0

    def update(self, acts: Activations, batch: Batch) -> None:
        b, t = batch.input_ids.shape
        self._check_length(t)
        if self.key_mass is None:
            self.key_mass = torch.zeros(self.n_layers, self.n_heads, t, dtype=torch.float64)
            self.length = t
        for point, x in acts.items():
            layer = point.layer
            if point.kind == "resid_pre":
                norms = self.values(x, layer).double().norm(dim=-1)  # [batch pos kv_head]
                self.value_norms[layer, :, 0] += norms[:, 0].sum(0)
                self.value_norms[layer, :, 1] += norms[:, 1:].sum((0, 1))
                continue
            if layer == 0:  # each point arrives once a batch
                self.windows += b
            mass = x.sum(2, dtype=torch.float64)  # [batch head key]
            self.key_mass[layer] += mass.sum(0)
            self.sink_windows[layer] += (mass[..., 0] / self._queries_seeing(t)[0] > self.eps).sum(0)
            self.entropy[layer] += attention_entropy(x, self.causal)[:, :, 1:].sum((0, 2))

    def _check_length(self, t: int) -> None:
        if self.key_mass is not None and t != self.length:
            raise UserError(f"attention sinks need windows of one length; got {self.length} and {t}")

    def _queries_seeing(self, t: int) -> torch.Tensor:
        """How many queries can attend to each key: t - k under a causal mask, else t."""
        return (t - torch.arange(t)).double() if self.causal else torch.full((t,), float(t), dtype=torch.float64)

    def merge(self, other: "_SinkState") -> None:
        require_same(self, other, "eps", "causal", "n_layers", "n_heads")
        if other.key_mass is None:
            return
        self._check_length(other.length)
        if self.key_mass is None:
            self.key_mass, self.length = other.key_mass.clone(), other.length
        else:
            self.key_mass += other.key_mass
        self.sink_windows += other.sink_windows
        self.entropy += other.entropy
        self.value_norms += other.value_norms
        self.windows += other.windows

    def result(self) -> AttentionSinksResult:
        t = self.length
        alpha = self.key_mass / (self.windows * self._queries_seeing(t)).clamp_min(1)
        return AttentionSinksResult(
            eps=self.eps, windows=self.windows, length=t, alpha=alpha,
            sink_fraction=self.sink_windows / max(self.windows, 1),
            entropy=self.entropy / max(self.windows * (t - 1), 1),
            value_norm_first=self.value_norms[..., 0] / max(self.windows, 1),
            value_norm_rest=self.value_norms[..., 1] / max(self.windows * (t - 1), 1))


# ---------------------------------------------------------------- residual sinks

@dataclass(frozen=True)
class ResidualSinksResult:
    """`ResidualSinks`' result per layer: how many of `tokens` tokens have each dim as their
    argmax |h| (`argmax_counts`), and the token mean of max_d |h_td| / ||h_t|| (`mean_share`)."""

    tokens: int
    argmax_counts: Int[torch.Tensor, "layer d_model"]
    mean_share: Float[torch.Tensor, "layer"]


@dataclass(frozen=True)
class ResidualSinks:
    """Per layer of `kind`: how often each dim is a token's argmax |h|, and the sum over
    tokens of max_d |h_td| / ||h_t|| ("A Unified View of Attention and Residual Sinks")."""

    kind: str = "resid_post"
    name: str = "residual_sinks"
    pointwise = True

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point(self.kind, l) for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_ResidualSinkState":
        return _ResidualSinkState(loaded.n_layers, loaded.d_model)


class _ResidualSinkState(PortableState):
    def __init__(self, n_layers: int, d_model: int):
        self.argmax_counts = torch.zeros(n_layers, d_model, dtype=torch.long)
        self.share_sum = torch.zeros(n_layers, dtype=torch.float64)
        self.tokens = 0

    def update(self, acts: Activations, batch: Batch) -> None:
        for point, h in acts.items():
            if point.layer == 0:  # each point arrives once a batch
                self.tokens += batch.input_ids.numel()
            top, dim = abs_of(h).max(-1)
            self.argmax_counts[point.layer] += torch.bincount(dim.flatten(), minlength=h.shape[-1])
            self.share_sum[point.layer] += (top.double() / token_norms64(h).clamp_min(1e-30)).sum()

    def merge(self, other: "_ResidualSinkState") -> None:
        if self.argmax_counts.shape != other.argmax_counts.shape:
            raise ValueError("cannot merge residual-sink states of different models")
        self.argmax_counts += other.argmax_counts
        self.share_sum += other.share_sum
        self.tokens += other.tokens

    def result(self) -> ResidualSinksResult:
        return ResidualSinksResult(tokens=self.tokens, argmax_counts=self.argmax_counts.clone(),
                                   mean_share=self.share_sum / max(self.tokens, 1))
