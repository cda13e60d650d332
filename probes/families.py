"""Family adapters: where each model family keeps its layers, sublayers and norms.

Everything in layerscope that needs a module reads it from a `FamilyAdapter`; nothing
branches on a model's name.  Paths are dotted attribute paths: `layers` from the model
root, the per-layer ones from a layer module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from layerscope.probes.errors import UserError

NormKind = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post", "peri", "sublayer-post", "parallel", "mix"]

DEFAULT_TL_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_in",
    "resid_mid": "blocks.{layer}.ln2.hook_in",
    "resid_post": "blocks.{layer}.hook_out",
    "attn_out": "blocks.{layer}.attn.hook_out",
    "mlp_out": "blocks.{layer}.mlp.hook_out",
    "attn_pattern": "blocks.{layer}.attn.hook_pattern",
    "mlp_act": "blocks.{layer}.mlp.out.hook_in",
}


@dataclass(frozen=True)
class Site:
    """Where a canonical point is read: a module (a path from the block, or from the model
    root for model-level points; "" is the block itself), its input or its output, and
    which element of a tuple output (0: the hidden states; 1: attention weights)."""

    module: str
    reads: Literal["input", "output"]
    item: int = 0


@dataclass(frozen=True)
class FamilyAdapter:
    """Module paths and norm facts of one transformer family."""

    name: str
    model_types: tuple[str, ...]
    layers: str
    attn: str
    mlp: str
    ln1: str | None
    ln2: str | None
    down_proj: str | None
    final_norm: str | None
    unembed: str | None
    embed: str
    norm_kind: NormKind
    placement: NormPlacement
    causal: bool = True
    # Where resid_mid is read: the pre-MLP norm's input (sequential Pre-LN), the output of
    # a module (Post-LN, where the norm sits after the residual add), the input of a module
    # (the MLP of a block with no pre-MLP norm), or resid_pre + attn_out (parallel blocks,
    # where both sublayers read resid_pre).
    resid_mid_from: Literal["ln2_input", "module_output", "module_input", "derived"] = "ln2_input"
    resid_mid_module: str | None = None
    # Norms on the sublayer outputs (Peri-LN, OLMo 2), inside the residual.
    ln1_post: str | None = None
    ln2_post: str | None = None
    # What each sublayer adds to the residual, where that is not the sublayer module's own
    # output: the post-sublayer norm's output (Peri-LN), or the output projection's output
    # before the residual add and norm (Post-LN).
    attn_out_module: str | None = None
    mlp_out_module: str | None = None
    # GPT-2's Conv1D stores weights as [in, out]; nn.Linear as [out, in].
    down_proj_transposed: bool = False
    # Gemma-style RMSNorm multiplies by (1 + weight).
    norm_weight_offset: float = 0.0
    attn_projections: tuple[str, ...] = ()
    # How the value projection sits in `attn_projections`: its own module (the last one),
    # or one fused module whose output is [q | k | v] ("concat") or per head [q_h k_h v_h].
    qkv_layout: Literal["separate", "concat", "per_head"] = "separate"
    up_projections: tuple[str, ...] = ()
    tl_hooks: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TL_HOOKS))

    def site(self, kind: str) -> Site | None:
        """The site table: where each point kind is read in this family; None for a point
        computed after the pass (resid_mid of parallel blocks, resid_pre + attn_out)."""
        if kind == "resid_mid":
            return {"ln2_input": Site(self.ln2 or "", "input"),
                    "module_output": Site(self.resid_mid_module or "", "output"),
                    "module_input": Site(self.resid_mid_module or "", "input"),
                    "derived": None}[self.resid_mid_from]
        if kind == "mlp_act" and self.down_proj is None:
            raise UserError(f"{self.name} has no single MLP down-projection (a mixture-of-experts MLP), "
                            "so its mlp_act point and super weights are not defined")
        return {
            "resid_pre": Site("", "input"),
            "resid_post": Site("", "output"),
            "attn_out": Site(self.attn_out_module or self.attn, "output"),
            "attn_pattern": Site(self.attn, "output", item=1),
            "mlp_act": Site(self.down_proj, "input"),
            "mlp_out": Site(self.mlp_out_module or self.mlp, "output"),
            "final_norm": Site(self.final_norm or "", "output"),
        }[kind]

    def layer_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return list(get_module(model, self.layers))

    def layer_part(self, model: torch.nn.Module, layer: int, path: str) -> torch.nn.Module:
        return get_module(self.layer_modules(model)[layer], path)

    def norm_paths(self, n_layers: int) -> list[tuple[str, str]]:
        """(role, full path) of every block norm and the final norm: the MLP's norms (pre,
        then post), the attention's norms (pre, then post), then the final norm.  A parallel
        block whose two sublayers share one norm lists it once, as `ln1`."""
        out = []
        for role in ("ln2", "ln2_post", "ln1", "ln1_post"):
            path = getattr(self, role)
            if path and (role != "ln2" or path != self.ln1):
                out += [(f"{role}[{l}]", f"{self.layers}.{l}.{path}") for l in range(n_layers)]
        if self.final_norm:
            out.append(("final_norm", self.final_norm))
        return out


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at a dotted path ("" is the root itself)."""
    module = root
    for part in filter(None, path.split(".")):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def output_item(output, item: int = 0):
    """Element `item` of a module's tuple output (0: the hidden states); a plain tensor
    output is its own element 0."""
    return output[item] if isinstance(output, tuple) else output


def with_first_output(output, value):
    """The module output with its hidden states replaced by `value`, in the same format."""
    return (value, *output[1:]) if isinstance(output, tuple) else value


# Architectures whose adapter the user declared (`declare_adapter`), by HF class name.
DECLARED: dict[str, FamilyAdapter] = {}


def declare_adapter(architecture: str, adapter: FamilyAdapter) -> None:
    """Use `adapter` for every model of the HF class `architecture`, instead of deriving one
    from TransformerLens' mapping (for an architecture it lacks or maps wrongly)."""
    DECLARED[architecture] = adapter


def adapter_for(model: torch.nn.Module) -> FamilyAdapter:
    """The adapter for an HF model: a declared one, else one derived from TransformerLens'
    component mapping of its architecture (`probes.architectures`)."""
    from layerscope.probes.architectures import architecture_of, derive_adapter

    declared = DECLARED.get(architecture_of(model))
    return declared if declared is not None else derive_adapter(model)
