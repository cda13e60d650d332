"""Prefix reuse: record one clean pass, then re-run only the blocks after a change.

A skip of block *l* leaves blocks 0..l-1 untouched, so their output, `resid_pre[l]`, is
taken from the clean pass and only blocks l..L-1 run again.  Sweeping all L skips then
costs about L(L+1)/2 block evaluations instead of L² (Csordás et al., "Do Language Models
Use Their Depth Efficiently?", run the same sweep).  Each block is called with the exact
arguments it received in the clean pass (masks, rotary embeddings), recorded by a
pre-hook, so the replay is family-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int

from layerscope.probes.families import get_module, output_item
from layerscope.probes.interventions import ablate_sublayer
from layerscope.probes.zoo import LoadedModel

SkipPart = Literal["block", "attn", "mlp"]


@dataclass
class CleanPass:
    """The clean forward of one batch: every block's input and the arguments it was called with."""

    input_ids: Int[torch.Tensor, "batch pos"]
    resid_pre: list[Float[torch.Tensor, "batch pos d_model"]]
    final_resid: Float[torch.Tensor, "batch pos d_model"]
    logits: Float[torch.Tensor, "batch pos vocab"] | None
    block_args: list[tuple[tuple, dict]]

    def contribution(self, layer: int) -> Float[torch.Tensor, "batch pos d_model"]:
        """c_l = resid_post[l] - resid_pre[l] in the clean pass."""
        after = self.resid_pre[layer + 1] if layer + 1 < len(self.resid_pre) else self.final_resid
        return after - self.resid_pre[layer]



