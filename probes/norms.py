"""The normalisation layers of a model: where they are, what kind they are, and the
per-token scale each one divides by.

A *real* norm divides by a data-dependent scale, `sqrt(mean(x_c^2) + eps)` per token,
where `x_c` is the token's vector centred over dims (LayerNorm) or not (RMSNorm).  A
`FrozenNorm` divides by a fixed number instead (Heimersheim 2024, "You can remove GPT2's
LayerNorm by fine-tuning").  LN removal turns every real norm into a frozen one: each is
first wrapped in a `RemovableNorm`, the real norm that measures its own average scale, and
frozen at that average when the schedule reaches it.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from jaxtyping import Float

from layerscope.probes.errors import UserError
from layerscope.probes.families import NormKind, get_module
from layerscope.probes.interventions import FrozenNorm, swap_module
from layerscope.probes.zoo import LoadedModel

NormGroup = Literal["mlp", "attn", "final", "other"]


@dataclass(frozen=True)
class NormSite:
    """One norm of a model: its role (`ln2[3]`, `ln1[3]`, `final_norm`, `other:<path>`),
    its full module path, and what its forward computes."""

    role: str
    path: str
    group: NormGroup
    kind: NormKind
    eps: float
    weight_offset: float


def is_real_norm(module: torch.nn.Module) -> bool:
    """A module that divides by a per-token scale computed from its input."""
    if isinstance(module, FrozenNorm):
        return False
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def norm_kind(module: torch.nn.Module) -> NormKind:
    if isinstance(module, FrozenNorm):
        return module.kind
    return "layernorm" if isinstance(module, torch.nn.LayerNorm) else "rmsnorm"


def norm_eps(module: torch.nn.Module) -> float:
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", None)
    # torch.nn.RMSNorm with eps=None uses the dtype's machine epsilon.
    return float(eps) if eps is not None else torch.finfo(torch.float32).eps


def norm_sites(loaded: LoadedModel) -> list[NormSite]:
    """Every real norm of the model in removal order: the adapter's pre-MLP norms, then its
    pre-attention norms, then the final norm, then any other norm found by type (BERT's
    embedding and masked-LM-head LayerNorms).  Norms already frozen are left out."""
    adapter, model = loaded.adapter, loaded.model
    groups: dict[str, NormGroup] = {"ln2": "mlp", "ln2_post": "mlp", "ln1": "attn", "ln1_post": "attn",
                                    "final_norm": "final"}
    listed = [(role, path, groups[role.split("[")[0]]) for role, path in adapter.norm_paths(loaded.n_layers)]
    listed_paths = {path for _, path, _ in listed}
    listed += [(f"other:{path}", path, "other") for path, module in model.named_modules()
               if path not in listed_paths and is_real_norm(module)]
    sites = []
    for role, path, group in listed:
        module = get_module(model, path)
        if not is_real_norm(module):
            continue
        kind = norm_kind(module)
        offset = adapter.norm_weight_offset if kind == adapter.norm_kind else 0.0
        sites.append(NormSite(role, path, group, kind, norm_eps(module), offset))
    return sites


def token_scale(x: Float[torch.Tensor, "*tokens d"], kind: NormKind, eps: float) -> Float[torch.Tensor, "*tokens"]:
    """The per-token scale a real norm divides by: `sqrt(mean(x_c^2) + eps)`, over the last
    axis ([batch pos d_model], or [batch head pos d_head] for a query/key norm)."""
    centred = x - x.mean(dim=-1, keepdim=True) if kind == "layernorm" else x
    return (centred.square().mean(dim=-1) + eps).sqrt()


def applied_scale(module: torch.nn.Module, x: Float[torch.Tensor, "batch pos d_model"]
                  ) -> Float[torch.Tensor, "batch pos"]:
    """The scale `module` divides each token of `x` by: fixed for a frozen norm (its first
    positions may have their own), computed from `x` for a real one."""
    if isinstance(module, FrozenNorm) and not getattr(module, "live", False):
        scale = module.scale.to(x.dtype).expand(x.shape[:-1]).clone()
        scale[..., :module.first_positions] = module.first_scale
        return scale
    real = getattr(module, "real", module)
    return token_scale(x, norm_kind(real), norm_eps(real))


def norm_forward(module: torch.nn.Module, x: Float[torch.Tensor, "batch pos d_model"],
                 weight_offset: float = 0.0) -> Float[torch.Tensor, "batch pos d_model"]:
    """What `module` computes on `x`, in `x`'s dtype (float64 for exact attributions)."""
    real = getattr(module, "real", module)
    if isinstance(module, FrozenNorm):
        weight_offset = module.weight_offset
    kind = norm_kind(module)
    centred = x - x.mean(dim=-1, keepdim=True) if kind == "layernorm" else x
    out = centred / applied_scale(module, x)[..., None] * (real.weight.to(x.dtype) + weight_offset)
    bias = getattr(real, "bias", None)
    return out + bias.to(x.dtype) if bias is not None else out


