"""Family adapters: where each model family keeps its layers, sublayers and norms.

Everything in layerscope that needs a module reads it from a `FamilyAdapter`; nothing
branches on a model's name.  Paths are dotted attribute paths: `layers` from the model
root, the per-layer ones from a layer module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from layerscope.probes.errors import UserError

NormKind = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["pre", "post", "peri", "mix"]

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
    ln1: str
    ln2: str
    down_proj: str
    final_norm: str | None
    unembed: str | None
    embed: str
    norm_kind: NormKind
    placement: NormPlacement
    causal: bool = True
    # Where resid_mid is read: the pre-MLP norm's input (sequential Pre-LN), or the
    # output of a module (Post-LN, where the norm sits after the residual add), or
    # resid_pre + attn_out (parallel blocks, where both sublayers read resid_pre).
    resid_mid_from: Literal["ln2_input", "module_output", "derived"] = "ln2_input"
    resid_mid_module: str | None = None
    # Pure sublayer contributions for Post-LN blocks, before the residual add and norm.
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
            return {"ln2_input": Site(self.ln2, "input"),
                    "module_output": Site(self.resid_mid_module or "", "output"),
                    "derived": None}[self.resid_mid_from]
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
        """(role, full path) of every norm: pre-MLP norms, pre-attention norms, final."""
        out = [(f"ln2[{l}]", f"{self.layers}.{l}.{self.ln2}") for l in range(n_layers)]
        out += [(f"ln1[{l}]", f"{self.layers}.{l}.{self.ln1}") for l in range(n_layers)]
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


_LLAMA_LIKE = dict(
    layers="model.layers",
    attn="self_attn",
    mlp="mlp",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    down_proj="mlp.down_proj",
    final_norm="model.norm",
    unembed="lm_head",
    embed="model.embed_tokens",
    norm_kind="rmsnorm",
    placement="pre",
    attn_projections=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    up_projections=("mlp.up_proj", "mlp.gate_proj"),
)

FAMILIES: dict[str, FamilyAdapter] = {
    a.name: a
    for a in [
        FamilyAdapter(name="llama", model_types=("llama",), **_LLAMA_LIKE),
        FamilyAdapter(name="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
        FamilyAdapter(name="mistral", model_types=("mistral",), **_LLAMA_LIKE),
        FamilyAdapter(name="gemma", model_types=("gemma",), norm_weight_offset=1.0, **_LLAMA_LIKE),
        FamilyAdapter(
            name="gpt2",
            model_types=("gpt2",),
            layers="transformer.h",
            attn="attn",
            mlp="mlp",
            ln1="ln_1",
            ln2="ln_2",
            down_proj="mlp.c_proj",
            final_norm="transformer.ln_f",
            unembed="lm_head",
            embed="transformer.wte",
            norm_kind="layernorm",
            placement="pre",
            down_proj_transposed=True,
            attn_projections=("attn.c_attn",),
            qkv_layout="concat",
            up_projections=("mlp.c_fc",),
        ),
        FamilyAdapter(
            name="gpt-neox",
            model_types=("gpt_neox",),
            layers="gpt_neox.layers",
            attn="attention",
            mlp="mlp",
            ln1="input_layernorm",
            ln2="post_attention_layernorm",
            down_proj="mlp.dense_4h_to_h",
            final_norm="gpt_neox.final_layer_norm",
            unembed="lm_head",
            embed="gpt_neox.embed_in",
            norm_kind="layernorm",
            placement="pre",
            attn_projections=("attention.query_key_value",),
            qkv_layout="per_head",
            up_projections=("mlp.dense_h_to_4h",),
        ),
        FamilyAdapter(
            name="bert",
            model_types=("bert",),
            layers="bert.encoder.layer",
            attn="attention",
            mlp="output",
            ln1="attention.output.LayerNorm",
            ln2="output.LayerNorm",
            down_proj="output.dense",
            final_norm=None,
            unembed=None,
            embed="bert.embeddings.word_embeddings",
            norm_kind="layernorm",
            placement="post",
            causal=False,
            resid_mid_from="module_output",
            resid_mid_module="attention",
            attn_out_module="attention.output.dense",
            mlp_out_module="output.dense",
            attn_projections=("attention.self.query", "attention.self.key", "attention.self.value"),
            up_projections=("intermediate.dense",),
            tl_hooks={
                "resid_pre": "blocks.{layer}.hook_in",
                "resid_mid": "blocks.{layer}.attn.hook_out",
                "resid_post": "blocks.{layer}.hook_out",
                "attn_out": "blocks.{layer}.attn.o.hook_out",
                "mlp_out": "blocks.{layer}.mlp.out.hook_out",
                "attn_pattern": "blocks.{layer}.attn.hook_pattern",
                "mlp_act": "blocks.{layer}.mlp.out.hook_in",
            },
        ),
    ]
}


def adapter_for(model: torch.nn.Module) -> FamilyAdapter:
    """The adapter for an HF model, by its config's `model_type`."""
    model_type = getattr(model.config, "model_type", None)
    for adapter in FAMILIES.values():
        if model_type in adapter.model_types:
            if adapter.name == "gpt-neox" and getattr(model.config, "use_parallel_residual", False):
                return _parallel_neox()
            return adapter
    known = ", ".join(sorted(t for a in FAMILIES.values() for t in a.model_types))
    raise UserError(f"model_type {model_type!r} has no family adapter (known: {known})")


def _parallel_neox() -> FamilyAdapter:
    return replace(FAMILIES["gpt-neox"], name="gpt-neox-parallel", resid_mid_from="derived")
