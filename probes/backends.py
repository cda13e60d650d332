"""One interface, three ways of reading activations: plain torch hooks, TransformerLens, nnsight.

Every backend takes a batch of token ids and a list of canonical points and returns the
logits with one tensor per point, in the same vocabulary whatever the family:

    resid_pre[l]  resid_mid[l]  resid_post[l]  attn_out[l]  mlp_out[l]   [batch pos d_model]
    mlp_act[l]    (the down-projection input)                            [batch pos d_mlp]
    attn_pattern[l]                                                      [batch head pos pos]
    final_norm    (the final norm's output, what the unembedding reads)  [batch pos d_model]

A pass asked for no logits stops once the last point asked for is read: no later block,
final norm or unembedding runs (the unembedding of a small model is about a fifth of its
forward).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
from jaxtyping import Float, Int

from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module, output_item
from layerscope.probes.zoo import LoadedModel

LAYER_KINDS = ("resid_pre", "attn_out", "attn_pattern", "resid_mid", "mlp_act", "mlp_out", "resid_post")
MODEL_KINDS = ("final_norm",)


@dataclass(frozen=True, order=True)
class Point:
    """A canonical capture point, such as `resid_post[11]`."""

    kind: str
    layer: int | None = None

    def __post_init__(self):
        if self.kind not in LAYER_KINDS + MODEL_KINDS:
            raise UserError(f"unknown point kind {self.kind!r}; known: {', '.join(LAYER_KINDS + MODEL_KINDS)}")

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}[{self.layer}]"

    @classmethod
    def parse(cls, text: str) -> "Point":
        if "[" in text:
            kind, layer = text.rstrip("]").split("[")
            return cls(kind, int(layer))
        return cls(text)


def points(kinds: tuple[str, ...] | list[str], n_layers: int) -> list[Point]:
    """Every layer's point of each kind."""
    return [Point(kind, layer) for kind in kinds for layer in range(n_layers)]


Activations = dict[Point, torch.Tensor]
# Consumers that take a point's tensor the moment it is produced, so that it need not be kept.
Stream = dict[Point, Callable[[torch.Tensor], None]]


class Backend(Protocol):
    name: str

    def run(self, loaded: LoadedModel, input_ids: Int[torch.Tensor, "batch pos"], wanted: list[Point],
            stream: Stream | None = None, logits: bool = True
            ) -> tuple[Float[torch.Tensor, "batch pos vocab"] | None, Activations]:
        """One forward pass; the logits (None for encoders, or when `logits` is false) and the
        activations asked for.  Without `logits` the pass stops after the last point asked for.

        A backend that can hands each point of `stream` to its consumer during the pass
        and leaves it out of the returned activations; one that cannot returns it as usual."""


def needs_patterns(wanted: list[Point]) -> bool:
    return any(p.kind == "attn_pattern" for p in wanted)


def _is_derived(loaded: LoadedModel, p: Point) -> bool:
    return p.kind == "resid_mid" and loaded.adapter.resid_mid_from == "derived"


def _derivation_sources(p: Point) -> tuple[Point, Point]:
    return Point("resid_pre", p.layer), Point("attn_out", p.layer)


def _derive_resid_mid(loaded: LoadedModel, acts: Activations, wanted: list[Point]) -> None:
    for p in wanted:
        if _is_derived(loaded, p):
            pre, attn = _derivation_sources(p)
            acts[p] = acts[pre] + acts[attn]


def _needed(loaded: LoadedModel, wanted: list[Point]) -> list[Point]:
    """The points to read, including those a derived point is computed from."""
    extra = [source for p in wanted if _is_derived(loaded, p) for source in _derivation_sources(p)]
    return sorted(set(wanted) | set(extra), key=execution_order)


def execution_order(p: Point) -> tuple:
    """Sort key: the order in which a forward pass produces the points."""
    if p.layer is None:
        return (10**9, 0)
    return (p.layer, LAYER_KINDS.index(p.kind))


SUBLAYER_KINDS = ("attn_out", "mlp_out")


def per_token(value: torch.Tensor, tokens: tuple[int, int] | None) -> torch.Tensor:
    """An activation as [batch pos ...]: some blocks run their MLP on the tokens flattened
    to [batch*pos d] (OPT)."""
    if tokens is not None and value.ndim == 2 and value.shape[0] == tokens[0] * tokens[1]:
        return value.view(*tokens, value.shape[-1])
    return value


def _logits(loaded: LoadedModel, output) -> torch.Tensor | None:
    return output.logits if loaded.adapter.causal and output is not None else None


