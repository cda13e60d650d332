"""Freeze one norm at a time at its average scale, with no fine-tuning, and measure what
that costs (the sweep behind the `norm-sensitivity` measurement and the sensitivity order
of LN removal; Heimersheim 2024; Baroni et al. 2025).

Two passes over the windows.  The first measures, for every real norm, the per-token scale
it divides by: its mean at position 0, its mean over the other positions, and a log-spaced
histogram of the other positions' scales for the spread (99th over 1st percentile).  The
second freezes each norm alone (and each kind of norm all at once) at the mean over
non-first positions, as Baroni et al. average over non-BOS positions, once with that one
scale everywhere and once with position 0 given its own mean, and compares the next-token
distribution with the full model's.  A norm in block *l* is replayed from the clean pass's
`resid_pre[l]`, so blocks before *l* are not recomputed.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
from jaxtyping import Float

from layerscope.probes.families import get_module
from layerscope.probes.interventions import frozen_norms
from layerscope.probes.norms import NormSite, require_norms, token_scale
from layerscope.probes.replay import (CleanPass, final_normed, next_token_rows, record_clean_pass, run_blocks,
                                      score_tokens)
from layerscope.probes.zoo import LoadedModel

# Natural-log bins of the per-token scale: 1% wide from e^-30 to e^30, enough for any
# float32 activation and fine enough for a percentile ratio.
LOG_LOW, LOG_HIGH, LOG_BINS = -30.0, 30.0, 6000
VARIANTS = ("shared", "own_first")


@dataclass(frozen=True)
class ScaleStats:
    """Per norm (in `sites` order): token sums of the scale at position 0 and elsewhere,
    and the histogram of the log-scale at non-first positions."""

    sites: tuple[NormSite, ...]
    first_sum: Float[torch.Tensor, "norm"]
    first_count: int
    rest_sum: Float[torch.Tensor, "norm"]
    rest_count: int
    histogram: Float[torch.Tensor, "norm bin"]

    @property
    def mean_first(self) -> list[float]:
        return (self.first_sum / max(1, self.first_count)).tolist()

    @property
    def mean_rest(self) -> list[float]:
        return (self.rest_sum / max(1, self.rest_count)).tolist()

    def percentile(self, q: float) -> list[float]:
        """The q-th percentile (0..100) of each norm's non-first scale, to the bin (1%)."""
        cumulative = self.histogram.cumsum(dim=1)
        total = cumulative[:, -1:].clamp_min(1)
        index = (cumulative / total < q / 100).sum(dim=1).clamp_max(LOG_BINS - 1)
        width = (LOG_HIGH - LOG_LOW) / LOG_BINS
        return [math.exp(LOG_LOW + (i + 0.5) * width) for i in index.tolist()]

    def frozen_scale(self, i: int, variant: str) -> tuple[float, float]:
        """(scale, position-0 scale) of norm `i` frozen in `variant`."""
        rest = self.mean_rest[i]
        return rest, (self.mean_first[i] if variant == "own_first" else rest)


