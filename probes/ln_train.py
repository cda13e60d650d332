"""The fine-tuning loop of LN removal (Heimersheim 2024; Baroni et al. 2025): the loss,
the evaluation, the optimiser, and `fine_tune`, which freezes each norm on the schedule
while it trains (or keeps them all, for the vanilla control of the same length).

Training is deterministic on CPU: the batch of step *s* and the learning rate at step *s*
are functions of *s* and the seed, and checkpoints hold the model, optimizer, running
averages and history, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from layerscope.probes.corpus import TokenWindows
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module
from layerscope.probes.ln_checkpoints import CHECKPOINT_FORMAT, check_resumable, load_checkpoint, save_checkpoint
from layerscope.probes.ln_options import RemovalConfig
from layerscope.probes.ln_schedule import FIRST, RemovalEvent, batch_for_step, learning_rate, removal_schedule
from layerscope.probes.norms import (RemovableNorm, frozen_scales, guarding, restore_averages, running_averages,
                                     token_scale, tracking, unwrap_norms, value_split_roles, wrap_norms)
from layerscope.probes.zoo import LoadedModel
from layerscope.probes.replay import next_token_ce

MASK_RATE = 0.15
HISTORY_COLUMNS = ("step", "loss", "ce", "aux", "guard", "lr", "grad_norm", "removed")
CURVE_COLUMNS = ("step", "role", "part", "ce_before", "ce_after")


# ---------------------------------------------------------------- loss, evaluation, optimiser

def _masked(loaded: LoadedModel, ids: Int[torch.Tensor, "batch pos"], seed: int
            ) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """BERT-style masked-token inputs and labels (-100 where unmasked); position 0 is never masked."""
    mask_id = loaded.tokenizer.mask_token_id
    if mask_id is None:
        raise UserError(f"{loaded.spec.name} is an encoder whose tokenizer has no mask token")
    draw = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < MASK_RATE
    draw[:, 0] = False
    draw[:, 1] |= ~draw.any(dim=1)  # at least one target per window
    return ids.masked_fill(draw, mask_id), ids.masked_fill(~draw, -100)


def token_loss(loaded: LoadedModel, ids: Int[torch.Tensor, "batch pos"], seed: int) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy and the number of tokens it averages: the next token for causal
    models, masked tokens (drawn with `seed`) for encoders."""
    ids = ids.to(loaded.input_device)
    if loaded.adapter.causal:
        logits = loaded.model(input_ids=ids, use_cache=False).logits
        return next_token_ce(logits.float(), ids).mean(), ids[:, 1:].numel()
    inputs, labels = _masked(loaded, ids, seed)
    logits = loaded.model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return loss, int((labels != -100).sum())


def distill_loss(loaded: LoadedModel, teacher: torch.nn.Module, ids: Int[torch.Tensor, "batch pos"], seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher || student) of the next-token distributions (masked tokens for encoders),
    averaged over the positions the cross-entropy reads, and that cross-entropy: the
    student learns the original's whole distribution, not only the sampled token."""
    ids = ids.to(loaded.input_device)
    if loaded.adapter.causal:
        logits = loaded.model(input_ids=ids, use_cache=False).logits.float()
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float()[:, :-1], dim=-1)
        student = torch.log_softmax(logits[:, :-1], dim=-1)
        ce = next_token_ce(logits, ids).mean()
    else:
        inputs, labels = _masked(loaded, ids, seed)
        chosen = labels != -100
        logits = loaded.model(input_ids=inputs).logits.float()
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=inputs).logits.float()[chosen], dim=-1)
        student = torch.log_softmax(logits[chosen], dim=-1)
        ce = F.cross_entropy(logits[chosen], labels[chosen])
    kl = (target.exp() * (target - student)).sum(dim=-1).mean()
    return kl, ce


def fits_beside(model: torch.nn.Module) -> bool:
    """Whether a frozen copy of `model` (the distillation teacher) fits in the memory now free."""
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return need < free / 2


