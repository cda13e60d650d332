"""Streaming reducers: fixed-size running statistics folded batch by batch.

Each reducer holds tensors whose size depends on the model (layers, d_model), never on
the number of tokens seen.  Sums are kept in float64 so that long corpora do not lose
precision.  Every state merges with a state of the same reducer over other windows
(sums add, maxima keep the larger with its location), and reads out as a frozen dataclass
with named fields.

Where two values tie for a maximum, the one in the lower corpus window is kept, in a fold
as in a merge, so a merged result equals the folded one whatever the split.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from layerscope.probes.backends import Activations, Point, execution_order
from layerscope.probes.capture import Batch, PortableState, require_same
from layerscope.probes.zoo import LoadedModel


@dataclass(frozen=True)
class Location:
    """Where each of a set of values sits in the corpus: the window (its index in the
    corpus), the position in it, the dim, and the token id at that position."""

    window: Int[torch.Tensor, "*where"]
    position: Int[torch.Tensor, "*where"]
    dim: Int[torch.Tensor, "*where"]
    token: Int[torch.Tensor, "*where"]

    def at(self, *index) -> tuple[int, int, int, int]:
        """(window, position, dim, token) of one entry, as ints."""
        return (int(self.window[index]), int(self.position[index]), int(self.dim[index]), int(self.token[index]))


def beats(value: torch.Tensor, window: torch.Tensor, held: torch.Tensor, held_window: torch.Tensor) -> torch.Tensor:
    """Whether a candidate maximum replaces the held one: larger, or as large and from a lower window."""
    return (value > held) | ((value == held) & (window < held_window))


# ---------------------------------------------------------------- moments

# A batch's moments are packed in this order so that each point costs one add.
_MOMENT_FIELDS = ("tokens", "sum_norm", "elements", "sum_x", "sum_x_sq")


@dataclass(frozen=True)
class Moments:
    """Token sums over one set of positions: the token count, the sum of token L2 norms,
    the element count, and the sum and sum of squares of the elements (which is also the
    sum of squared token norms)."""

    tokens: Float[torch.Tensor, "*where"]
    sum_norm: Float[torch.Tensor, "*where"]
    elements: Float[torch.Tensor, "*where"]
    sum_x: Float[torch.Tensor, "*where"]
    sum_x_sq: Float[torch.Tensor, "*where"]

    @classmethod
    def unpack(cls, packed: Float[torch.Tensor, "*where 5"]) -> "Moments":
        return cls(*packed.unbind(-1))

    @property
    def mean_norm(self) -> Float[torch.Tensor, "*where"]:
        return self.sum_norm / self.tokens

    @property
    def mean(self) -> Float[torch.Tensor, "*where"]:
        return self.sum_x / self.elements

    @property
    def variance(self) -> Float[torch.Tensor, "*where"]:
        """Over all elements, unbiased as torch.var's default."""
        return (self.sum_x_sq - self.elements * self.mean.square()) / (self.elements - 1)

    @property
    def std(self) -> Float[torch.Tensor, "*where"]:
        return self.variance.clamp_min(0).sqrt()


@dataclass(frozen=True)
class PointMoments:
    """One point kind, per layer: moments at position 0 and at the other positions (None
    when only the largest |x| was asked for), and the largest |x| with where it occurred."""

    first: Moments | None
    rest: Moments | None
    max_abs: Float[torch.Tensor, "layer"]
    max_at: Location


@dataclass(frozen=True)
class MomentsResult:
    """`ResidualMoments`' result: each point kind's `PointMoments`."""

    kinds: dict[str, PointMoments]

    def __getitem__(self, kind: str) -> PointMoments:
        return self.kinds[kind]


@dataclass(frozen=True)
class ResidualMoments:
    """Per point: token count, sum of L2 norms, element count, sum and sum of
    squares (position 0 apart from the rest), and the largest |x| with its location; with
    `sums=False`, only the largest |x| and its location."""

    kinds: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
    name: str = "moments"
    sums: bool = True
    pointwise = True

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point(k, l) for k in self.kinds for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_MomentsState":
        return _MomentsState(self.kinds, loaded.n_layers, self.sums)