class StopForward(Exception):
    """Raised from a hook once a pass has produced everything asked of it, to end the
    forward there; whoever ran the forward catches it."""


def _hooked(loaded: LoadedModel, needed: list[Point]) -> set[Point]:
    """The points a hook reads (a derived point is computed after the pass)."""
    return {p for p in needed if loaded.adapter.site(p.kind) is not None}


# ---------------------------------------------------------------- plain torch hooks

class HooksBackend:
    """Forward hooks on the HF module tree, registered for one pass and always removed."""

    name = "hooks"

    def run(self, loaded, input_ids, wanted, stream=None, logits=True):
        acts: Activations = {}
        needed = _needed(loaded, wanted)
        # Derived points, and the points they are computed from, wait for the end of the pass.
        waiting = {q for p in wanted if _is_derived(loaded, p) for q in (p, *_derivation_sources(p))}
        streamed = {p: consume for p, consume in (stream or {}).items() if p in wanted and p not in waiting}
        output = None
        stop_after = None if logits else _hooked(loaded, needed)
        if stop_after != set():
            hooks = self.hooks(loaded, needed, acts, streamed, tokens=tuple(input_ids.shape[:2]), stop_after=stop_after)
            with torch.no_grad(), loaded.eager_attention(needs_patterns(wanted)), hooks:
                try:
                    output = loaded.model(input_ids.to(loaded.input_device))
                except StopForward:
                    pass
        _derive_resid_mid(loaded, acts, wanted)
        return (_logits(loaded, output) if logits else None), {p: acts[p] for p in wanted if p not in streamed}

    @contextlib.contextmanager
    def hooks(self, loaded: LoadedModel, wanted: list[Point], sink: Activations,
              stream: Stream | None = None, tokens: tuple[int, int] | None = None,
              stop_after: set[Point] | None = None) -> Iterator[None]:
        """Hooks that put each point's tensor in `sink` (or hand it to its `stream` consumer);
        with `stop_after`, the hook that completes those points ends the forward (`StopForward`)."""
        adapter, model = loaded.adapter, loaded.model
        handles = []
        stream = stream or {}
        missing = set(stop_after or ())

        def keep(point, value):
            value = per_token(value, tokens)
            if point in stream:
                stream[point](value)
            else:
                sink[point] = value
            if stop_after:
                missing.discard(point)
                if not missing:
                    raise StopForward

        def store_output(point, item):
            if point.kind in SUBLAYER_KINDS:
                # Some blocks add to a sublayer's output in place after it returns (Falcon's
                # parallel MLP), so what is read here is copied.
                return lambda module, args, output: keep(point, output_item(output, item).detach().clone())
            return lambda module, args, output: keep(point, output_item(output, item).detach())

        def store_input(point):
            def hook(module, args, kwargs):
                value = args[0] if args else kwargs["hidden_states"]
                keep(point, value.detach())
            return hook

        try:
            layers = adapter.layer_modules(model)
            for p in wanted:
                site = adapter.site(p.kind)
                if site is None:  # computed after the pass (`_derive_resid_mid`)
                    continue
                module = get_module(model if p.layer is None else layers[p.layer], site.module)
                if site.reads == "input":
                    handles.append(module.register_forward_pre_hook(store_input(p), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(store_output(p, site.item)))
            yield
        finally:
            for handle in handles:
                handle.remove()


# ---------------------------------------------------------------- TransformerLens

class TransformerLensBackend:
    """TransformerLens 4 `TransformerBridge` around the same HF model, read with `run_with_cache`."""

    name = "transformer_lens"

    def __init__(self):
        self._bridges: dict[int, object] = {}

    def bridge(self, loaded: LoadedModel):
        key = id(loaded.model)
        if key not in self._bridges:
            from transformer_lens.model_bridge import TransformerBridge

            # The bridge rewires the module tree it wraps and forces eager attention, so it
            # gets its own copy and the shared model stays as the other backends expect.
            self._bridges[key] = TransformerBridge.boot_transformers(
                str(loaded.config._name_or_path or loaded.spec.name), hf_model=copy.deepcopy(loaded.model),
                tokenizer=loaded.tokenizer)
        return self._bridges[key]

    def run(self, loaded, input_ids, wanted, stream=None, logits=True):
        bridge = self.bridge(loaded)
        needed = _needed(loaded, wanted)
        names = {}
        for p in needed:
            if _is_derived(loaded, p):
                continue
            template = "ln_final.hook_out" if p.layer is None else loaded.adapter.tl_hooks[p.kind]
            names[template.format(layer=p.layer)] = p
        # `stop_at_layer` ends the pass at the input of a block.  Past the last block, a
        # pre-hook raises the bridge's own stop before the final norm (or, when its output
        # is read, before the unembedding), which `run_with_cache` catches the same way.
        last = max(needed, key=execution_order) if needed else None
        stop_layer = stop_before = None
        if not logits and last is not None:
            if last.layer is None:
                stop_before = "unembed"
            elif last.layer + 1 < loaded.n_layers:
                stop_layer = last.layer + 1
            else:
                stop_before = "ln_final"
        with torch.no_grad(), _raise_before(getattr(bridge, stop_before, None) if stop_before else None):
            out, cache = bridge.run_with_cache(input_ids.to(loaded.input_device), names_filter=lambda n: n in names,
                                               stop_at_layer=stop_layer)
        tokens = tuple(input_ids.shape[:2])
        acts = {p: per_token(output_item(cache[name]).detach(), tokens) for name, p in names.items()}
        _derive_resid_mid(loaded, acts, wanted)
        return (out if loaded.adapter.causal and logits else None), {p: acts[p] for p in wanted}


@contextlib.contextmanager
def _raise_before(module: torch.nn.Module | None) -> Iterator[None]:
    """While open, calling `module` raises TransformerLens' stop (nothing when it is None)."""
    if not isinstance(module, torch.nn.Module):
        yield
        return
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    def stop(module, args):
        raise StopAtLayerException(args[0] if args else None)

    handle = module.register_forward_pre_hook(stop)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------- nnsight

class NNsightBackend:
    """nnsight 0.8 `TransformersModel` tracing the same HF model; reads follow execution order."""

    name = "nnsight"

    def __init__(self):
        self._wrapped: dict[int, object] = {}

    def wrapped(self, loaded: LoadedModel):
        key = id(loaded.model)
        if key not in self._wrapped:
            from nnsight.modeling.transformers import TransformersModel

            task = "text-generation" if loaded.adapter.causal else "fill-mask"
            self._wrapped[key] = TransformersModel(loaded.model, tokenizer=loaded.tokenizer, task=task)
        return self._wrapped[key]

    def run(self, loaded, input_ids, wanted, stream=None, logits=True):
        envoy = self.wrapped(loaded)
        adapter = loaded.adapter
        saved = {}
        want_logits, logits = logits, None
        with torch.no_grad(), loaded.eager_attention(needs_patterns(wanted)), \
                envoy.trace(input_ids.to(loaded.input_device)) as tracer:
            layers = _envoy_module(envoy, adapter.layers)
            for p in _needed(loaded, wanted):
                site = adapter.site(p.kind)
                if site is None:
                    continue
                module = _envoy_module(envoy if p.layer is None else layers[p.layer], site.module)
                if site.reads == "input":
                    saved[p] = module.input.save()
                elif site.item:
                    saved[p] = module.output[site.item].save()
                elif p.kind in SUBLAYER_KINDS:  # copied for the reason the hooks backend gives
                    saved[p] = output_item(module.output).clone().save()
                else:
                    saved[p] = module.output.save()
            if not want_logits:
                # Reads follow execution order, so the last read is where the pass may end.
                tracer.stop()
            elif adapter.causal:
                logits = envoy.output.logits.save()
        tokens = tuple(input_ids.shape[:2])
        acts = {p: per_token(output_item(v).detach(), tokens) for p, v in saved.items()}
        _derive_resid_mid(loaded, acts, wanted)
        return logits, {p: acts[p] for p in wanted}


def _envoy_module(envoy, path: str):
    """Follow a module path on an nnsight envoy; a submodule named like an envoy
    attribute (BERT's `output`) lives under nnsight's overload prefix."""
    from nnsight.intervention.envoy import Envoy

    for part in filter(None, path.split(".")):
        if part.isdigit():
            envoy = envoy[int(part)]
            continue
        moved = envoy.__dict__.get(f"{Envoy.OVERLOAD_PREFIX}{part}")
        envoy = moved if moved is not None else getattr(envoy, part)
    return envoy


BACKENDS = {"hooks": HooksBackend, "transformer_lens": TransformerLensBackend, "nnsight": NNsightBackend}


def get_backend(name: str, loaded: LoadedModel | None = None) -> Backend:
    """The backend called `name`; given a model, the one instance that lives with it, so
    what a backend builds around a model (a TransformerLens bridge, an nnsight wrapper) is
    built once."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    if loaded is None:
        return BACKENDS[name]()
    if name not in loaded.backends:
        loaded.backends[name] = BACKENDS[name]()
    return loaded.backends[name]