def resolved_loss(model: torch.nn.Module, config: RemovalConfig, remove: bool) -> str:
    """The loss a run trains on: the vanilla control always on cross-entropy (a fine-tune
    of the data itself, as in the papers); `auto` distils when the teacher fits."""
    if not remove:
        return "ce"
    if config.loss != "auto":
        return config.loss
    return "distill" if fits_beside(model) else "ce"


@torch.no_grad()
def eval_ce(loaded: LoadedModel, windows: TokenWindows) -> float:
    """Token-weighted mean cross-entropy over every evaluation window (fixed masks for encoders)."""
    total, count = 0.0, 0
    for index, ids in enumerate(windows):
        loss, n = token_loss(loaded, ids, seed=10_000_019 + index)
        total += loss.item() * n
        count += n
    return total / count


def make_optimizer(model: torch.nn.Module, config: RemovalConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=config.lr)


def aux_std_loss(x: Float[torch.Tensor, "batch pos d_model"], kind: str, skip: int) -> torch.Tensor:
    """Mean squared relative deviation of each token's std from the batch mean std, over the
    positions after the first `skip`: small when a frozen final norm's one scale fits every
    such token."""
    s = token_scale(x.float(), kind, 0.0)
    s = s[:, skip:] if s.shape[1] > skip else s
    return ((s / s.mean()) - 1).square().mean()


# ---------------------------------------------------------------- fine-tuning

@dataclass
class FineTuneResult:
    """What one fine-tuning run produced."""

    remove: bool
    history: dict[str, list]  # step, loss, ce, aux, guard, lr, grad_norm, removed
    events: list[RemovalEvent]
    scales: list[dict]  # role, path, kind, scale, first_scale, weight_offset
    eval_before: float
    eval_after: float
    seconds: float
    resumed_from: int | None
    loss: str = "ce"
    curve: list[dict] | None = None  # step, role, part, ce_before, ce_after per removal step
    skipped: list[int] = field(default_factory=list)  # steps whose batch was skipped (non-finite)

    def loss_table(self, run: str | None = None) -> pd.DataFrame:
        """One row per step: run, step, training objective (KL to the original when
        distilling), training cross-entropy, auxiliary loss, scale guard, learning rate,
        gradient norm and the number of norms removed so far."""
        name = run or ("ln-removal" if self.remove else "vanilla")
        return pd.DataFrame({k: self.history.get(k, []) for k in HISTORY_COLUMNS}).assign(run=name)[
            ["run", *HISTORY_COLUMNS]]


class LossNotFinite(UserError):
    """Training stopped on a NaN or infinite loss or gradient; the last checkpoint is kept."""


def _data_manifest(train: TokenWindows, evaluation: TokenWindows, loss: str, order: list[str] | None) -> dict:
    return {"train": json.dumps(train.manifest(), sort_keys=True),
            "eval": json.dumps(evaluation.manifest(), sort_keys=True),
            "loss": loss, "order": json.dumps(order)}


def _removed(wrapped: dict[str, RemovableNorm]) -> int:
    """Norms whose every path divides by a fixed scale (position 0 aside until the last event)."""
    return sum(1 for w in wrapped.values() if bool(w.frozen) and not bool(w.value_live))


