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


@dataclass(frozen=True)
class RemovalEvent:
    """The norm at `path` (role `role`) is frozen just before step `step` trains."""

    step: int
    role: str
    path: str


def removal_schedule(sites: list[NormSite], config: RemovalConfig) -> list[RemovalEvent]:
    """When each norm is frozen: the first at `start`, each later one a group's gap after
    the one before (pre-MLP norms, then pre-attention, then final and others)."""
    gaps = {"mlp": config.gap_mlp, "attn": config.gap_attn, "final": config.gap_final, "other": config.gap_final}
    order = {"mlp": 0, "attn": 1, "final": 2, "other": 3}
    events, step = [], config.start
    for i, site in enumerate(sorted(sites, key=lambda s: order[s.group])):
        if i:
            step += gaps[site.group]
        events.append(RemovalEvent(step, site.role, site.path))
    if events and events[-1].step >= config.steps:
        raise UserError(f"the schedule removes its last norm ({events[-1].role}) at step {events[-1].step}, "
                        f"but the budget is {config.steps} steps: raise --steps above {events[-1].step} "
                        f"or shorten --start/--gap-mlp/--gap-attn/--gap-final")
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
