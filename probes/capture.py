"""Capture: run the model once per batch and fold each batch into streaming reducers.

A `ProbeSpec` declares reducers; each reducer names the points it reads.  `capture`
runs the backend on every batch, hands the batch's activations to each reducer's state,
and drops them, so the memory held grows with the model, never with the corpus.

Data-parallel runs split the corpus's windows over ranks.  Each rank calls `fold` on its
shard, passing the corpus index of each of its windows (`window_index`), so that every
location a reducer records names the window in the whole corpus.  Rank 0 gathers the
other ranks' `Fold`s, merges them into its own (`Fold.merge`, or `merge_states` on bare
state dicts), and builds the Capture with `finish`.  `capture` is `finish(fold(...))` on
one process.

Shape annotations use one axis vocabulary: batch pos d_model layer head d_head d_mlp
vocab, and window (a corpus window).  Reducer results add kv_head (key/value heads under
grouped-query attention), rank (a top-k list), bin (log-histogram bins), component
(direct logit attribution's terms) and dim (chosen dims of d_model); `_` is a width that
may be d_model or d_mlp (a reducer that reads either).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from jaxtyping import Float, Int

from layerscope.probes.backends import Activations, Point, get_backend, needs_patterns
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.progress import ProgressArg, progress_bar
from layerscope.probes.zoo import LoadedModel


@dataclass
class Batch:
    """What a reducer sees besides activations: the tokens and logits of the batch, and the
    corpus index of each of its windows (an int is the index of the first of consecutive ones)."""

    input_ids: Int[torch.Tensor, "batch pos"]
    logits: Float[torch.Tensor, "batch pos vocab"] | None
    windows: Int[torch.Tensor, "batch"] | int

    def __post_init__(self):
        if isinstance(self.windows, int):
            self.windows = torch.arange(self.windows, self.windows + self.input_ids.shape[0])

    @property
    def first_row(self) -> int | None:
        """The row holding the corpus's first window, which some reducers keep whole; None when
        that window is not in this batch."""
        hit = (self.windows == 0).nonzero()
        return int(hit[0, 0]) if len(hit) else None


class ReducerState(Protocol):
    """A reducer's running statistics.  `merge` folds in the state of the same reducer over
    a disjoint set of windows, so that folding two shards and merging equals folding both;
    `result` reads the statistics as a small frozen dataclass with named fields."""

    def update(self, acts: Activations, batch: Batch) -> None: ...

    def merge(self, other: "ReducerState") -> None: ...

    def result(self) -> object: ...


class PortableState:
    """A state that can travel between processes (torch.distributed's `gather_object`
    pickles it).  The attributes named in `model_bound` (modules, closures over them, a
    cached activation) stay behind: a state unpickled elsewhere can be merged into a live
    one, which is all rank 0 does with it, but not updated or read."""

    model_bound: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in self.model_bound}


def require_same(a, b, *names: str) -> None:
    """Refuse to merge states whose reducers were set up differently."""
    for name in names:
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"cannot merge {type(a).__name__} states with different {name}: "
                             f"{getattr(a, name)!r} and {getattr(b, name)!r}")


class Reducer(Protocol):
    """A frozen, declarative description of a streaming statistic.

    A reducer with `pointwise = True` takes its points one at a time, as soon as each is
    produced (its state's `update` gets one point and a batch without logits), so that a
    backend able to stream need not keep the batch's activations.

    Only a reducer with `needs_logits = True` finds the model's logits in `Batch.logits`;
    a pass none of whose reducers needs them stops after the last point any reads."""

    name: str

    def points(self, loaded: LoadedModel) -> list[Point]: ...

    def start(self, loaded: LoadedModel) -> ReducerState: ...


@dataclass(frozen=True)
class ProbeSpec:
    reducers: tuple[Reducer, ...]


@dataclass
class Capture:
    """Reduced statistics by reducer name (each reducer's result dataclass), plus what produced them."""

    results: dict[str, object]
    model: str
    n_layers: int
    n_tokens: int
    backend: str
    seconds: float
    peak_state_bytes: int
    token_ids: Int[torch.Tensor, "window pos"] | None = None
    meta: dict = field(default_factory=dict)

    def __getitem__(self, reducer_name: str):
        return self.results[reducer_name]


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors inside nested dicts, lists and objects' __dict__; a model a
    state refers to is not the state's own memory, so modules are not counted."""
    if isinstance(obj, (torch.nn.Module, LoadedModel)):
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return tensor_bytes(vars(obj))
    return 0


def merge_states(into: dict[str, ReducerState], other: dict[str, ReducerState]) -> dict[str, ReducerState]:
    """Merge each of `other`'s states into the state of the same reducer in `into` (the two
    folded disjoint windows), and return `into`."""
    if set(into) != set(other):
        raise ValueError(f"cannot merge states of different reducers: {sorted(into)} and {sorted(other)}")
    for name, state in into.items():
        state.merge(other[name])
    return into


@dataclass
class Fold:
    """Reducer states after folding some of a corpus's windows, before their results are
    read: what one rank of a data-parallel run holds and sends to rank 0.

    `windows` is the corpus index of every window folded, so that merges can check that the
    parts are disjoint and `finish` that together they cover the corpus."""

    states: dict[str, ReducerState]
    windows: Int[torch.Tensor, "window"]
    backend: str
    seconds: float
    peak_state_bytes: int

    def merge(self, other: "Fold") -> "Fold":
        """Fold in another part's states; the parts must hold disjoint windows.  Returns self."""
        overlap = set(self.windows.tolist()) & set(other.windows.tolist())
        if overlap:
            raise ValueError(f"cannot merge folds that share windows {sorted(overlap)[:5]}")
        if self.backend != other.backend:
            raise ValueError(f"cannot merge folds from backends {self.backend!r} and {other.backend!r}")
        merge_states(self.states, other.states)
        self.windows = torch.cat([self.windows, other.windows])
        # Ranks run side by side: the wall time is the slowest's, the memory each one's own.
        self.seconds = max(self.seconds, other.seconds)
        self.peak_state_bytes = max(self.peak_state_bytes, other.peak_state_bytes)
        return self


def _pointwise_consumers(spec: ProbeSpec, reads: dict[str, list[Point]], states: dict) -> dict[Point, list]:
    """The points that only pointwise reducers read, with the states that read each."""
    readers: dict[Point, list] = {}
    for reducer in spec.reducers:
        for p in reads[reducer.name]:
            readers.setdefault(p, []).append(reducer)
    return {p: [states[r.name] for r in rs] for p, rs in readers.items()
            if all(getattr(r, "pointwise", False) for r in rs)}


def needs_logits(spec: ProbeSpec) -> bool:
    """Whether any of the spec's reducers reads the model's logits."""
    return any(getattr(r, "needs_logits", False) for r in spec.reducers)


def _fold_point(consumers: list, point: Point, batch: Batch, x: torch.Tensor) -> None:
    for state in consumers:
        state.update({point: x}, batch)


def fold(loaded: LoadedModel, windows: TokenWindows, spec: ProbeSpec, backend: str = "hooks",
         progress: ProgressArg = True, window_index: Int[torch.Tensor, "window"] | None = None) -> Fold:
    """Run the model over every window once and fold the activations into fresh states of
    the spec's reducers.  `window_index` gives the corpus index of each of `windows`' windows
    when they are a shard of a larger corpus (default: 0, 1, ...)."""
    n_windows = windows.input_ids.shape[0]
    if window_index is None:
        window_index = torch.arange(n_windows)
    window_index = torch.as_tensor(window_index, dtype=torch.long)
    if window_index.shape != (n_windows,):
        raise ValueError(f"window_index has shape {tuple(window_index.shape)}; the shard has {n_windows} windows")
    runner = get_backend(backend, loaded)
    states = {r.name: r.start(loaded) for r in spec.reducers}
    reads = {r.name: r.points(loaded) for r in spec.reducers}
    wanted = sorted({p for points in reads.values() for p in points}, key=str)
    peak = 0
    started = time.perf_counter()
    bar = progress_bar(progress, windows, total=len(windows), unit="batch",
                       desc=f"{loaded.spec.name} x {windows.n_tokens} tokens")
    stream_to = _pointwise_consumers(spec, reads, states)
    logits = needs_logits(spec)
    with loaded.eager_attention(needs_patterns(wanted)):
        for input_ids, rows in zip(bar, window_index.split(windows.spec.batch_size)):
            if not len(rows):  # a rank's shard may be empty
                continue
            batch = Batch(input_ids, None, rows)
            stream = {p: functools.partial(_fold_point, consumers, p, batch) for p, consumers in stream_to.items()}
            batch.logits, acts = runner.run(loaded, input_ids, wanted, stream=stream, logits=logits)
            for reducer in spec.reducers:
                # What a backend could not stream reaches pointwise reducers here, after the pass.
                given = {p: acts[p] for p in reads[reducer.name] if p in acts}
                if given or not getattr(reducer, "pointwise", False):
                    states[reducer.name].update(given, batch)
            del acts, batch
            peak = max(peak, tensor_bytes(states))
    return Fold(states, window_index, backend, time.perf_counter() - started, peak)


def finish(loaded: LoadedModel, windows: TokenWindows, folded: Fold) -> Capture:
    """The Capture of the whole corpus `windows` from states that together folded every one
    of its windows once (one process's `fold`, or rank 0's after merging the others')."""
    n_windows = windows.input_ids.shape[0]
    if not torch.equal(folded.windows.sort().values, torch.arange(n_windows)):
        raise ValueError(f"the folded states cover {len(folded.windows)} windows, not each of the corpus's "
                         f"{n_windows} once")
    return Capture(
        results={name: state.result() for name, state in folded.states.items()},
        model=loaded.spec.name,
        n_layers=loaded.n_layers,
        n_tokens=windows.n_tokens,
        backend=folded.backend,
        seconds=folded.seconds,
        peak_state_bytes=folded.peak_state_bytes,
        token_ids=windows.input_ids,
        meta={"corpus": windows.manifest(), "model": loaded.card()},
    )


def capture(loaded: LoadedModel, windows: TokenWindows, spec: ProbeSpec, backend: str = "hooks",
            progress: ProgressArg = True) -> Capture:
    """Run the model over every window once and fold the activations into the spec's reducers."""
    return finish(loaded, windows, fold(loaded, windows, spec, backend, progress))


# Raw activations are kept whole, unlike reduced statistics; past this a request is refused
# before the pass rather than exhausting memory part-way.
MAX_ACTIVATION_BYTES = 2 * 1024**3


def _point_bytes(loaded: LoadedModel, point: Point, n_windows: int, seq_len: int) -> int:
    element = torch.finfo(loaded.model.dtype).bits // 8
    if point.kind == "attn_pattern":
        return n_windows * loaded.n_heads * seq_len * seq_len * element
    width = getattr(loaded.config, "intermediate_size", None) or 4 * loaded.d_model
    return n_windows * seq_len * (width if point.kind == "mlp_act" else loaded.d_model) * element


def activations(model: LoadedModel, corpus, points: list[str | Point], backend: str = "hooks",
                max_bytes: int = MAX_ACTIVATION_BYTES) -> dict[str, torch.Tensor]:
    """Raw activations at `points` (such as "resid_post[11]" or "attn_pattern[3]") for every
    window of `corpus`, as tensors keyed by point name, like TransformerLens' `run_with_cache`
    with a `names_filter`.  Refused up front when they would take more than `max_bytes`."""
    from layerscope.probes.inputs import windows_for

    windows = windows_for(model, corpus)
    wanted = [p if isinstance(p, Point) else Point.parse(p) for p in points]
    if not wanted:
        raise UserError("no points asked for; name them like 'resid_post[11]' or 'attn_pattern[3]'")
    for p in wanted:
        if p.layer is not None and not 0 <= p.layer < model.n_layers:
            raise UserError(f"{p}: {model.spec.name} has layers 0..{model.n_layers - 1}")
    n_windows, seq_len = windows.input_ids.shape
    needed = sum(_point_bytes(model, p, n_windows, seq_len) for p in wanted)
    if needed > max_bytes:
        raise UserError(f"these activations take {needed / 2**20:,.0f} MiB, over the cap of {max_bytes / 2**20:,.0f} "
                        "MiB: ask for fewer points or tokens, raise max_bytes, or use a reducer (layerscope.capture)")
    runner = get_backend(backend, model)
    parts: dict[Point, list[torch.Tensor]] = {p: [] for p in wanted}
    with model.eager_attention(needs_patterns(wanted)):
        for input_ids in windows:
            _, acts = runner.run(model, input_ids, wanted, logits=False)
            for p in wanted:
                parts[p].append(acts[p])
    return {str(p): torch.cat(parts[p]) for p in wanted}
