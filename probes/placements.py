"""Norm-placement variants of a model, built by rewiring its blocks' modules.

- `pre`: as built, `x + f(Norm(x))`.
- `post`: `Norm(x + f(x))`, the original Transformer's placement.
- `peri`: `x + Norm_out(f(Norm_in(x)))` (Kim et al. 2025, "Peri-LN").
- `mix`: the first 25% of blocks Post-LN, the rest Pre-LN (Li et al. 2024, "Mix-LN").
- `lns`: LayerNorm Scaling, `x + f(Norm(x) / sqrt(l + 1))` (Sun et al. 2025, "The Curse of
  Depth in Large Language Models").

The rewiring replaces modules (visible in `print(model)`), it registers no hooks, and it
keeps each sublayer's output format, so every backend and measurement reads a variant as
it reads the original.  It is meant for models built from a config (the `tiny-*` zoo and
`config:` specs): a trained Pre-LN checkpoint rewired this way computes something else.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Iterator

import torch

from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module, output_item, with_first_output
from layerscope.probes.interventions import swap_module
from layerscope.probes.zoo import LoadedModel

PLACEMENTS = ("pre", "post", "peri", "mix", "lns")
MIX_POST_FRACTION = 0.25




class PostNormed(torch.nn.Module):
    """A sublayer whose residual update is `Norm(x + f(x)) - x`, so that the block's own
    residual add yields `Norm(x + f(x))`."""

    def __init__(self, sublayer: torch.nn.Module, norm: torch.nn.Module):
        super().__init__()
        self.sublayer = sublayer
        self.norm = norm

    def forward(self, hidden_states, *args, **kwargs):
        output = self.sublayer(hidden_states, *args, **kwargs)
        return with_first_output(output, self.norm(hidden_states + output_item(output)) - hidden_states)


class OutputNormed(torch.nn.Module):
    """A sublayer followed by its own norm on the output (Peri-LN)."""

    def __init__(self, sublayer: torch.nn.Module, norm: torch.nn.Module):
        super().__init__()
        self.sublayer = sublayer
        self.norm = norm

    def forward(self, *args, **kwargs):
        output = self.sublayer(*args, **kwargs)
        return with_first_output(output, self.norm(output_item(output)))


class Scaled(torch.nn.Module):
    """A norm whose output is multiplied by a constant (LayerNorm Scaling: 1/sqrt(l+1))."""

    def __init__(self, norm: torch.nn.Module, factor: float):
        super().__init__()
        self.norm = norm
        self.factor = factor

    def forward(self, x):
        return self.norm(x) * self.factor


def _fresh_norm(norm: torch.nn.Module) -> torch.nn.Module:
    new = copy.deepcopy(norm)
    with torch.no_grad():
        # Gemma-style norms multiply by (1 + w), so their identity weight is 0.
        identity = 0.0 if new.weight.abs().max() == 0 else 1.0
        new.weight.fill_(identity)
        if getattr(new, "bias", None) is not None:
            new.bias.zero_()
    return new


def parse_placements(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PLACEMENTS]
    if unknown:
        raise UserError(f"unknown norm placement(s) {', '.join(unknown)}; known: {', '.join(PLACEMENTS)}")
    if not chosen:
        raise UserError(f"no norm placement given in {text!r}; known: {', '.join(PLACEMENTS)}")
    return chosen


def placement_variants(loaded: LoadedModel, placements: str) -> Iterator[tuple[str, LoadedModel]]:
    """Each named placement variant of `loaded`'s base model, built fresh from its config."""
    from layerscope.probes.zoo import load_model

    base = loaded.spec.name.partition("@")[0]
    for placement in parse_placements(placements):
        yield placement, load_model(f"{base}@{placement}", attn_implementation=loaded.spec.attn_implementation)


def apply_placement(loaded: LoadedModel, placement: str) -> LoadedModel:
    """A copy of a Pre-LN model rewired into `placement`, with its adapter updated; the
    model given is left as it was."""
    if placement not in PLACEMENTS:
        raise UserError(f"unknown norm placement {placement!r}; known: {', '.join(PLACEMENTS)}")
    adapter = loaded.adapter
    if adapter.placement != "pre" or adapter.resid_mid_from != "ln2_input":
        raise UserError(f"norm placements are built from a sequential Pre-LN model; "
                        f"{loaded.spec.name} is {adapter.placement}-LN")
    if placement == "pre":
        return loaded
    loaded = replace(loaded, model=copy.deepcopy(loaded.model))
    n = loaded.n_layers
    for layer in range(n):
        prefix = f"{adapter.layers}.{layer}"
        attn_path, mlp_path = f"{prefix}.{adapter.attn}", f"{prefix}.{adapter.mlp}"
        ln1_path, ln2_path = f"{prefix}.{adapter.ln1}", f"{prefix}.{adapter.ln2}"
        ln1, ln2 = get_module(loaded.model, ln1_path), get_module(loaded.model, ln2_path)
        post = placement == "post" or (placement == "mix" and layer < math.ceil(MIX_POST_FRACTION * n))
        if post:
            swap_module(loaded.model, ln1_path, torch.nn.Identity())
            swap_module(loaded.model, ln2_path, torch.nn.Identity())
            swap_module(loaded.model, attn_path, PostNormed(get_module(loaded.model, attn_path), ln1))
            swap_module(loaded.model, mlp_path, PostNormed(get_module(loaded.model, mlp_path), ln2))
        elif placement == "peri":
            swap_module(loaded.model, attn_path, OutputNormed(get_module(loaded.model, attn_path), _fresh_norm(ln1)))
            swap_module(loaded.model, mlp_path, OutputNormed(get_module(loaded.model, mlp_path), _fresh_norm(ln2)))
        elif placement == "lns":
            factor = 1 / math.sqrt(layer + 1)
            swap_module(loaded.model, ln1_path, Scaled(ln1, factor))
            swap_module(loaded.model, ln2_path, Scaled(ln2, factor))
    label = {"post": "post", "peri": "peri", "mix": "mix", "lns": "pre"}[placement]
    loaded.adapter = replace(adapter, name=f"{adapter.name}@{placement}", placement=label)
    loaded.source += f", rewired to {placement} norm placement"
    return loaded
