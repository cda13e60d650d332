"""Prefix reuse: record one clean pass, then re-run only the blocks after a change.

A skip of block *l* leaves blocks 0..l-1 untouched, so their output, `resid_pre[l]`, is
taken from the clean pass and only blocks l..L-1 run again.  Sweeping all L skips then
costs about L(L+1)/2 block evaluations instead of L² (Csordás et al., "Do Language Models
Use Their Depth Efficiently?", run the same sweep).  Each block is called with the exact
arguments it received in the clean pass (masks, rotary embeddings), recorded by a
pre-hook, so the replay is family-agnostic.

Next-token scores (cross-entropy, KL, top-1) are taken over chunks of positions: each
chunk is unembedded, log-softmaxed and reduced while it is small, so no full
[tokens x vocab] tensor is ever held, and the variants of one batch are unembedded
together, chunk by chunk, in one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int

from layerscope.probes.backends import StopForward
from layerscope.probes.families import get_module, output_item
from layerscope.probes.interventions import ablate_sublayer
from layerscope.probes.zoo import LoadedModel

SkipPart = Literal["block", "attn", "mlp"]


@dataclass
class CleanPass:
    """The clean forward of one batch, up to the last block's output: every block's input
    and the arguments it was called with."""

    input_ids: Int[torch.Tensor, "batch pos"]
    resid_pre: list[Float[torch.Tensor, "batch pos d_model"]]
    final_resid: Float[torch.Tensor, "batch pos d_model"]
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

    def last_block(module, args, out):
        final["resid"] = output_item(out)
        raise StopForward  # nothing after the last block is read

    handles = [b.register_forward_pre_hook(remember, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(last_block))
    try:
        loaded.model(input_ids, use_cache=False) if loaded.adapter.causal else loaded.model(input_ids)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return CleanPass(input_ids, resid_pre, final["resid"], block_args)


@torch.no_grad()
def run_blocks(loaded: LoadedModel, clean: CleanPass, start: int, hidden: Float[torch.Tensor, "batch pos d_model"],
               skipped: frozenset[int] = frozenset()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run blocks start..L-1 from `hidden`, passing the `skipped` ones by without running
    them; returns the final residual and each block's contribution."""
    contributions = []
    for layer in range(start, loaded.n_layers):
        if layer in skipped:
            contributions.append(torch.zeros_like(hidden))
            continue
        hidden, contribution = _run_one(loaded, clean, layer, hidden)
        contributions.append(contribution)
    return hidden, contributions


