"""Family adapters derived from TransformerLens' architecture adapters.

TransformerLens 4 declares, for each HF architecture class it supports, where the embedding,
the blocks, each block's norms (`ln1`, `ln1_post`, `ln2`, `ln2_post`), attention (q, k, v or
a fused qkv, o) and MLP (in, gate, out) live (`component_mapping`).  This module reads that
mapping for a loaded HF model and turns it into layerscope's `FamilyAdapter`, the site
table every backend reads.  What the mapping leaves implicit is read off the model itself:

- the norm placement, from which norms exist and where they sit: pre (`ln1`, `ln2`), peri
  (pre-norms plus `ln1_post`/`ln2_post` on the sublayer outputs, Gemma 2/3), sublayer-post
  (`ln1_post`/`ln2_post` only, OLMo 2), post (the norm after the residual add, inside the
  sublayer's output module: BERT, RoBERTa) and parallel (attention and MLP both read
  `resid_pre`: GPT-J, Falcon, Phi, Cohere, NeoX with `use_parallel_residual`);
- the norm kind and the Gemma-style `(1 + w)` weight offset, by calling a norm on a probe
  vector;
- the fused qkv layout, by comparing the value rows TransformerLens splits off with the
  two layouts layerscope reads.

A mixture-of-experts MLP (Mixtral, Qwen-MoE, OLMoE) is one MLP sublayer whose output is
the weighted expert sum; it has no single down-projection, so the measurements that read one
(super weights, `mlp_act`) say so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import warnings
from pathlib import Path

import torch

from layerscope.probes.errors import UserError
from layerscope.probes.files import JSONFileError, read_json_capped, write_atomic
from layerscope.probes.families import (
    DEFAULT_TL_HOOKS,
    FamilyAdapter,
    NormKind,
    get_module,
)

DECLARE_HINT = ("declare one with layerscope.probes.families.declare_adapter("
                "'{arch}', FamilyAdapter(...))")


def architecture_of(model: torch.nn.Module) -> str:
    """The HF architecture class name TransformerLens keys its adapters by."""
    return type(model).__name__


def tl_component_mapping(model: torch.nn.Module) -> tuple[dict, bool] | None:
    """TransformerLens' component mapping for `model`'s architecture and whether its blocks run
    attention and MLP in parallel; None when TransformerLens has no adapter for it."""
    from transformer_lens.factories.architecture_adapter_factory import (
        SUPPORTED_ARCHITECTURES,
        ArchitectureAdapterFactory,
    )
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf

    arch = architecture_of(model)
    if arch not in SUPPORTED_ARCHITECTURES:
        return None
    dtype = next(model.parameters()).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge_config = build_bridge_config_from_hf(model.config, arch, arch, dtype)
        adapter = ArchitectureAdapterFactory.select_architecture_adapter(bridge_config)
    return adapter.component_mapping, bool(getattr(adapter.cfg, "parallel_attn_mlp", False))


def _name(component) -> str | None:
    return None if component is None else component.name


def _exists(root: torch.nn.Module, path: str | None) -> bool:
    if not path:
        return False
    try:
        get_module(root, path)
    except (AttributeError, IndexError, TypeError):
        return False
    return True


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def derive_adapter(model: torch.nn.Module) -> FamilyAdapter:
    """The site table for `model`, derived from TransformerLens' mapping of its architecture.

    A derived table is kept in the model cache, keyed by the TransformerLens version, the
    architecture and the model's whole config, because importing TransformerLens costs a
    few seconds that every later load of the same model would pay again."""
    path = _cached_adapter_path(model)
    try:
        data = read_json_capped(path, MAX_CACHED_ADAPTER_BYTES)
        return FamilyAdapter(**{key: tuple(value) if isinstance(value, list) else value
                                for key, value in data.items()})
    except (OSError, JSONFileError, TypeError, AttributeError):
        pass  # absent or not ours to trust: derived again below
    adapter = _derive_adapter(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(dataclasses.asdict(adapter)))
    except OSError:
        pass  # a read-only cache only costs the next load the derivation again
    return adapter


MAX_CACHED_ADAPTER_BYTES = 1 << 16


def _cached_adapter_path(model: torch.nn.Module) -> Path:
    from layerscope.probes.zoo import cache_dir

    identity = json.dumps([importlib.metadata.version("transformer-lens"), architecture_of(model),
                           model.config.to_json_string()])
    return cache_dir() / "adapters" / f"{hashlib.sha256(identity.encode()).hexdigest()}.json"


def _derive_adapter(model: torch.nn.Module) -> FamilyAdapter:
    arch = architecture_of(model)
    found = tl_component_mapping(model)
    if found is None:
        raise UserError(f"architecture {arch} (model_type {getattr(model.config, 'model_type', None)!r}) "
                        f"has no TransformerLens 4 adapter; " + DECLARE_HINT.format(arch=arch))
    mapping, parallel = found

    def missing(component: str) -> UserError:
        return UserError(f"architecture {arch}: TransformerLens maps no {component!r} module that exists "
                         f"in this model; " + DECLARE_HINT.format(arch=arch))

    for top in ("blocks", "embed"):
        if top not in mapping or not _exists(model, mapping[top].name):
            raise missing(top)
    blocks = mapping["blocks"]
    layers = blocks.name
    block = get_module(model, layers)[0]
    parts = blocks.submodules or {}
    sub = {key: _name(parts.get(key)) for key in ("ln1", "ln1_post", "ln2", "ln2_post", "attn", "mlp")}
    sub = {key: path if _exists(block, path) else None for key, path in sub.items()}
    if sub["attn"] is None:
        raise missing("attn")

    def child(component: str, key: str) -> str | None:
        owner = parts.get(component)
        leaf = (owner.submodules or {}).get(key) if owner is not None else None
        path = _join(sub[component], _name(leaf)) if leaf is not None else None
        return path if _exists(block, path) else None

    attn, mlp = sub["attn"], sub["mlp"]
    mlp_out_proj = child("mlp", "out")
    if mlp is None and mlp_out_proj is None:
        raise missing("mlp")
    fields: dict = {}
    if sub["ln1"] and sub["ln1"].startswith(attn + "."):
        # Post-LN (BERT, RoBERTa): each norm sits in its sublayer's output module, after the
        # residual add, so the pure contributions are the output projections' outputs.
        mlp = mlp or mlp_out_proj.rsplit(".", 1)[0]
        placement = "post"
        fields.update(resid_mid_from="module_output", resid_mid_module=attn,
                      attn_out_module=child("attn", "o"), mlp_out_module=mlp_out_proj)
        ln1, ln2 = sub["ln1"], sub["ln2"]
    elif parallel:
        placement, ln1, ln2 = "parallel", sub["ln1"], sub["ln2"]
        fields.update(resid_mid_from="derived")
    elif sub["ln1_post"] and sub["ln2_post"]:
        # Norms on the sublayer outputs, inside the residual: what is added to the residual
        # is the post-norm's output.
        fields.update(attn_out_module=sub["ln1_post"], mlp_out_module=sub["ln2_post"],
                      ln1_post=sub["ln1_post"], ln2_post=sub["ln2_post"])
        if sub["ln1"] and sub["ln2"]:
            placement, ln1, ln2 = "peri", sub["ln1"], sub["ln2"]
        else:
            placement, ln1, ln2 = "sublayer-post", None, None
            fields.update(resid_mid_from="module_input", resid_mid_module=mlp)
    elif sub["ln1"] and sub["ln2"]:
        placement, ln1, ln2 = "pre", sub["ln1"], sub["ln2"]
    else:
        raise missing("ln2" if sub["ln1"] else "ln1")
    if mlp is None:
        # OPT keeps fc1/fc2 on the block itself: the MLP's output is fc2's.
        mlp = mlp_out_proj
    if placement in ("pre", "parallel"):
        # A sublayer that takes the residual as an argument adds it itself (Bloom, MPT), so
        # its contribution is its output projection's output.
        if adds_residual(get_module(block, attn)):
            fields.update(attn_out_module=child("attn", "o"))
        if adds_residual(get_module(block, mlp)):
            fields.update(mlp_out_module=mlp_out_proj)

    final_norm = _name(mapping.get("ln_final"))
    unembed = _name(mapping.get("unembed"))
    causal = bool(model.can_generate())
    if not causal:
        # An encoder's masked-LM head transforms before unembedding; it is not a final norm
        # of the residual stream, so the logit lens and DLA do not apply.
        final_norm = unembed = None
    if final_norm and not _exists(model, final_norm):
        raise missing("ln_final")
    if unembed and not _exists(model, unembed):
        raise missing("unembed")

    q, k, v, qkv = (child("attn", key) for key in ("q", "k", "v", "qkv"))
    up = tuple(p for p in (child("mlp", "in"), child("mlp", "gate")) if p)
    if mlp_out_proj is None:
        up = ()
    norm_path = next(p for p in (ln1, sub["ln1_post"], ln2, final_norm) if p)
    norm_module = get_module(block, norm_path) if norm_path != final_norm else get_module(model, final_norm)
    kind, offset = norm_kind_and_offset(norm_module, model.config.hidden_size)
    if qkv:
        projections, layout = (qkv,), qkv_layout(parts["attn"], get_module(block, attn), get_module(block, qkv),
                                                 model.config)
    elif q and k and v:
        projections, layout = (q, k, v), "separate"
    else:
        raise missing("attn.v")
    return FamilyAdapter(
        name=getattr(model.config, "model_type", None) or arch,
        model_types=(getattr(model.config, "model_type", arch),),
        layers=layers,
        attn=attn,
        mlp=mlp,
        ln1=ln1,
        ln2=ln2,
        down_proj=mlp_out_proj,
        final_norm=final_norm,
        unembed=unembed,
        embed=mapping["embed"].name,
        norm_kind=kind,
        placement=placement,
        causal=causal,
        down_proj_transposed=mlp_out_proj is not None
        and type(get_module(block, mlp_out_proj)).__name__ == "Conv1D",
        norm_weight_offset=offset,
        attn_projections=projections,
        qkv_layout=layout,
        up_projections=up,
        tl_hooks=tl_hooks(placement, _reads(fields, "attn_out_module", child("attn", "o")),
                          _reads(fields, "mlp_out_module", mlp_out_proj)),
        **fields,
    )


def _reads(fields: dict, key: str, projection: str | None) -> bool:
    return projection is not None and fields.get(key) == projection


def adds_residual(module: torch.nn.Module) -> bool:
    return "residual" in inspect.signature(module.forward).parameters


@torch.no_grad()
def norm_kind_and_offset(norm: torch.nn.Module, width: int) -> tuple[NormKind, float]:
    """LayerNorm or RMSNorm, and whether the weight enters as `w` or `1 + w`, read off what
    the norm computes on a probe vector."""
    weight = getattr(norm, "weight", None)
    param = next(norm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.linspace(-1.0, 3.0, width, device=device, dtype=torch.float32)[None, None]
    y = norm(x.to(param.dtype if param is not None else torch.float32)).float()[0, 0]
    x = x[0, 0]
    centred = x - x.mean()
    candidates = {"layernorm": centred / centred.square().mean().sqrt(), "rmsnorm": x / x.square().mean().sqrt()}
    bias = getattr(norm, "bias", None)
    shift = bias.float() if bias is not None else 0.0
    w = weight.float() if weight is not None else torch.ones_like(x)
    best = min(((kind, offset) for kind in candidates for offset in (0.0, 1.0)),
               key=lambda c: (candidates[c[0]] * (w + c[1]) + shift - y).abs().max().item())
    return best


def qkv_layout(attn_component, attn: torch.nn.Module, fused: torch.nn.Module, config) -> str:
    """How a fused qkv projection orders its output: [q | k | v] ("concat") or per head
    [q_h k_h v_h] ("per_head"), found by matching the value rows TransformerLens splits off."""
    rows = fused.weight.T if type(fused).__name__ == "Conv1D" else fused.weight
    split = getattr(attn_component, "split_qkv_matrix", None)
    if split is None:
        return "concat"
    with torch.no_grad():
        value = split(attn)[2].weight
    n_heads = config.num_attention_heads
    d_head = rows.shape[0] // (n_heads * 3) if rows.shape[0] % (n_heads * 3) == 0 else None
    if value.shape == rows[-value.shape[0]:].shape and torch.equal(value, rows[-value.shape[0]:]):
        return "concat"
    if d_head and torch.equal(value, rows.view(n_heads, 3 * d_head, -1)[:, 2 * d_head:].reshape(value.shape)):
        return "per_head"
    raise UserError(f"{type(attn).__name__}: the fused qkv projection has a layout layerscope does not read")


def tl_hooks(placement: str, attn_out_is_projection: bool, mlp_out_is_projection: bool) -> dict[str, str]:
    """TransformerLens bridge hook names for each point kind: by placement, and the output
    projections' hooks where those give what a sublayer adds to the residual."""
    hooks = dict(DEFAULT_TL_HOOKS)
    if placement in ("peri", "sublayer-post"):
        hooks.update(attn_out="blocks.{layer}.ln1_post.hook_out", mlp_out="blocks.{layer}.ln2_post.hook_out")
    if placement == "sublayer-post":
        hooks.update(resid_mid="blocks.{layer}.mlp.hook_in")
    if placement == "post":
        hooks.update(resid_mid="blocks.{layer}.attn.hook_out")
    if attn_out_is_projection:
        hooks.update(attn_out="blocks.{layer}.attn.o.hook_out")
    if mlp_out_is_projection:
        hooks.update(mlp_out="blocks.{layer}.mlp.out.hook_out")
    if placement == "parallel":
        hooks.pop("resid_mid")
    return hooks