def require_norms(loaded: LoadedModel) -> list[NormSite]:
    sites = norm_sites(loaded)
    if not sites:
        raise UserError(f"{loaded.spec.name} has no norm that divides by a data-dependent scale "
                        "(no LayerNorm or RMSNorm, or every norm is already frozen): nothing to remove")
    return sites


# ---------------------------------------------------------------- the fake norm of LN removal

class RemovableNorm(FrozenNorm):
    """A norm that is the real one until frozen, keeping a running average of its
    per-token scale meanwhile (position 0, the positions after the first
    `first_positions`, and all positions apart).

    Live, the output is the wrapped norm's own forward, bit for bit.  Freezing follows
    Baroni et al. (2025): `freeze("all")` divides every position but 0 by the average over
    the other positions; `freeze("qk")` does so only on the query/key path, while the value
    projection (hooked by `wrap_norms`) still reads the real norm's output until
    `freeze("v")`; the first `first_positions` positions (the BOS token, and with 2 the
    token after it, which some models also make a sink) keep their real scale, still
    averaged, until `freeze("first")` fixes them at position 0's.  The wrapped module is
    held outside the module tree, so each weight appears once in parameters and state dicts.
    """

    def __init__(self, norm: torch.nn.Module, site: NormSite, momentum: float | None, first_positions: int = 1):
        super().__init__(norm, site.kind, 1.0, None, site.weight_offset, first_positions)
        object.__setattr__(self, "real", norm)
        self.site = site
        self.eps = site.eps
        # None: a plain cumulative mean (calibration); otherwise an exponential average.
        self.momentum = momentum
        self.tracking = False
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("value_live", torch.tensor(False))
        self.register_buffer("first_live", torch.tensor(False))
        self.register_buffer("average", torch.zeros(3, dtype=torch.float64))  # first, rest, all
        self.register_buffer("updates", torch.tensor(0))
        self.pending_value: torch.Tensor | None = None
        self.value_hook = None
        # (ratio, list to append to) while a training step collects the scale guard's terms.
        self.guard: tuple[float, list[torch.Tensor]] | None = None

    @property
    def live(self) -> bool:
        return not bool(self.frozen) or bool(self.first_live) or bool(self.value_live)

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        if self.guard is not None and int(self.updates) > 0 and x.shape[-2] > self.first_positions:
            ratio, terms = self.guard
            terms.append(scale_excess(x[..., self.first_positions:, :], self.kind, self.eps,
                                      ratio * float(self.average[1])))
        if not bool(self.frozen):
            if self.tracking:
                self._observe(x.detach())
            return self.real(x)
        out = super().forward(x)
        if bool(self.first_live):
            if self.tracking:
                self._observe(x.detach())
            k = self.first_positions
            out = torch.cat([self.real(x[..., :k, :]), out[..., k:, :]], dim=-2)
        if bool(self.value_live):
            self.pending_value = self.real(x)
        return out

    @torch.no_grad()
    def _observe(self, x: Float[torch.Tensor, "batch pos d_model"]) -> None:
        s = token_scale(x.float(), self.kind, self.eps)
        rest = s[..., self.first_positions:] if s.shape[-1] > self.first_positions else s
        batch = torch.stack([s[..., 0].mean(), rest.mean(), s.mean()]).double()
        self.updates += 1
        if self.updates == 1:
            self.average.copy_(batch)
        elif self.momentum is None:
            self.average += (batch - self.average) / self.updates
        else:
            self.average.mul_(self.momentum).add_((1 - self.momentum) * batch)

    def freeze(self, shared_first_scale: bool, part: str = "whole") -> None:
        """Fix the scale of `part`: "whole" (every path and position), "all" (every path,
        position 0 still live), "qk" (the query/key path), "v" (the value path) or "first"
        (the first positions, at position 0's average).  The other positions are frozen at
        their average (Baroni et al.'s non-BOS average), or at the average over all positions
        with `shared_first_scale`."""
        if int(self.updates) == 0:
            raise RuntimeError("a norm was frozen before its scale was measured")
        first, rest, every = self.average.tolist()
        if part in ("whole", "all", "qk"):
            self.scale.fill_(every if shared_first_scale else rest)
            self.first_scale.fill_(every if shared_first_scale else first)
            self.frozen.fill_(True)
            self.value_live.fill_(part == "qk" and self.value_hook is not None)
            self.first_live.fill_(part != "whole")
        elif part == "v":
            self.value_live.fill_(False)
        elif part == "first":
            self.first_scale.fill_(self.scale.item() if shared_first_scale else first)
            self.first_live.fill_(False)
        else:
            raise ValueError(f"unknown part {part!r}")

    def feed_value(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook of the value projection: the real norm's output while the value
        path is live."""
        if self.pending_value is None:
            return None
        value, self.pending_value = self.pending_value, None
        return (value, *args[1:])


def scale_excess(x: Float[torch.Tensor, "batch pos d_model"], kind: NormKind, eps: float, limit: float
                 ) -> torch.Tensor:
    """Mean over tokens of relu(log(scale / limit))^2: zero for every token whose scale stays
    under `limit`, growing slowly (logarithmically) with how far one goes past it."""
    excess = torch.log(token_scale(x.float(), kind, eps) / limit).clamp_min(0)
    return excess.square().mean()


def value_projection(loaded: LoadedModel, site: NormSite) -> torch.nn.Module | None:
    """The value projection a pre-attention norm feeds, where it is a module of its own."""
    adapter = loaded.adapter
    layer = re.fullmatch(r"ln1\[(\d+)\]", site.role)
    if (layer is None or adapter.placement not in ("pre", "peri") or adapter.qkv_layout != "separate"
            or not adapter.attn_projections):
        return None
    return adapter.layer_part(loaded.model, int(layer.group(1)), adapter.attn_projections[-1])


def value_split_roles(loaded: LoadedModel, sites: list[NormSite]) -> frozenset[str]:
    """The pre-attention norms whose value path can be frozen apart from the query/key path."""
    return frozenset(s.role for s in sites if value_projection(loaded, s) is not None)


def wrap_norms(loaded: LoadedModel, momentum: float | None, split_value: bool = False,
               first_positions: int = 1) -> dict[str, RemovableNorm]:
    """Replace every real norm by a live `RemovableNorm` (same output); role -> wrapper.
    With `split_value`, each pre-attention norm's value path can be frozen apart."""
    wrapped = {}
    for site in require_norms(loaded):
        wrapper = RemovableNorm(get_module(loaded.model, site.path), site, momentum, first_positions)
        swap_module(loaded.model, site.path, wrapper)
        value = value_projection(loaded, site) if split_value else None
        if value is not None:
            wrapper.value_hook = value.register_forward_pre_hook(wrapper.feed_value)
        wrapped[site.role] = wrapper
    return wrapped


def unwrap_norms(loaded: LoadedModel, wrapped: dict[str, RemovableNorm]) -> None:
    """Put the real norms back (they share their weights with the wrappers)."""
    for wrapper in wrapped.values():
        if wrapper.value_hook is not None:
            wrapper.value_hook.remove()
        swap_module(loaded.model, wrapper.site.path, wrapper.real)


@contextlib.contextmanager
def guarding(wrapped: dict[str, RemovableNorm], ratio: float) -> Iterator[list[torch.Tensor]]:
    """While inside, every wrapper whose average is known appends the scale excess of its
    tokens after the sink positions to the list yielded (see `scale_excess`)."""
    terms: list[torch.Tensor] = []
    for wrapper in wrapped.values():
        wrapper.guard = (ratio, terms)
    try:
        yield terms
    finally:
        for wrapper in wrapped.values():
            wrapper.guard = None


@contextlib.contextmanager
def tracking(wrapped: dict[str, RemovableNorm]) -> Iterator[None]:
    """Live wrappers average the scales they see while inside."""
    for wrapper in wrapped.values():
        wrapper.tracking = True
    try:
        yield
    finally:
        for wrapper in wrapped.values():
            wrapper.tracking = False


def running_averages(wrapped: dict[str, RemovableNorm]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of each wrapper's running average and update count, to put back with
    `restore_averages` when a step's batch is skipped."""
    return {role: (w.average.clone(), w.updates.clone()) for role, w in wrapped.items()}


def restore_averages(wrapped: dict[str, RemovableNorm], saved: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for role, (average, updates) in saved.items():
        wrapped[role].average.copy_(average)
        wrapped[role].updates.copy_(updates)


def frozen_scales(wrapped: dict[str, RemovableNorm]) -> list[dict]:
    """role, path, kind, scale, first_scale, first_positions and weight_offset of every
    frozen wrapper."""
    return [{"role": role, "path": w.site.path, "kind": w.kind, "scale": float(w.scale),
             "first_scale": float(w.first_scale), "first_positions": w.first_positions,
             "weight_offset": w.weight_offset}
            for role, w in wrapped.items() if not w.live]