@torch.no_grad()
def record_clean_pass(loaded: LoadedModel, input_ids: Int[torch.Tensor, "batch pos"]) -> CleanPass:
    input_ids = input_ids.to(loaded.input_device)
    blocks = loaded.adapter.layer_modules(loaded.model)
    resid_pre, block_args = [], []
    final = {}

    def remember(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        resid_pre.append(hidden)
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        block_args.append((args[1:], rest))

    handles = [b.register_forward_pre_hook(remember, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(lambda m, a, out: final.__setitem__("resid", output_item(out))))
    try:
        output = loaded.model(input_ids, use_cache=False) if loaded.adapter.causal else loaded.model(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    logits = output.logits if loaded.adapter.causal else None
    return CleanPass(input_ids, resid_pre, final["resid"], logits, block_args)


@torch.no_grad()
def run_blocks(loaded: LoadedModel, clean: CleanPass, start: int,
               hidden: Float[torch.Tensor, "batch pos d_model"]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run blocks start..L-1 from `hidden`; returns the final residual and each block's contribution."""
    contributions = []
    for layer in range(start, loaded.n_layers):
        hidden, contribution = _run_one(loaded, clean, layer, hidden)
        contributions.append(contribution)
    return hidden, contributions


@torch.no_grad()
def unembed(loaded: LoadedModel, resid: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos vocab"]:
    """The model's own head on a residual: final norm, then the unembedding (causal LMs)."""
    adapter = loaded.adapter
    normed = get_module(loaded.model, adapter.final_norm)(resid) if adapter.final_norm else resid
    return get_module(loaded.model, adapter.unembed)(normed)


@torch.no_grad()
def skip_and_continue(loaded: LoadedModel, clean: CleanPass, layer: int, part: SkipPart = "block"
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The final residual with block `layer` (or only its attention or MLP) skipped, reusing
    the clean prefix; also each block's contribution from `layer` on (index 0 is `layer`)."""
    hidden = clean.resid_pre[layer]
    if part == "block":
        final, later = run_blocks(loaded, clean, layer + 1, hidden)
        return final, [torch.zeros_like(hidden), *later]
    with ablate_sublayer(loaded, [layer], part, "zero"):
        first_hidden, first = _run_one(loaded, clean, layer, hidden)
    final, later = run_blocks(loaded, clean, layer + 1, first_hidden)
    return final, [first, *later]


def _run_one(loaded, clean, layer, hidden):
    """One block on `hidden`, called with the arguments it got in the clean pass."""
    args, kwargs = clean.block_args[layer]
    out = output_item(loaded.adapter.layer_modules(loaded.model)[layer](hidden, *args, **kwargs))
    return out, out - hidden


def next_token_ce(logits: Float[torch.Tensor, "batch pos vocab"], input_ids: Int[torch.Tensor, "batch pos"]
                  ) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """Per-token cross-entropy of predicting token t+1 from position t."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")


def next_token_logprobs(logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, "batch pos_minus_1 vocab"]:
    return torch.log_softmax(logits[:, :-1], dim=-1)


@dataclass
class Reference:
    """The clean model's next-token distribution over one batch, prepared once so that many
    variants can be compared with it cheaply."""

    input_ids: Int[torch.Tensor, "batch pos"]
    logprobs: Float[torch.Tensor, "batch pos_minus_1 vocab"]
    probs: Float[torch.Tensor, "batch pos_minus_1 vocab"]
    top: Int[torch.Tensor, "batch pos_minus_1"]

    @classmethod
    def of(cls, logits: Float[torch.Tensor, "batch pos vocab"], input_ids: Int[torch.Tensor, "batch pos"]) -> "Reference":
        logprobs = next_token_logprobs(logits)
        return cls(input_ids, logprobs, logprobs.exp(), logprobs.argmax(-1))


def compare_to_reference(logits: Float[torch.Tensor, "batch pos vocab"], reference: Reference) -> dict[str, float]:
    """Token sums over next-token positions: cross-entropy, KL(reference || these logits),
    top-1 agreement with the reference and top-1 accuracy on the corpus."""
    logprobs = next_token_logprobs(logits)
    top = logprobs.argmax(-1)
    targets = reference.input_ids[:, 1:]
    return {
        "ce": -logprobs.gather(-1, targets[..., None]).sum().item(),
        # The difference first, so that a small KL does not cancel; torch's summation (not a
        # BLAS dot, whose float32 accumulator drifts over millions of terms).
        "kl": (reference.probs * (reference.logprobs - logprobs)).sum().item(),
        "agree": (top == reference.top).sum().item(),
        "correct": (top == targets).sum().item(),
    }


@dataclass
class SkipSweep:
    """Token sums over a corpus for each skipped layer; divide by the counts for means."""

    layers: list[int]
    part: str
    ce_full: float
    ce_skip: torch.Tensor           # [skipped]
    kl: torch.Tensor                # [skipped]  KL(full || skipped), next-token positions
    top1_agree: torch.Tensor        # [skipped]
    final_change: torch.Tensor      # [skipped]  ||h'_L - h_L|| / ||h_L||, non-first positions
    future: torch.Tensor            # [skipped, layer]  ||c_m - c'_m|| / ||c_m||, non-first positions
    tokens: int                     # next-token positions = non-first positions

    def merge(self, other: "SkipSweep") -> "SkipSweep":
        """The sums of two disjoint sets of windows, swept over the same layers."""
        if (self.layers, self.part) != (other.layers, other.part):
            raise ValueError("cannot merge sweeps over different layers or parts")
        return SkipSweep(self.layers, self.part, self.ce_full + other.ce_full, self.ce_skip + other.ce_skip,
                         self.kl + other.kl, self.top1_agree + other.top1_agree,
                         self.final_change + other.final_change, self.future + other.future,
                         self.tokens + other.tokens)


# Unembedding a few variants together reads the (large) unembedding matrix once for all.
UNEMBED_TOKENS = 1024


def _compare_pending(loaded: LoadedModel, pending: list[tuple[int, torch.Tensor]], reference: Reference,
                     sums: dict[str, torch.Tensor]) -> None:
    logits = unembed(loaded, torch.cat([final for _, final in pending]))
    for (i, _), variant in zip(pending, logits.split(reference.input_ids.shape[0])):
        compared = compare_to_reference(variant, reference)
        sums["ce"][i] += compared["ce"]
        sums["kl"][i] += compared["kl"]
        sums["top1"][i] += compared["agree"]


@torch.no_grad()
def skip_sweep(loaded: LoadedModel, batches, layers: list[int], part: SkipPart = "block",
               reuse_prefix: bool = True, progress=None) -> SkipSweep:
    """Skip each of `layers` alone over every batch and accumulate the effects.

    With `reuse_prefix` each skip starts from the clean pass's `resid_pre[l]`; without it,
    every skip is a full forward with `skip_blocks` / `ablate_sublayer` hooks (the naive
    sweep, kept as the reference the fast one is checked against)."""
    from layerscope.probes.interventions import ablate_sublayer, skip_blocks

    n, k = loaded.n_layers, len(layers)
    causal = loaded.adapter.causal
    sums = {name: torch.zeros(k, dtype=torch.float64) for name in ("ce", "kl", "top1", "final")}
    future = torch.zeros(k, n, dtype=torch.float64)
    ce_full, tokens = 0.0, 0
    for input_ids in batches:
        clean = record_clean_pass(loaded, input_ids)
        if causal:
            ce_full += next_token_ce(clean.logits, clean.input_ids).sum().item()
            reference = Reference.of(clean.logits, input_ids)
        clean_contribs = [clean.contribution(m)[:, 1:].double() for m in range(n)]
        final_norm = clean.final_resid[:, 1:].double().norm(dim=-1)
        pending: list[tuple[int, torch.Tensor]] = []
        for i, layer in enumerate(layers):
            if reuse_prefix:
                final, contribs = skip_and_continue(loaded, clean, layer, part)
            else:
                intervention = (skip_blocks(loaded, [layer]) if part == "block"
                                else ablate_sublayer(loaded, [layer], part, "zero"))
                with intervention:
                    skipped = record_clean_pass(loaded, input_ids)
                final = skipped.final_resid
                contribs = [skipped.contribution(m) for m in range(layer, n)]
            sums["final"][i] += ((final[:, 1:].double() - clean.final_resid[:, 1:].double()).norm(dim=-1)
                                 / final_norm).sum()
            for offset, contribution in enumerate(contribs):
                m = layer + offset
                change = (contribution[:, 1:].double() - clean_contribs[m]).norm(dim=-1)
                future[i, m] += (change / clean_contribs[m].norm(dim=-1).clamp_min(1e-12)).sum()
            if causal:
                pending.append((i, final))
                if len(pending) * input_ids.numel() >= UNEMBED_TOKENS or i == k - 1:
                    _compare_pending(loaded, pending, reference, sums)
                    pending = []
            if progress is not None:
                progress.update(1)
        tokens += input_ids.shape[0] * (input_ids.shape[1] - 1)
    return SkipSweep(layers, part, ce_full, sums["ce"], sums["kl"], sums["top1"], sums["final"], future, tokens)


@torch.no_grad()
def mean_ce(loaded: LoadedModel, batches, skipped: list[int] = ()) -> float:
    """Mean next-token cross-entropy over the batches with the given blocks skipped."""
    from layerscope.probes.interventions import skip_blocks

    total, count = 0.0, 0
    with skip_blocks(loaded, skipped):
        for input_ids in batches:
            logits = loaded.model(input_ids.to(loaded.input_device), use_cache=False).logits
            total += next_token_ce(logits, input_ids.to(logits.device)).sum().item()
            count += input_ids.shape[0] * (input_ids.shape[1] - 1)
    return total / count


@torch.no_grad()
def greedy_removal(loaded: LoadedModel, batches, steps: int, progress=None) -> list[tuple[int, float]]:
    """Remove blocks one at a time, each time the one whose removal (with those already
    removed) gives the lowest loss, recomputed after every removal.  Each candidate reuses
    the pass with the earlier removals up to its own `resid_pre`."""
    from layerscope.probes.interventions import skip_blocks

    batches = list(batches)
    removed: list[int] = []
    path = []
    for _ in range(steps):
        totals = {c: 0.0 for c in range(loaded.n_layers) if c not in removed}
        count = 0
        with skip_blocks(loaded, removed):
            for input_ids in batches:
                base = record_clean_pass(loaded, input_ids)
                for candidate in totals:
                    final, _ = skip_and_continue(loaded, base, candidate)
                    totals[candidate] += next_token_ce(unembed(loaded, final), input_ids).sum().item()
                    if progress is not None:
                        progress.update(1)
                count += input_ids.shape[0] * (input_ids.shape[1] - 1)
        best = min(totals, key=totals.get)
        removed.append(best)
        path.append((best, totals[best] / count))
    return path
