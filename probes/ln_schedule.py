"""The budget and schedule of LN removal: when each norm is frozen, the learning rate at
each step, and which windows each step trains on.

Every one of them is a function of the step and the seed, so a resumed run sees the same
batches and learning rates as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Int

from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.ln_options import RemovalConfig
from layerscope.probes.norms import NormSite


FIRST = "*"  # the role of the last event, which fixes position 0's scale in every norm


@dataclass(frozen=True)
class RemovalEvent:
    """Part `part` of the norm at `path` (role `role`) is frozen just before step `step`
    trains: "all" of it, its query/key path ("qk") or value path ("v"), or, for role
    `FIRST`, position 0 in every norm ("first")."""

    step: int
    role: str
    path: str
    part: str = "all"


def removal_schedule(sites: list[NormSite], config: RemovalConfig, order: list[str] | None = None,
                     split: frozenset[str] = frozenset()) -> list[RemovalEvent]:
    """When each norm is frozen, the first at `start` and each later one its group's gap
    after the one before.

    The fixed order is Baroni et al.'s: pre-MLP norms, then the query/key path of every
    pre-attention norm in `split` (the whole norm for the others), then their value paths,
    then the final norm and any other norm; last, position 0 of every norm.  With `order`
    (roles, least sensitive first), the block norms go in that order instead, each split
    norm's value path right after its query/key path."""
    gaps = {"mlp": config.gap_mlp, "attn": config.gap_attn, "final": config.gap_final, "other": config.gap_final}
    rank = {role: i for i, role in enumerate(order or [])}
    block = [s for s in sites if s.group in ("mlp", "attn")]
    rest = sorted((s for s in sites if s.group not in ("mlp", "attn")), key=lambda s: s.group != "final")
    units: list[tuple[NormSite, str, int]] = []
    if order is None:
        block.sort(key=lambda s: s.group != "mlp")
        units += [(s, "qk" if s.role in split else "all", gaps[s.group]) for s in block]
        units += [(s, "v", config.gap_v) for s in block if s.role in split]
    else:
        for s in sorted(block, key=lambda s: rank.get(s.role, len(rank))):
            units.append((s, "qk" if s.role in split else "all", gaps[s.group]))
            if s.role in split:
                units.append((s, "v", config.gap_v))
    units += [(s, "all", gaps[s.group]) for s in rest]
    events, step = [], config.start
    for i, (site, part, gap) in enumerate(units):
        step += gap if i else 0
        events.append(RemovalEvent(step, site.role, site.path, part))
    if events:
        events.append(RemovalEvent(step + config.gap_final, FIRST, "", "first"))
    if events and events[-1].step >= config.steps:
        last = events[-2]
        raise UserError(f"the schedule removes its last norm ({last.role}) at step {last.step} and fixes position "
                        f"0's scale at step {events[-1].step}, but the budget is {config.steps} steps: raise "
                        f"--steps above {events[-1].step} or shorten --start/--gap-mlp/--gap-attn/--gap-v/--gap-final")
    return events


def learning_rate(step: int, config: RemovalConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < config.lr_warmup:
        return config.lr * (step + 1) / config.lr_warmup
    if config.decay == "constant":
        return config.lr
    progress = (step - config.lr_warmup) / max(1, config.steps - 1 - config.lr_warmup)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_for_step(train: TokenWindows, step: int, seed: int) -> Int[torch.Tensor, "batch pos"]:
    """Step *s*'s windows: epoch-wise seeded permutations of the training windows."""
    n, size = train.input_ids.shape[0], train.spec.batch_size
    per_epoch = max(1, n // size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return train.input_ids[order[index * size:(index + 1) * size]]