@torch.no_grad()
def final_normed(loaded: LoadedModel, resid: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch d_model"]:
    """A residual through the model's final norm (itself where the model has none)."""
    norm = loaded.adapter.final_norm
    return get_module(loaded.model, norm)(resid) if norm else resid


@torch.no_grad()
def head_logits(loaded: LoadedModel, normed: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch vocab"]:
    """The unembedding of final-normed residuals, with the logit soft-capping of the
    families that cap (Gemma 2), as the model's own forward applies it."""
    logits = get_module(loaded.model, loaded.adapter.unembed)(normed)
    cap = getattr(loaded.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def unembed(loaded: LoadedModel, resid: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos vocab"]:
    """The model's own head on a residual: final norm, then the unembedding (causal LMs)."""
    return head_logits(loaded, final_normed(loaded, resid))


@torch.no_grad()
def skip_and_continue(loaded: LoadedModel, clean: CleanPass, layer: int, part: SkipPart = "block",
                      skipped: frozenset[int] = frozenset()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The final residual with block `layer` (or only its attention or MLP) skipped, reusing
    the clean prefix, and the `skipped` blocks after it passed by; also each block's
    contribution from `layer` on (index 0 is `layer`)."""
    hidden = clean.resid_pre[layer]
    if part == "block":
        final, later = run_blocks(loaded, clean, layer + 1, hidden, skipped)
        return final, [torch.zeros_like(hidden), *later]
    with ablate_sublayer(loaded, [layer], part, "zero"):
        first_hidden, first = _run_one(loaded, clean, layer, hidden)
    final, later = run_blocks(loaded, clean, layer + 1, first_hidden, skipped)
    return final, [first, *later]


def _run_one(loaded, clean, layer, hidden):
    """One block on `hidden`, called with the arguments it got in the clean pass."""
    args, kwargs = clean.block_args[layer]
    out = output_item(loaded.adapter.layer_modules(loaded.model)[layer](hidden, *args, **kwargs))
    return out, out - hidden


def token_ce(logprobs: Float[torch.Tensor, "*rows vocab"], targets: Int[torch.Tensor, "*rows"]) -> Float[torch.Tensor, "*rows"]:
    """The cross-entropy of each target under log-probabilities: the one definition every
    next-token loss here goes through."""
    return -logprobs.gather(-1, targets[..., None])[..., 0]


def next_token_ce(logits: Float[torch.Tensor, "batch pos vocab"], input_ids: Int[torch.Tensor, "batch pos"]
                  ) -> Float[torch.Tensor, "batch pos_minus_1"]:
    """Per-token cross-entropy of predicting token t+1 from position t."""
    return token_ce(torch.log_softmax(logits[:, :-1], dim=-1), input_ids[:, 1:])


def next_token_targets(input_ids: Int[torch.Tensor, "batch pos"]) -> Int[torch.Tensor, "row"]:
    """The token each position predicts, row by row over the batch's positions; -1 at the
    last position of a window, which predicts nothing inside it."""
    return torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -1)], dim=1).reshape(-1)


# About this many bytes of float32 [rows x vocab] logits are held at a time: large enough
# for an efficient matmul, small enough to stay near the cache through the log-softmax
# and the reductions taken from it.
CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class TokenScores:
    """`score_tokens`' answer per variant and row: the target's cross-entropy (0 where there
    is no target), the top-1 token and its log-probability, and the KL from the reference
    distribution (None without a reference)."""

    ce: Float[torch.Tensor, "variant row"]
    top: Int[torch.Tensor, "variant row"]
    top_logprob: Float[torch.Tensor, "variant row"]
    kl: Float[torch.Tensor, "variant row"] | None


@torch.no_grad()
def score_tokens(loaded: LoadedModel, normed: Float[torch.Tensor, "variant row d_model"], targets: Int[torch.Tensor, "row"],
                 reference: int | Float[torch.Tensor, "row d_model"] | None = None) -> TokenScores:
    """Next-token scores of several variants of the same rows, from their final-normed
    residuals: each row's cross-entropy of `targets` (negative: no target), its top-1 token
    and log-probability, and with a `reference` (the index of one of the variants, or
    normed residuals of its own) the KL(reference || variant).

    The rows go through the unembedding in chunks, every variant's chunk in one matmul, and
    each chunk's log-softmax is reduced to these per-row values before the next."""
    n_variants, n_rows, _ = normed.shape
    own_reference = isinstance(reference, torch.Tensor)
    vocab = getattr(loaded.config, "vocab_size", None) or 2**16
    step = max(1, CHUNK_BYTES // (4 * vocab * (n_variants + own_reference)))
    shape = (n_variants, n_rows)
    ce = torch.zeros(shape, device=normed.device)
    top = torch.zeros(shape, dtype=torch.long, device=normed.device)
    top_logprob = torch.zeros(shape, device=normed.device)
    kl = torch.zeros(shape, device=normed.device) if reference is not None else None
    has_target = targets >= 0
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        logprobs = torch.log_softmax(head_logits(loaded, normed[:, rows]).float(), dim=-1)
        ce[:, rows] = token_ce(logprobs, targets[rows].clamp_min(0).expand(n_variants, -1))
        top_logprob[:, rows], top[:, rows] = logprobs.max(dim=-1)
        if reference is not None:
            ref = (torch.log_softmax(head_logits(loaded, reference[rows]).float(), dim=-1) if own_reference
                   else logprobs[reference])
            # The difference first, so that a small KL does not cancel.
            kl[:, rows] = (ref.exp() * (ref - logprobs)).sum(dim=-1)
    ce[:, ~has_target] = 0
    return TokenScores(ce, top, top_logprob, kl)


def next_token_rows(x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "row d_model"]:
    """The positions that predict a token inside their window, as rows."""
    return x[:, :-1].reshape(-1, x.shape[-1])


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


# Variants' final residuals held for one batched unembedding, at most about this many bytes.
PENDING_BYTES = 128 * 2**20


def _score_pending(loaded: LoadedModel, clean: CleanPass, pending: list[tuple[int, torch.Tensor]],
                   sums: dict[str, torch.Tensor]) -> float:
    """Fold the scores of the pending variants into `sums`; returns the clean pass's summed
    cross-entropy, scored with them as the reference (variant 0)."""
    finals = [clean.final_resid, *(final for _, final in pending)]
    normed = torch.stack([next_token_rows(final_normed(loaded, final)) for final in finals])
    targets = clean.input_ids[:, 1:].reshape(-1)
    scores = score_tokens(loaded, normed, targets, reference=0)
    for j, (i, _) in enumerate(pending, start=1):
        sums["ce"][i] += scores.ce[j].double().sum()
        sums["kl"][i] += scores.kl[j].double().sum()
        sums["top1"][i] += (scores.top[j] == scores.top[0]).sum()
    return scores.ce[0].double().sum().item()


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
                if (len(pending) + 1) * final.numel() * final.element_size() >= PENDING_BYTES or i == k - 1:
                    clean_ce = _score_pending(loaded, clean, pending, sums)
                    pending = []
            if progress is not None:
                progress.update(1)
        if causal:
            ce_full += clean_ce
        tokens += input_ids.shape[0] * (input_ids.shape[1] - 1)
    return SkipSweep(layers, part, ce_full, sums["ce"], sums["kl"], sums["top1"], sums["final"], future, tokens)


@torch.no_grad()
def greedy_removal(loaded: LoadedModel, batches, steps: int, progress=None) -> list[tuple[int, float]]:
    """Remove blocks one at a time, each time the one whose removal (with those already
    removed) gives the lowest loss, recomputed after every removal.

    Each candidate reuses the pass with the earlier removals up to its own `resid_pre`,
    runs the rest with the removed blocks passed by rather than run, and the candidates of
    a batch are unembedded together, chunk by chunk."""
    from layerscope.probes.interventions import skip_blocks

    batches = list(batches)
    removed: list[int] = []
    path = []
    for _ in range(steps):
        candidates = [c for c in range(loaded.n_layers) if c not in removed]
        totals = torch.zeros(len(candidates), dtype=torch.float64)
        count = 0
        for input_ids in batches:
            with skip_blocks(loaded, removed):
                base = record_clean_pass(loaded, input_ids)
            targets = base.input_ids[:, 1:].reshape(-1)
            pending: list[tuple[int, torch.Tensor]] = []
            for i, candidate in enumerate(candidates):
                final, _ = skip_and_continue(loaded, base, candidate, skipped=frozenset(removed))
                pending.append((i, next_token_rows(final_normed(loaded, final))))
                if len(pending) * final.numel() * final.element_size() >= PENDING_BYTES or i == len(candidates) - 1:
                    scores = score_tokens(loaded, torch.stack([rows for _, rows in pending]), targets)
                    totals[[j for j, _ in pending]] += scores.ce.double().sum(dim=-1)
                    pending = []
                if progress is not None:
                    progress.update(1)
            count += input_ids.shape[0] * (input_ids.shape[1] - 1)
        best = int(totals.argmin())
        removed.append(candidates[best])
        path.append((candidates[best], totals[best].item() / count))
    return path