@contextlib.contextmanager
def _scale_hooks(loaded: LoadedModel, sites: list[NormSite], sink: list[torch.Tensor | None]):
    handles = []

    def hook(i, site):
        def observe(module, args):
            sink[i] = token_scale(args[0].detach().double(), site.kind, site.eps)
        return observe

    try:
        for i, site in enumerate(sites):
            handles.append(get_module(loaded.model, site.path).register_forward_pre_hook(hook(i, site)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def measure_scales(loaded: LoadedModel, batches, sites: list[NormSite] | None = None) -> ScaleStats:
    """Every real norm's per-token scale over the batches, with all norms in place."""
    sites = sites if sites is not None else require_norms(loaded)
    k = len(sites)
    first_sum, rest_sum = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    histogram = torch.zeros(k, LOG_BINS, dtype=torch.float64)
    first_count = rest_count = 0
    seen: list[torch.Tensor | None] = [None] * k
    for input_ids in batches:
        with _scale_hooks(loaded, sites, seen):
            # The whole model: the final norm and an encoder's head norm come after the blocks.
            loaded.model(input_ids=input_ids.to(loaded.input_device))
        for i, scale in enumerate(seen):
            # Positions are the last axis ([batch pos], or [batch head pos] for a query/key norm).
            first_sum[i] += scale[..., 0].mean().item() * input_ids.shape[0]
            rest = scale[..., 1:]
            rest_sum[i] += rest.mean().item() * input_ids.shape[0] * (input_ids.shape[1] - 1)
            # Each head's scale counts 1/heads of a token, so every norm's histogram sums to the tokens.
            histogram[i] += torch.histc(rest.log().float().cpu(), LOG_BINS, LOG_LOW, LOG_HIGH).double() \
                * (input_ids.numel() - input_ids.shape[0]) / max(1, rest.numel())
        first_count += input_ids.shape[0]
        rest_count += input_ids.shape[0] * (input_ids.shape[1] - 1)
    return ScaleStats(tuple(sites), first_sum, first_count, rest_sum, rest_count, histogram)


def site_layer(loaded: LoadedModel, site: NormSite) -> int | None:
    """The block a norm sits in (None for the final norm and norms outside the blocks)."""
    found = re.match(rf"{re.escape(loaded.adapter.layers)}\.(\d+)\.", site.path)
    return int(found.group(1)) if found else None


def site_kind(site: NormSite) -> str:
    """The kind of norm a role names: `ln1`, `ln2`, `final_norm`; for other norms the last
    two parts of the module path, without the block index (`embeddings.LayerNorm`)."""
    if site.role.startswith("other:"):
        return ".".join(part for part in site.path.split(".")[-3:] if not part.isdigit()).split(".", 1)[-1] \
            if site.path.count(".") >= 2 else site.path
    return site.role.split("[")[0]


@dataclass(frozen=True)
class FreezeSweep:
    """Token sums over the windows for each frozen item (one norm, or one kind of norm all
    at once) in each variant; divide by `tokens` for means."""

    items: tuple[str, ...]
    ce_full: float
    ce: dict[str, list[float]]            # variant -> per item: CE with the item frozen
    kl: dict[str, list[float]]            # variant -> per item: KL(full || frozen)
    agree: dict[str, list[float]]         # variant -> per item: top-1 agreement with the full model
    final_change: dict[str, list[float]]  # variant -> per item: ||h'_L - h_L|| / ||h_L||
    tokens: int


def _final_from(loaded: LoadedModel, clean: CleanPass, layer: int | None) -> torch.Tensor:
    """The final residual, replaying from block `layer` (the whole model when None)."""
    if layer is None:
        return record_clean_pass(loaded, clean.input_ids).final_resid
    final, _ = run_blocks(loaded, clean, layer, clean.resid_pre[layer])
    return final


@torch.no_grad()
def freeze_sweep(loaded: LoadedModel, batches, stats: ScaleStats, groups: dict[str, list[int]],
                 progress=None, variants: tuple[str, ...] = VARIANTS) -> FreezeSweep:
    """Freeze each norm of `stats` alone, then each group of norms (name -> indices) at once,
    in each variant, over every batch."""
    sites = list(stats.sites)
    items = [site.role for site in sites] + [f"all {name}" for name in groups]
    members = [[i] for i in range(len(sites))] + list(groups.values())
    start = [site_layer(loaded, site) if site.path != loaded.adapter.final_norm else loaded.n_layers
             for site in sites]
    causal = loaded.adapter.causal
    sums = {name: {v: [0.0] * len(items) for v in variants} for name in ("ce", "kl", "agree", "final")}
    ce_full, tokens = 0.0, 0
    for input_ids in batches:
        clean = record_clean_pass(loaded, input_ids)
        if causal:
            targets = clean.input_ids[:, 1:].reshape(-1)
            reference = next_token_rows(final_normed(loaded, clean.final_resid))
            clean_scores = score_tokens(loaded, reference[None], targets)
            ce_full += clean_scores.ce.double().sum().item()
        final_norm = clean.final_resid[:, 1:].double().norm(dim=-1)
        for j, chosen in enumerate(members):
            layers = [start[i] for i in chosen]
            first = None if any(l is None for l in layers) else min(layers)
            for variant in variants:
                with frozen_norms(loaded, {sites[i].path: stats.frozen_scale(i, variant) for i in chosen}):
                    final = (clean.final_resid if first == loaded.n_layers
                             else _final_from(loaded, clean, first))
                    sums["final"][variant][j] += ((final[:, 1:].double() - clean.final_resid[:, 1:].double())
                                                  .norm(dim=-1) / final_norm.clamp_min(1e-12)).sum().item()
                    if causal:
                        scores = score_tokens(loaded, next_token_rows(final_normed(loaded, final))[None], targets,
                                              reference=reference)
                        sums["ce"][variant][j] += scores.ce.double().sum().item()
                        sums["kl"][variant][j] += scores.kl.double().sum().item()
                        sums["agree"][variant][j] += (scores.top == clean_scores.top).sum().item()
                if progress is not None:
                    progress.update(1)
        tokens += input_ids.shape[0] * (input_ids.shape[1] - 1)
    return FreezeSweep(tuple(items), ce_full, sums["ce"], sums["kl"], sums["agree"], sums["final"], tokens)


def kind_groups(loaded: LoadedModel, sites: list[NormSite]) -> dict[str, list[int]]:
    """Indices of the norms of each kind that has more than one norm."""
    groups: dict[str, list[int]] = {}
    for i, site in enumerate(sites):
        groups.setdefault(site_kind(site), []).append(i)
    return {name: chosen for name, chosen in groups.items() if len(chosen) > 1}


def sensitivity_order(loaded: LoadedModel, batches, sites: list[NormSite]) -> list[tuple[str, float]]:
    """(role, KL to the full model) of every norm frozen alone with position 0 at its own
    scale, least sensitive first: the order LN removal uses with `--order sensitivity`.
    Encoders are ranked by the relative change of the final residual instead."""
    batches = list(batches)
    stats = measure_scales(loaded, batches, sites)
    sweep = freeze_sweep(loaded, batches, stats, {}, variants=("own_first",))
    cost = sweep.kl["own_first"] if loaded.adapter.causal else sweep.final_change["own_first"]
    ranked = [(site.role, value / sweep.tokens) for site, value in zip(sites, cost)]
    return sorted(ranked, key=lambda pair: (not math.isfinite(pair[1]), pair[1] if math.isfinite(pair[1]) else 0.0))