def fine_tune(loaded: LoadedModel, train: TokenWindows, evaluation: TokenWindows, config: RemovalConfig, *,
              remove: bool = True, checkpoint: Path | None = None, checkpoint_every: int = 50,
              resume: bool = False, eval_before: float | None = None, progress: bool = False,
              on_step: Callable[[int], None] | None = None, teacher: torch.nn.Module | None = None,
              order: list[str] | None = None) -> FineTuneResult:
    """Fine-tune `loaded.model` in place for `config.steps` steps, freezing its norms on the
    removal schedule when `remove` (a vanilla fine-tune of the same length otherwise).

    With the distillation loss the student matches `teacher`'s next-token distribution
    (a frozen copy of the model as it is now when None).  `order` lists block norms least
    sensitive first for `config.order == "sensitivity"`.  Before and after each removal
    step the first `config.curve_tokens` of `evaluation` are evaluated, so the curve shows
    what each removal costs.  Checkpoints go to `checkpoint` every `checkpoint_every`
    steps and at the end; with `resume`, training continues from that file when it
    exists.  A non-finite loss or gradient stops the run before the optimizer step,
    leaving the last good checkpoint.
    """
    if checkpoint is not None and checkpoint.exists() and not resume:
        raise UserError(f"{checkpoint} already holds a checkpoint: continue it with --resume, "
                        "or delete it or choose another --checkpoint-dir")
    if remove and config.order == "sensitivity" and order is None:
        raise UserError("the sensitivity order needs the norms ranked (remove_norms measures them)")
    model = loaded.model
    loss_kind = resolved_loss(model, config, remove)
    if loss_kind == "distill" and teacher is None:
        teacher = copy.deepcopy(model).requires_grad_(False).eval()
    wrapped = wrap_norms(loaded, config.momentum, split_value=config.split_value,
                         first_positions=config.sink_positions) if remove else {}
    sites = [w.site for w in wrapped.values()]
    events = removal_schedule(sites, config, order if config.order == "sensitivity" else None,
                              value_split_roles(loaded, sites) if config.split_value else frozenset()) if remove else []
    optimizer = make_optimizer(model, config)
    data = _data_manifest(train, evaluation, loss_kind, order if config.order == "sensitivity" else None)
    history: dict[str, list] = {k: [] for k in HISTORY_COLUMNS}
    curve: list[dict] = []
    skipped: list[int] = []
    start, resumed_from, elapsed = 0, None, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        check_resumable(state, checkpoint, loaded, config, data, remove)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        history, start, elapsed = state["history"], state["step"], state["seconds"]
        eval_before, resumed_from, curve = state["eval_before"], state["step"], state["curve"]
        skipped = list(state.get("skipped", []))
    model.eval()  # no dropout: the papers fine-tune without it, and it keeps resumes exact
    if eval_before is None:
        eval_before = eval_ce(loaded, evaluation)
    curve_windows = evaluation.head(config.curve_tokens) if remove and config.curve_tokens > 0 else None
    if remove and start == 0:
        # The first removal may come before any training step has measured a scale.
        with tracking(wrapped), torch.no_grad():
            token_loss(loaded, batch_for_step(train, 0, config.seed), config.seed)
    final = get_module(model, loaded.adapter.final_norm) if loaded.adapter.final_norm else None
    if config.aux_weight > 0 and final is None:
        raise UserError(f"--aux-weight needs a final norm; {loaded.spec.name} has none")
    captured: dict[str, torch.Tensor] = {}
    hook = final.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0])) \
        if config.aux_weight > 0 else None
    by_step: dict[int, list[RemovalEvent]] = {}
    for event in events:
        by_step.setdefault(event.step, []).append(event)
    last_saved = start if resumed_from is not None else None
    started = time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress,
               desc="LN removal" if remove else "vanilla fine-tune", unit="step", mininterval=1.0)
    try:
        for step in bar:
            if step in by_step:
                before = eval_ce(loaded, curve_windows) if curve_windows is not None else float("nan")
                for event in by_step[step]:
                    for wrapper in (wrapped.values() if event.role == FIRST else [wrapped[event.role]]):
                        wrapper.freeze(config.shared_first_scale, event.part)
                if curve_windows is not None:
                    curve.append({"step": step, "role": ",".join(e.role for e in by_step[step]),
                                  "part": ",".join(e.part for e in by_step[step]), "ce_before": before,
                                  "ce_after": eval_ce(loaded, curve_windows)})
                    if progress:
                        bar.write(f"step {step}: froze {curve[-1]['role']} ({curve[-1]['part']}): held-out CE "
                                  f"{before:.4f} -> {curve[-1]['ce_after']:.4f}")
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            ids = batch_for_step(train, step, config.seed)
            averages = running_averages(wrapped) if config.max_skipped > 0 else None
            guards = wrapped if config.guard_weight > 0 else {}
            with tracking(wrapped), guarding(guards, config.guard_ratio) as guard_terms:
                if loss_kind == "distill":
                    loss, ce = distill_loss(loaded, teacher, ids, config.seed * 7919 + step)
                    objective = loss + config.ce_weight * ce if config.ce_weight > 0 else loss
                else:
                    loss, _ = token_loss(loaded, ids, config.seed * 7919 + step)
                    ce, objective = loss, loss
            aux = aux_std_loss(captured.pop("x"), loaded.adapter.norm_kind,
                               0 if config.shared_first_scale else config.sink_positions) \
                if hook is not None else torch.zeros(())
            guard = torch.stack(guard_terms).mean() if guard_terms else torch.zeros(())
            total = objective + config.aux_weight * aux + config.guard_weight * guard
            problem = f"loss is {total.item()}" if not torch.isfinite(total) else None
            if problem is None:
                total.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf"))
                problem = f"gradient norm is {grad_norm.item()}" if not torch.isfinite(grad_norm) else None
            if problem is not None:
                if len(skipped) >= config.max_skipped:
                    _stop(step, problem, checkpoint, last_saved)
                restore_averages(wrapped, averages)
                skipped.append(step)
                if progress:
                    bar.write(f"step {step}: {problem}; its batch is skipped "
                              f"({len(skipped)} of at most {config.max_skipped})")
            else:
                optimizer.step()
                removed = _removed(wrapped)
                for key, value in (("step", step), ("loss", loss.item()), ("ce", ce.item()), ("aux", aux.item()),
                                   ("guard", guard.item()), ("lr", lr), ("grad_norm", grad_norm.item()),
                                   ("removed", removed)):
                    history.setdefault(key, []).append(value)
                bar.set_postfix(loss=f"{loss.item():.3f}", ce=f"{ce.item():.3f}",
                                norms=f"{removed}/{len(wrapped)}" if remove else "kept")
            done = step + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == config.steps):
                save_checkpoint({
                    "format": CHECKPOINT_FORMAT, "model": loaded.spec.name, "weights_hash": loaded.weights_hash,
                    "remove": remove, "config": asdict(config), "data": data, "step": done,
                    "model_state": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": history, "curve": curve, "skipped": skipped, "eval_before": eval_before,
                    "seconds": elapsed + time.perf_counter() - started,
                }, checkpoint)
                last_saved = done
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
    seconds = elapsed + time.perf_counter() - started
    return FineTuneResult(remove, history, events, frozen_scales(wrapped), eval_before,
                          eval_ce(loaded, evaluation), seconds, resumed_from, loss_kind,
                          curve if curve_windows is not None else None, skipped)


