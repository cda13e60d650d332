"""A streaming reducer for direct logit attribution (DLA).

The final residual of a Pre-LN model is a sum of components, `h = embed + sum_l (attn_l +
mlp_l)`, and the logit of token t is `W_U[t] . norm(h) + b_U[t]`.  With the final norm's
per-token scale `s` held fixed, `norm` is linear, so

    logit_t = sum_c W_U[t] . (c_centred / s * w) + (W_U[t] . b + b_U[t])

splits the logit into one term per component plus a constant.  In a norm-free model
(Heimersheim 2024; Baroni et al. 2025) `s` is a constant of the model, so each term is
also that component's *direct effect*: the change in the logit when the component is
removed from `h`.  With a real final norm, `s` moves when a component is removed, and the
term and the direct effect differ; the reducer measures both.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from jaxtyping import Bool, Float, Int

from layerscope.probes.backends import Activations, Point
from layerscope.probes.capture import Batch, PortableState, require_same
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module
from layerscope.probes.norms import applied_scale, is_real_norm, norm_eps, norm_forward, norm_kind
from layerscope.probes.zoo import LoadedModel



@dataclass(frozen=True)
class ComponentSums:
    """Per component (embedding, each attention and MLP output, then the constant), sums
    over scored tokens of its attribution (`dla`), its |attribution|, its direct effect, and
    |attribution - direct effect|."""

    dla: Float[torch.Tensor, "component"]
    abs_dla: Float[torch.Tensor, "component"]
    direct_effect: Float[torch.Tensor, "component"]
    abs_dla_minus_direct: Float[torch.Tensor, "component"]


@dataclass(frozen=True)
class DLACheck:
    """Sums over scored tokens that check the attribution: the model's `logit`, the sum of
    terms (`dla_sum`), |sum of terms - logit| (`abs_gap`, and its maximum `max_abs_gap`),
    |sum of direct effects - logit| (`abs_direct_sum_gap`), and the largest |sum of
    components - final residual| (`max_residual_gap`)."""

    tokens: float
    logit: float
    dla_sum: float
    abs_gap: float
    max_abs_gap: float
    abs_direct_sum_gap: float
    max_residual_gap: float


@dataclass(frozen=True)
class DLAExample:
    """The corpus's first window, per position: its tokens, the attributed target, whether
    the position is scored, each component's term and the model's logit."""

    input_ids: Int[torch.Tensor, "pos"]
    target: Int[torch.Tensor, "pos"]
    valid: Bool[torch.Tensor, "pos"]
    terms: Float[torch.Tensor, "component pos"]
    logit: Float[torch.Tensor, "pos"]


@dataclass(frozen=True)
class DLAResult:
    """`DirectLogitAttribution`'s result: the `components` as (name, layer) in residual
    order with their `sums`, the `check`, whether the model is `norm_free`, its final norm's
    kind, the attributed `token`, and the first window (`example`, None when the corpus's
    window 0 was not folded)."""

    components: list[tuple[str, int | None]]
    sums: ComponentSums
    check: DLACheck
    norm_free: bool
    final_norm_kind: str
    token: str
    example: DLAExample | None

# Sums over scored tokens, packed for one add per batch: per component (dla, abs_dla,
# direct_effect, abs_dla_minus_direct) and per model (DLACheck's fields in order).
_N_COMPONENT_FIELDS = 4
_CHECK_MAXIMA = (4, 6)  # max_abs_gap and max_residual_gap are maxima, not sums


@dataclass(frozen=True)
class DirectLogitAttribution:
    """Attribute the logit of a chosen token at every position to the embedding and each
    attention and MLP output.  `token` is 'next' (the true next token), 'top' (the model's
    top-1), a literal token text, or 'id:N'.  The first window is also kept per token."""

    token: str = "next"
    name: str = "dla"

    @property
    def needs_logits(self) -> bool:
        # Only the top-1 target needs every logit; the logit of a known target is read off
        # the final residual through the model's own final norm and unembedding rows, which
        # spares the pass the full unembedding (a quarter of a small model's forward).
        return self.token == "top"

    def points(self, loaded: LoadedModel) -> list[Point]:
        last = loaded.n_layers - 1
        return [Point("resid_pre", 0), *(Point(kind, layer) for layer in range(loaded.n_layers)
                                         for kind in ("attn_out", "mlp_out")), Point("resid_post", last)]

    def start(self, loaded: LoadedModel) -> "_DLAState":
        adapter = loaded.adapter
        if not adapter.causal or adapter.unembed is None or adapter.final_norm is None:
            raise UserError(f"DLA needs a causal model with a final norm and an unembedding; "
                            f"{loaded.spec.name} ({adapter.name}) has not")
        if adapter.placement == "post":
            raise UserError(f"DLA needs a model whose final residual is the sum of its components (Pre-LN, "
                            f"Peri-LN, parallel); {loaded.spec.name} is Post-LN")
        return _DLAState(loaded, resolve_token(loaded, self.token))


def resolve_token(loaded: LoadedModel, token: str) -> int | str:
    if token in ("next", "top"):
        return token
    if token.startswith("id:"):
        try:
            value = int(token[3:])
        except ValueError:
            raise UserError(f"--token {token!r}: after 'id:' comes a token id") from None
        if not 0 <= value < loaded.config.vocab_size:
            raise UserError(f"--token id {value} is outside the vocabulary of {loaded.config.vocab_size}")
        return value
    ids = loaded.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UserError(f"--token {token!r} is {len(ids)} tokens for this tokenizer, not one; "
                        "use 'next', 'top', or 'id:N'")
    return ids[0]


def component_names(n_layers: int) -> list[tuple[str, int | None]]:
    """(component, layer) in residual order, then the constant term ('bias')."""
    return [("embed", None), *((kind, l) for l in range(n_layers) for kind in ("attn", "mlp")), ("bias", None)]


class _DLAState(PortableState):
    model_bound = ("norm", "w_u", "b_u")

    def __init__(self, loaded: LoadedModel, token: int | str):
        model, adapter = loaded.model, loaded.adapter
        self.n_layers = loaded.n_layers
        self.token = token
        # The components' points in residual order: every point DLA reads but the final residual.
        self.parts = DirectLogitAttribution().points(loaded)[:-1]
        self.norm = get_module(model, adapter.final_norm)
        self.weight_offset = adapter.norm_weight_offset
        self.kind = norm_kind(self.norm)
        unembed = get_module(model, adapter.unembed)
        self.w_u = unembed.weight.detach()
        self.b_u = unembed.bias.detach() if getattr(unembed, "bias", None) is not None else None
        self.norm_free = not any(is_real_norm(m) for m in model.modules())
        self.softcap = getattr(loaded.config, "final_logit_softcapping", None)
        n = len(component_names(self.n_layers))
        self.components = torch.zeros(n, _N_COMPONENT_FIELDS, dtype=torch.float64)
        self.check = torch.zeros(len(fields(DLACheck)), dtype=torch.float64)
        self.example: DLAExample | None = None

    def targets(self, batch: Batch) -> tuple[Int[torch.Tensor, "batch pos"], torch.Tensor]:
        ids = batch.input_ids
        valid = torch.ones(ids.shape, dtype=torch.bool)
        if self.token == "next":
            target = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
            valid[:, -1] = False
        elif self.token == "top":
            target = batch.logits.argmax(dim=-1)
        else:
            target = torch.full(ids.shape, self.token)
        return target, valid

    def target_logits(self, h: Float[torch.Tensor, "batch pos d_model"], target: Int[torch.Tensor, "batch pos"],
                      batch: Batch) -> Float[torch.Tensor, "batch pos"]:
        """The model's own logit of each target: from the pass's logits when it kept them,
        else from the final norm module's output (its `forward`, so that no capture hook on
        it fires again) and the target's unembedding row, the product taken in float64 (a
        float32 unembedding is itself off by up to about 1e-6 relative)."""
        if batch.logits is not None:
            return batch.logits.gather(-1, target[..., None])[..., 0].double()
        logit = (self.norm.forward(h).double() * self.w_u[target].double()).sum(-1)
        if self.b_u is not None:
            logit = logit + self.b_u[target].double()
        if self.softcap:
            logit = torch.tanh(logit / self.softcap) * self.softcap
        return logit

    @torch.no_grad()
    def update(self, acts: Activations, batch: Batch) -> None:
        target, valid = self.targets(batch)
        final = acts[Point("resid_post", self.n_layers - 1)]
        h = final.double()
        direction = self.w_u[target].double()  # [batch pos d_model]
        dla, direct, constant, total = attribute([acts[p] for p in self.parts], h, self.norm, direction,
                                                 self.weight_offset)
        if self.b_u is not None:
            constant = constant + self.b_u[target].double()
        model_logit = self.target_logits(final, target, batch)
        terms = torch.cat([dla, constant[None]])  # [component batch pos], the constant last
        effects = torch.cat([direct, constant[None]])
        gap = terms.sum(0) - model_logit
        residual_gap = (total - h).abs().amax()
        m = valid.double()
        self.components += torch.stack([(terms * m).sum((1, 2)), (terms.abs() * m).sum((1, 2)),
                                        (effects * m).sum((1, 2)), ((terms - effects).abs() * m).sum((1, 2))], dim=-1)
        scored_gap = gap.abs()[valid]
        self.check += torch.stack([
            m.sum(), (model_logit * m).sum(), (terms.sum(0) * m).sum(), scored_gap.sum(), torch.zeros(()),
            ((effects.sum(0) - model_logit).abs() * m).sum(), torch.zeros(())])
        self.check[4] = max(self.check[4].item(), scored_gap.max().item() if scored_gap.numel() else 0.0)
        self.check[6] = max(self.check[6].item(), residual_gap.item())
        row = batch.first_row
        if row is not None:
            self.example = DLAExample(batch.input_ids[row].clone(), target[row].clone(), valid[row].clone(),
                                      terms[:, row].float().clone(), model_logit[row].float().clone())

    def merge(self, other: "_DLAState") -> None:
        require_same(self, other, "n_layers", "token", "norm_free", "kind")
        maxima = list(_CHECK_MAXIMA)
        self.components += other.components
        summed = torch.ones(len(self.check), dtype=torch.bool)
        summed[maxima] = False
        self.check = torch.where(summed, self.check + other.check, torch.maximum(self.check, other.check))
        if other.example is not None:
            if self.example is not None:
                raise ValueError("both DLA states hold the corpus's first window: their windows overlap")
            self.example = other.example

    def result(self) -> DLAResult:
        return DLAResult(components=component_names(self.n_layers), sums=ComponentSums(*self.components.T.clone()),
                         check=DLACheck(*self.check.tolist()), norm_free=self.norm_free,
                         final_norm_kind=self.kind, token=str(self.token), example=self.example)


def attribute(parts: list[Float[torch.Tensor, "batch pos d_model"]], h: Float[torch.Tensor, "batch pos d_model"],
              norm: torch.nn.Module, direction: Float[torch.Tensor, "batch pos d_model"], weight_offset: float
              ) -> tuple[Float[torch.Tensor, "component batch pos"], Float[torch.Tensor, "component batch pos"],
                         Float[torch.Tensor, "batch pos"], Float[torch.Tensor, "batch pos d_model"]]:
    """Each component's attribution with the final norm's per-token scale frozen at its value
    on `h`, each component's direct effect (logit with `h` minus logit with `h - c`, through
    the actual norm), the constant term `W_U[t] . b` of the norm's bias, and the sum of the
    components (what `h` should equal); float64."""
    real = getattr(norm, "real", norm)
    offset = getattr(norm, "weight_offset", weight_offset)
    weight = real.weight.double() + offset
    h = h.double()
    scale = applied_scale(norm, h)[..., None]
    bias = getattr(real, "bias", None)
    constant = (direction * bias.double()).sum(-1) if bias is not None else torch.zeros(h.shape[:-1], dtype=h.dtype)
    layernorm = norm_kind(norm) == "layernorm"
    d_model = h.shape[-1]
    h_c = h - h.mean(dim=-1, keepdim=True) if layernorm else h
    frozen = weight * direction / scale  # the direction through the norm with h's scale
    plain = real is norm and is_real_norm(norm)
    # A plain norm's output dotted with the direction is (x_c . (w * direction)) / s(x_c) (plus
    # the bias term).  Removing c from h changes x_c . v by c_c . v and |x_c|^2 by
    # |c_c|^2 - 2 h_c . c_c, so each direct effect needs only per-token dot products, taken
    # for all the vectors at once; centring is linear: c_c . v = c . v - mean(c) sum(v).
    weighted = (real.weight.double() + weight_offset) * direction
    vectors = torch.stack((frozen, weighted, h_c, torch.ones_like(h)), dim=-1)  # [batch pos d_model 4]
    sums = vectors.sum(-2)
    eps = norm_eps(real) if plain else None
    h_w, h_sq = (h_c * weighted).sum(-1), h_c.square().sum(-1)
    through = lambda x: (norm_forward(norm, x, weight_offset) * direction).sum(-1)
    full = h_w / (h_sq / d_model + eps).sqrt() if plain else through(h)
    dla, direct = [], []
    total = torch.zeros_like(h)
    for part in parts:
        wide = part.double()
        total += wide
        dots = torch.matmul(wide[..., None, :], vectors)[..., 0, :]  # [batch pos 4]
        mean = dots[..., 3] / d_model
        if layernorm:
            dots = dots - mean[..., None] * sums
        dla.append(dots[..., 0])
        if plain:
            c_sq = torch.linalg.vector_norm(wide, dim=-1).square()
            if layernorm:
                c_sq = c_sq - d_model * mean.square()
            direct.append(full - (h_w - dots[..., 1]) / ((h_sq - 2 * dots[..., 2] + c_sq) / d_model + eps).sqrt())
        else:
            direct.append(full - through(h - wide))
    return torch.stack(dla), torch.stack(direct), constant, total