class _MomentsState(PortableState):
    model_bound = ("_shared",)

    def __init__(self, kinds: tuple[str, ...], n_layers: int, sums: bool = True):
        self.kinds, self.sums = kinds, sums
        shape = (len(kinds), n_layers)
        # [kind layer slot field]: slot 0 is position 0, slot 1 the other positions.
        self.moments = torch.zeros(*shape, 2, len(_MOMENT_FIELDS), dtype=torch.float64)
        self.max_abs = torch.full(shape, -1.0, dtype=torch.float64)
        # window, position, dim, token id of the largest |x|
        self.max_at = torch.zeros(*shape, 4, dtype=torch.long)
        self._shared = _SharedTensor()

    def update(self, acts: Activations, batch: Batch) -> None:
        for (k, l), x in _by_index(acts, self.kinds):
            moments, value = self._shared.reduce(x, _moments_and_max if self.sums else _max_only)
            if self.sums:
                self.moments[k, l] += moments
            value = value.double()
            # Only a value at least as large as the held one can replace it, and only then
            # is its location needed.
            if not bool(value >= self.max_abs[k, l]):
                continue
            row, pos, dim = first_reaching(x, value)
            window = batch.windows[row]
            if beats(value, window, self.max_abs[k, l], self.max_at[k, l, 0]):
                self.max_abs[k, l] = value.item()
                self.max_at[k, l] = torch.stack([window, pos, dim, batch.input_ids[row, pos]])

    def merge(self, other: "_MomentsState") -> None:
        require_same(self, other, "kinds", "sums")
        self.moments += other.moments
        better = beats(other.max_abs, other.max_at[..., 0], self.max_abs, self.max_at[..., 0])
        self.max_abs = torch.where(better, other.max_abs, self.max_abs)
        self.max_at = torch.where(better[..., None], other.max_at, self.max_at)

    def result(self) -> MomentsResult:
        self._shared = _SharedTensor()
        moments = lambda k, slot: Moments.unpack(self.moments[k, :, slot].clone()) if self.sums else None
        return MomentsResult({kind: PointMoments(
            first=moments(k, 0), rest=moments(k, 1),
            max_abs=self.max_abs[k].clone(), max_at=Location(*self.max_at[k].clone().unbind(-1)),
        ) for k, kind in enumerate(self.kinds)})


def _max_only(x: torch.Tensor) -> tuple:
    # The largest |x| is the larger of max(x) and -min(x): reductions without indices, which
    # cost a tenth of those with, and no |x| to write.
    return None, torch.maximum(x.amax(), x.amin().neg())


def _moments_and_max(x: torch.Tensor) -> tuple:
    return _batch_moments(x), _max_only(x)[1]


def first_reaching(x: Float[torch.Tensor, "batch pos d"], value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(batch row, position, dim) of the first element, in that order, whose |x| equals
    `value`, the largest |x|: found among each token's largest |x| first, then in that
    token's dims alone, so no index-tracking reduction runs over the whole tensor."""
    tokens = x.flatten(0, -2)
    token_max = torch.maximum(tokens.amax(-1), tokens.amin(-1).neg()).to(value.dtype)
    token = (token_max == value).nonzero()[0, 0]
    dim = (tokens[token].abs().to(value.dtype) == value).nonzero()[0, 0]
    return token // x.shape[1], token % x.shape[1], dim


def _storage_key(x: torch.Tensor) -> tuple:
    return x.data_ptr(), tuple(x.shape), tuple(x.stride())


# What reducers derived from an activation, by (storage, what): see `per_tensor`.
_DERIVED: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}


def per_tensor(x: torch.Tensor, what: str, compute) -> torch.Tensor:
    """`compute(x)`, computed once for as long as `x` lives: the reducers of a pass that read
    one activation share what they derive from it (its |x|, its token norms) instead of each
    computing it again.  Keyed by `x`'s storage, so that resid_post[l] and resid_pre[l+1],
    one tensor seen through two hooks, share too; an entry goes when the tensor it was
    computed from does.  `compute` must return a new tensor, never `x` or a view of it."""
    slot = (_storage_key(x), x.dtype, x.device, what)
    hit = _DERIVED.get(slot)
    if hit is not None and hit[0]() is not None:
        return hit[1]
    value = compute(x)
    _DERIVED[slot] = (weakref.ref(x), value)
    weakref.finalize(x, _DERIVED.pop, slot, None)
    return value


def abs_of(x: torch.Tensor) -> torch.Tensor:
    """|x|, shared between the reducers that read `x`."""
    return per_tensor(x, "abs", torch.abs)


def token_norms64(x: Float[torch.Tensor, "batch pos d"]) -> Float[torch.Tensor, "batch pos"]:
    """Each token's L2 norm, computed in float64, shared between the reducers that read `x`."""
    return per_tensor(x, "norm64", lambda x: x.double().norm(dim=-1))


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


