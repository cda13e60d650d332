"""Interventions on the HF module tree, each a context manager whose hooks are always removed.

- `skip_blocks`: a block's output is its input (ShortGPT, LLM-Drop, Csordás et al.).
- `ablate_sublayer`: an attention or MLP output set to zero or to a given mean.
- `frozen_norms`: norms whose per-token scale is replaced by a fixed scale
  (Heimersheim 2024, "You can remove GPT2's LayerNorm by fine-tuning").
- `set_activations`: chosen positions and dims of a point set to a value
  (Sun et al. 2024, "Massive Activations").
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch
from jaxtyping import Float

from layerscope.probes.backends import Point
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module, output_item, with_first_output
from layerscope.probes.zoo import LoadedModel


def _check_layers(loaded: LoadedModel, layers) -> list[int]:
    layers = list(layers)
    for layer in layers:
        if not 0 <= layer < loaded.n_layers:
            raise UserError(f"layer {layer} is out of range: {loaded.spec.name} has layers 0..{loaded.n_layers - 1}")
    return layers



@contextlib.contextmanager
def _hooked(registrations) -> Iterator[None]:
    handles = []
    try:
        for register in registrations:
            handles.append(register())
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def skip_blocks(loaded: LoadedModel, layers) -> Iterator[None]:
    """Make each listed block the identity: resid_post[l] = resid_pre[l]."""
    blocks = loaded.adapter.layer_modules(loaded.model)

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return with_first_output(output, hidden)

    with _hooked([lambda b=blocks[l]: b.register_forward_hook(identity, with_kwargs=True)
                  for l in _check_layers(loaded, layers)]):
        yield


def sublayer_module(loaded: LoadedModel, layer: int, part: Literal["attn", "mlp"]) -> torch.nn.Module:
    adapter = loaded.adapter
    path = {"attn": adapter.attn_out_module or adapter.attn, "mlp": adapter.mlp_out_module or adapter.mlp}[part]
    return adapter.layer_part(loaded.model, layer, path)


@contextlib.contextmanager
def ablate_sublayer(loaded: LoadedModel, layers, part: Literal["attn", "mlp"],
                    mode: Literal["zero", "mean"] = "zero",
                    means: dict[int, Float[torch.Tensor, "d_model"]] | None = None) -> Iterator[None]:
    """Replace a sublayer's contribution by zero, or by its mean (one d_model vector per layer)."""
    if part not in ("attn", "mlp"):
        raise UserError(f"part must be 'attn' or 'mlp', got {part!r}")
    if mode == "mean" and means is None:
        raise UserError("mean ablation needs the sublayer means")

    def replacer(layer):
        def hook(module, args, output):
            current = output[0] if isinstance(output, tuple) else output
            value = torch.zeros_like(current) if mode == "zero" else means[layer].to(current).expand_as(current)
            return with_first_output(output, value)
        return hook

    with _hooked([lambda l=l: sublayer_module(loaded, l, part).register_forward_hook(replacer(l))
                  for l in _check_layers(loaded, layers)]):
        yield


@contextlib.contextmanager
def set_activations(loaded: LoadedModel, point: Point, positions: list[int] | None, dims: list[int],
                    values: float | Float[torch.Tensor, "dim"]) -> Iterator[None]:
    """Write `values` into `point` at the given positions (all when None) and dims."""
    _check_layers(loaded, [point.layer])
    layer = loaded.adapter.layer_modules(loaded.model)[point.layer]
    dims_t = torch.tensor(dims)

    def write(x):
        x = x.clone()
        pos = slice(None) if positions is None else torch.tensor(positions)
        x[:, pos, dims_t] = torch.as_tensor(values, dtype=x.dtype)
        return x

    if point.kind == "resid_post":
        register = lambda: layer.register_forward_hook(lambda m, a, out: with_first_output(out, write(output_item(out))))
    elif point.kind == "resid_pre":
        register = lambda: layer.register_forward_pre_hook(_pre_writer(write), with_kwargs=True)
    elif point.kind == "mlp_act":
        down = get_module(layer, loaded.adapter.down_proj)
        register = lambda: down.register_forward_pre_hook(_pre_writer(write), with_kwargs=True)
    else:
        raise UserError(f"set_activations supports resid_pre, resid_post and mlp_act, not {point.kind}")
    with _hooked([register]):
        yield



def _pre_writer(write):
    def hook(module, args, kwargs):
        if args:
            return (write(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": write(kwargs["hidden_states"])}
    return hook


class FrozenNorm(torch.nn.Module):
    """A norm whose per-token scale is a fixed number: `(x - mean)/s * w + b` for LayerNorm,
    `x/s * w` for RMSNorm.  With `first_scale`, the first `first_positions` positions (the
    BOS/sink token, by default alone) get their own scale, since a sink token's norm is far
    from the others'."""

    def __init__(self, norm: torch.nn.Module, kind: str, scale: float, first_scale: float | None = None,
                 weight_offset: float = 0.0, first_positions: int = 1):
        super().__init__()
        self.kind = kind
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None)
        self.weight_offset = weight_offset
        self.first_positions = first_positions
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("first_scale", torch.tensor(float(first_scale if first_scale is not None else scale)))

    def forward(self, x: Float[torch.Tensor, "*lead pos d"]) -> Float[torch.Tensor, "*lead pos d"]:
        if self.kind == "layernorm":
            x = x - x.mean(dim=-1, keepdim=True)
        # Positions are the second-to-last axis, also for the [batch head pos d_head] input of
        # a query/key norm.
        scale = self.scale.expand(x.shape[-2]).clone()
        scale[:self.first_positions] = self.first_scale
        out = x / scale[:, None].to(x.dtype) * (self.weight + self.weight_offset)
        return out + self.bias if self.bias is not None else out


def swap_module(root: torch.nn.Module, path: str, new: torch.nn.Module) -> torch.nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    old = parent[int(name)] if name.isdigit() else getattr(parent, name)
    setattr(parent, name, new)
    return old


@contextlib.contextmanager
def frozen_norms(loaded: LoadedModel, scales: dict[str, float | tuple[float, float]]) -> Iterator[None]:
    """Temporarily replace each norm (full module path -> scale, or (scale, first_scale))."""
    swapped = []
    try:
        for path, scale in scales.items():
            scale, first = scale if isinstance(scale, tuple) else (scale, None)
            norm = get_module(loaded.model, path)
            frozen = FrozenNorm(norm, loaded.adapter.norm_kind, scale, first, loaded.adapter.norm_weight_offset)
            swapped.append((path, swap_module(loaded.model, path, frozen)))
        yield
    finally:
        for path, original in reversed(swapped):
            swap_module(loaded.model, path, original)