def _stop(step: int, what: str, checkpoint: Path | None, last_saved: int | None) -> None:
    kept = (f"the last good checkpoint, with {last_saved} steps done, is kept in {checkpoint}"
            if last_saved is not None else "no checkpoint had been written yet")
    raise LossNotFinite(f"{what} at step {step}: stopped; {kept}; "
                        "lower --lr, raise --grad-clip or give --max-skipped, and --resume")


@torch.no_grad()
def remove_without_finetuning(loaded: LoadedModel, train: TokenWindows, evaluation: TokenWindows,
                              config: RemovalConfig, calibration_batches: int = 8) -> tuple[float, list[dict]]:
    """The control with no training: measure every norm's mean scale on training batches
    with all real norms in place, freeze them all at once, and evaluate.  The model is
    left as it was."""
    wrapped = wrap_norms(loaded, momentum=None, first_positions=config.sink_positions)
    try:
        with tracking(wrapped):
            for step in range(min(calibration_batches, max(1, len(train)))):
                token_loss(loaded, batch_for_step(train, step, config.seed), config.seed)
        for wrapper in wrapped.values():
            wrapper.freeze(config.shared_first_scale)
        return eval_ce(loaded, evaluation), frozen_scales(wrapped)
    finally:
        unwrap_norms(loaded, wrapped)