def _batch_moments(x: Float[torch.Tensor, "batch pos _"]) -> Float[torch.Tensor, "2 5"]:
    """A batch's moments (in `_MOMENT_FIELDS` order) for position 0 and for the other positions.

    Sums run in float32 over one batch and are accumulated across batches in float64."""
    out = torch.empty(2, len(_MOMENT_FIELDS), dtype=torch.float64)
    for slot, part in enumerate((x[:, :1], x[:, 1:])):
        norm_sq = part.square().sum(dim=-1)
        out[slot] = torch.stack([
            torch.tensor(float(norm_sq.numel())), norm_sq.sqrt().sum(),
            torch.tensor(float(part.numel())), part.sum(), norm_sq.sum(),
        ]).double()
    return out


# ---------------------------------------------------------------- cosines

@dataclass(frozen=True)
class CosineMeans:
    """`LayerCosines`' result, per layer: the token means of cos(resid_pre, resid_post)
    (`block`), cos(resid_pre, resid_mid) (`attn`), cos(resid_mid, resid_post) (`mlp`), and
    the angular distance over the reducer's span from this layer (NaN where the span runs
    past the last layer or no span was asked for); `tokens` averaged over."""

    block: Float[torch.Tensor, "layer"]
    attn: Float[torch.Tensor, "layer"]
    mlp: Float[torch.Tensor, "layer"]
    angular: Float[torch.Tensor, "layer"]
    tokens: int


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


class _CosinesState(PortableState):
    model_bound = ("_shared", "waiting", "span_starts", "span_ends")
    # Columns of the packed sums.
    BLOCK, ATTN, MLP, ANGULAR = range(4)

    def __init__(self, spec: LayerCosines, n_layers: int):
        self.spec = spec
        self.n_layers = n_layers
        self.sums = torch.zeros(n_layers, 4, dtype=torch.float64)
        self.tokens = 0
        # Points of layers not yet complete in float64 with their token norms, and the ends
        # of angular spans whose other end has not arrived: inputs by first layer, outputs
        # by last layer.
        self.waiting: dict[Point, tuple[torch.Tensor, torch.Tensor]] = {}
        self.span_starts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.span_ends: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._shared = _SharedTensor()

    def update(self, acts: Activations, batch: Batch) -> None:
        widen = _widen_from_1 if self.spec.exclude_first else _widen
        for p in sorted(acts, key=execution_order):
            self.waiting[p] = self._shared.reduce(acts[p], widen)
            self._close_if_complete(p.layer)

    def _close_if_complete(self, layer: int) -> None:
        # A backend may stream some points and return the rest after the pass (a derived
        # resid_mid, or points another reducer keeps), so a layer closes when its last
        # point arrives, whichever that is, and layers may complete in any order.
        wanted = [Point(kind, layer) for kind in ("resid_pre", "resid_mid", "resid_post")]
        if not all(p in self.waiting for p in wanted):
            return
        pre, mid, post = (self.waiting.pop(p) for p in wanted)
        self.sums[layer, self.BLOCK] += _cosine_sum(pre, post)
        self.sums[layer, self.ATTN] += _cosine_sum(pre, mid)
        self.sums[layer, self.MLP] += _cosine_sum(mid, post)
        if layer == 0:
            self.tokens += pre[1].numel()
        span = self.spec.span
        if span > 0:
            if layer + span - 1 < self.n_layers:
                self.span_starts[layer] = pre
            if layer - span + 1 >= 0:
                self.span_ends[layer] = post
            for first in (layer, layer - span + 1):
                if first in self.span_starts and first + span - 1 in self.span_ends:
                    start, end = self.span_starts.pop(first), self.span_ends.pop(first + span - 1)
                    cos = (_dot(start, end) / (start[1] * end[1]).clamp_min(_EPS)).clamp(-1, 1)
                    self.sums[first, self.ANGULAR] += (torch.arccos(cos) / torch.pi).sum()

    def merge(self, other: "_CosinesState") -> None:
        require_same(self, other, "spec", "n_layers")
        if getattr(self, "waiting", None) or getattr(other, "waiting", None):
            raise ValueError("cannot merge cosines in the middle of a batch")
        self.sums += other.sums
        self.tokens += other.tokens

    def result(self) -> CosineMeans:
        self._shared = _SharedTensor()
        mean = self.sums / self.tokens
        angular = mean[:, self.ANGULAR].clone()
        angular[self.n_layers - self.spec.span + 1 if self.spec.span > 0 else 0:] = float("nan")
        return CosineMeans(block=mean[:, self.BLOCK], attn=mean[:, self.ATTN], mlp=mean[:, self.MLP],
                           angular=angular, tokens=self.tokens)


# torch.nn.functional.cosine_similarity's floor on the product of norms
_EPS = 1e-8


