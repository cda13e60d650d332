"""Capture: run the model once per batch and fold each batch into streaming reducers.

A `ProbeSpec` declares reducers; each reducer names the points it reads.  `capture`
runs the backend on every batch, hands the batch's activations to each reducer's state,
and drops them, so the memory held grows with the model, never with the corpus.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from layerscope.probes.backends import Activations, Point, get_backend, needs_patterns
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import LoadedModel


@dataclass
class Batch:
    """What a reducer sees besides activations: the tokens and logits of the batch."""

    input_ids: Int[torch.Tensor, "batch pos"]
    logits: Float[torch.Tensor, "batch pos vocab"] | None
    offset: int  # index of the batch's first window in the corpus


class ReducerState(Protocol):
    def update(self, acts: Activations, batch: Batch) -> None: ...

    def result(self) -> dict: ...


class Reducer(Protocol):
    """A frozen, declarative description of a streaming statistic.

    A reducer with `pointwise = True` takes its points one at a time, as soon as each is
    produced (its state's `update` gets one point and a batch without logits), so that a
    backend able to stream need not keep the batch's activations."""

    name: str

    def points(self, loaded: LoadedModel) -> list[Point]: ...

    def start(self, loaded: LoadedModel) -> ReducerState: ...


@dataclass(frozen=True)
class ProbeSpec:
    reducers: tuple[Reducer, ...]


@dataclass
class Capture:
    """Reduced statistics by reducer name, plus what produced them."""

    results: dict[str, dict]
    model: str
    n_layers: int
    n_tokens: int
    backend: str
    seconds: float
    peak_state_bytes: int
    token_ids: Int[torch.Tensor, "window pos"] | None = None
    meta: dict = field(default_factory=dict)

    def __getitem__(self, reducer_name: str) -> dict:
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


def _pointwise_consumers(loaded: LoadedModel, spec: ProbeSpec, states: dict) -> dict[Point, list]:
    """The points that only pointwise reducers read, with the states that read each."""
    readers: dict[Point, list] = {}
    for reducer in spec.reducers:
        for p in reducer.points(loaded):
            readers.setdefault(p, []).append(reducer)
    return {p: [states[r.name] for r in rs] for p, rs in readers.items()
            if all(getattr(r, "pointwise", False) for r in rs)}


def _fold_point(consumers: list, point: Point, batch: Batch, x: torch.Tensor) -> None:
    for state in consumers:
        state.update({point: x}, batch)


def capture(loaded: LoadedModel, windows: TokenWindows, spec: ProbeSpec, backend: str = "hooks",
            progress: bool = True) -> Capture:
    """Run the model over every window once and fold the activations into the spec's reducers."""
    runner = get_backend(backend, loaded)
    states = {r.name: r.start(loaded) for r in spec.reducers}
    wanted = sorted({p for r in spec.reducers for p in r.points(loaded)}, key=str)
    peak = 0
    offset = 0
    started = time.perf_counter()
    bar = tqdm(windows, total=len(windows), disable=not progress, unit="batch",
               desc=f"{loaded.spec.name} x {windows.n_tokens} tokens")
    stream_to = _pointwise_consumers(loaded, spec, states)
    with loaded.eager_attention(needs_patterns(wanted)):
        for input_ids in bar:
            batch = Batch(input_ids, None, offset)
            stream = {p: functools.partial(_fold_point, consumers, p, batch) for p, consumers in stream_to.items()}
            batch.logits, acts = runner.run(loaded, input_ids, wanted, stream=stream)
            for reducer in spec.reducers:
                # What a backend could not stream reaches pointwise reducers here, after the pass.
                given = {p: acts[p] for p in reducer.points(loaded) if p in acts}
                if given or not getattr(reducer, "pointwise", False):
                    states[reducer.name].update(given, batch)
            del acts, batch
            offset += input_ids.shape[0]
            peak = max(peak, tensor_bytes(states))
    return Capture(
        results={name: state.result() for name, state in states.items()},
        model=loaded.spec.name,
        n_layers=loaded.n_layers,
        n_tokens=windows.n_tokens,
        backend=backend,
        seconds=time.perf_counter() - started,
        peak_state_bytes=peak,
        token_ids=windows.input_ids,
        meta={"corpus": windows.manifest(), "model": loaded.card()},
    )


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
            _, acts = runner.run(model, input_ids, wanted)
            for p in wanted:
                parts[p].append(acts[p])
    return {str(p): torch.cat(parts[p]) for p in wanted}