def _widen(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A point in float64 with its token norms (taken from that float64 copy when no other
    reducer has taken them yet)."""
    wide = x.double()
    return wide, per_tensor(x, "norm64", lambda _: wide.norm(dim=-1))


def _widen_from_1(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wide, norms = _widen(x)
    return wide[:, 1:], norms[:, 1:]


def _dot(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> Float[torch.Tensor, "batch pos"]:
    return (a[0] * b[0]).sum(dim=-1)


def _cosine_sum(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Token sum of cos(a, b), from float64 values and their precomputed token norms."""
    return (_dot(a, b) / (a[1] * b[1]).clamp_min(_EPS)).sum()


# ---------------------------------------------------------------- sublayer ratios

@dataclass(frozen=True)
class SublayerRatioMeans:
    """`SublayerRatios`' result, per layer: the token means (positions >= 1) of
    ||attn_out|| / ||resid_pre|| (`attn`) and ||mlp_out|| / ||resid_mid|| (`mlp`)."""

    attn: Float[torch.Tensor, "layer"]
    mlp: Float[torch.Tensor, "layer"]
    tokens: int


@dataclass(frozen=True)
class SublayerRatios:
    """Token means (non-first positions) of ||attn_out|| / ||resid_pre|| and
    ||mlp_out|| / ||resid_mid||: how much each sublayer writes relative to what it reads."""

    name: str = "sublayer_ratios"
    pointwise = True

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point(k, l) for k in ("resid_pre", "resid_mid", "attn_out", "mlp_out") for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_RatiosState":
        return _RatiosState(loaded.n_layers)


# Each sublayer's output, with the point it reads.
_SUBLAYERS = (("attn_out", "resid_pre"), ("mlp_out", "resid_mid"))


class _RatiosState(PortableState):
    model_bound = ("waiting",)

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.attn = torch.zeros(n_layers, dtype=torch.float64)
        self.mlp = torch.zeros(n_layers, dtype=torch.float64)
        self.tokens = 0
        # Token norms (positions >= 1) of points whose partner has not arrived yet.
        self.waiting: dict[Point, torch.Tensor] = {}

    def update(self, acts: Activations, batch: Batch) -> None:
        for point, x in acts.items():
            self.waiting[point] = token_norms64(x)[:, 1:]
            sums, (out, into) = next((sums, pair) for sums, pair in zip((self.attn, self.mlp), _SUBLAYERS)
                                     if point.kind in pair)
            out, into = Point(out, point.layer), Point(into, point.layer)
            if out in self.waiting and into in self.waiting:
                ratio = self.waiting.pop(out) / self.waiting.pop(into)
                sums[point.layer] += ratio.sum()
                if sums is self.attn and point.layer == 0:  # once a batch
                    self.tokens += ratio.numel()

    def merge(self, other: "_RatiosState") -> None:
        require_same(self, other, "n_layers")
        if getattr(self, "waiting", None) or getattr(other, "waiting", None):
            raise ValueError("cannot merge sublayer ratios in the middle of a batch")
        self.attn += other.attn
        self.mlp += other.mlp
        self.tokens += other.tokens

    def result(self) -> SublayerRatioMeans:
        return SublayerRatioMeans(attn=self.attn / self.tokens, mlp=self.mlp / self.tokens, tokens=self.tokens)


# ---------------------------------------------------------------- logit lens

@dataclass(frozen=True)
class LensGrid:
    """One window of the corpus (the reducer's `window`): its tokens, and each layer's top
    token and probability at every position, its `top_k` tokens and probabilities, and the
    rank (1 = top) of the true next token (0 at the last position, which has none)."""

    input_ids: Int[torch.Tensor, "pos"]
    top_token: Int[torch.Tensor, "layer pos"]
    top_prob: Float[torch.Tensor, "layer pos"]
    top_k_tokens: Int[torch.Tensor, "layer pos k"] | None = None
    top_k_probs: Float[torch.Tensor, "layer pos k"] | None = None
    target_rank: Int[torch.Tensor, "layer pos"] | None = None


@dataclass(frozen=True)
class LogitLensResult:
    """`LogitLens`' result, per layer: token means of the next-token cross-entropy
    (`ce`), top-1 accuracy and KL from the final distribution; the first window's grid
    (None when the corpus's window 0 was not folded)."""

    ce: Float[torch.Tensor, "layer"]
    top1_accuracy: Float[torch.Tensor, "layer"]
    kl_to_final: Float[torch.Tensor, "layer"]
    tokens: int
    grid: LensGrid | None


@dataclass(frozen=True)
class LogitLens:
    """Per layer, token sums of the next-token cross-entropy and top-1 accuracy of
    `unembed(final_norm(resid_post[l]))`, and its KL from the model's final distribution
    (the same read of the last block's output); plus, for the corpus's first window, each
    layer's top token and its probability at every position (nostalgebraist 2020,
    "interpreting GPT: the logit lens").

    The lens reads no logits of the pass: every layer, the last included, is unembedded
    here, all layers' chunks of positions in one matmul."""

    name: str = "logit_lens"
    window: int = 0
    top_k: int = 5

    def points(self, loaded: LoadedModel) -> list[Point]:
        return [Point("resid_post", l) for l in range(loaded.n_layers)]

    def start(self, loaded: LoadedModel) -> "_LensState":
        return _LensState(loaded, self.window, self.top_k)


class _LensState(PortableState):
    model_bound = ("loaded",)

    def __init__(self, loaded: LoadedModel, window: int = 0, top_k: int = 5):
        self.loaded = loaded
        self.n_layers = loaded.n_layers
        self.window, self.top_k = window, top_k
        self.sums = torch.zeros(loaded.n_layers, 3, dtype=torch.float64)  # ce, correct, kl
        self.tokens = 0
        self.grid: LensGrid | None = None

    def update(self, acts: Activations, batch: Batch) -> None:
        from layerscope.probes.replay import final_normed, next_token_targets, score_tokens

        resid = torch.stack([acts[Point("resid_post", layer)] for layer in range(self.n_layers)])
        normed = final_normed(self.loaded, resid).flatten(1, 2)
        targets = next_token_targets(batch.input_ids).to(normed.device)
        scores = score_tokens(self.loaded, normed, targets, reference=self.n_layers - 1)
        has_target = targets >= 0
        self.sums[:, 0] += scores.ce.double().sum(dim=-1).cpu()
        self.sums[:, 1] += ((scores.top == targets) & has_target).sum(dim=-1).cpu()
        self.sums[:, 2] += (scores.kl * has_target).double().sum(dim=-1).cpu()
        hit = (batch.windows == self.window).nonzero()
        if len(hit):
            self.grid = self._grid(batch.input_ids[int(hit[0, 0])], resid[:, int(hit[0, 0])])
        self.tokens += batch.input_ids[:, 1:].numel()

    def _grid(self, input_ids: Int[torch.Tensor, "pos"], resid: Float[torch.Tensor, "layer pos d_model"]) -> LensGrid:
        """The chosen window's top-k tokens per layer and position, and the rank (1 = top) of
        the true next token, with the positions unembedded in chunks like `score_tokens`."""
        from layerscope.probes.replay import CHUNK_BYTES, final_normed, head_logits

        normed = final_normed(self.loaded, resid)
        targets = torch.cat([input_ids[1:], input_ids.new_full((1,), -1)]).to(normed.device)
        vocab = getattr(self.loaded.config, "vocab_size", None) or 2**16
        step = max(1, CHUNK_BYTES // (4 * vocab * self.n_layers))
        k = min(self.top_k, vocab)
        ids = torch.zeros(self.n_layers, len(targets), k, dtype=torch.long)
        probs = torch.zeros(self.n_layers, len(targets), k)
        ranks = torch.zeros(self.n_layers, len(targets), dtype=torch.long)
        for start in range(0, len(targets), step):
            rows = slice(start, start + step)
            chunk = torch.softmax(head_logits(self.loaded, normed[:, rows]).float(), dim=-1)
            prob, token = chunk.topk(k, dim=-1)
            ids[:, rows], probs[:, rows] = token.cpu(), prob.cpu()
            target = targets[rows]
            picked = chunk.gather(-1, target.clamp_min(0)[None, :, None].expand(self.n_layers, -1, 1))
            rank = (chunk > picked).sum(-1) + 1
            ranks[:, rows] = torch.where(target >= 0, rank, torch.zeros_like(rank)).cpu()
        return LensGrid(input_ids.cpu(), ids[..., 0], probs[..., 0], ids, probs, ranks)

    def merge(self, other: "_LensState") -> None:
        require_same(self, other, "n_layers")
        self.sums += other.sums
        self.tokens += other.tokens
        if other.grid is not None:
            if self.grid is not None:
                raise ValueError("both logit-lens states hold the lens window: their windows overlap")
            self.grid = other.grid

    def result(self) -> LogitLensResult:
        mean = self.sums / self.tokens
        return LogitLensResult(ce=mean[:, 0], top1_accuracy=mean[:, 1], kl_to_final=mean[:, 2], tokens=self.tokens,
                               grid=self.grid)
