"""The fine-tuning loop of LN removal (Heimersheim 2024; Baroni et al. 2025): the loss,
the evaluation, the optimiser, and `fine_tune`, which freezes each norm on the schedule
while it trains (or keeps them all, for the vanilla control of the same length).

Training is deterministic on CPU: the batch of step *s* and the learning rate at step *s*
are functions of *s* and the seed, and checkpoints hold the model, optimizer, running
averages and history, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
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
from layerscope.probes.ln_schedule import RemovalEvent, batch_for_step, learning_rate, removal_schedule
from layerscope.probes.norms import frozen_scales, token_scale, tracking, unwrap_norms, wrap_norms
from layerscope.probes.zoo import LoadedModel
from layerscope.probes.replay import next_token_ce

MASK_RATE = 0.15
HISTORY_COLUMNS = ("step", "loss", "aux", "lr", "grad_norm", "removed")


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


def aux_std_loss(x: Float[torch.Tensor, "batch pos d_model"], kind: str, skip_first: bool) -> torch.Tensor:
    """Mean squared relative deviation of each token's std from the batch mean std: small
    when a frozen final norm's one scale fits every token."""
    s = token_scale(x.float(), kind, 0.0)
    s = s[:, 1:] if skip_first and s.shape[1] > 1 else s
    return ((s / s.mean()) - 1).square().mean()


# ---------------------------------------------------------------- fine-tuning

@dataclass
class FineTuneResult:
    """What one fine-tuning run produced."""

    remove: bool
    history: dict[str, list]  # step, loss, aux, lr, grad_norm, removed
    events: list[RemovalEvent]
    scales: list[dict]  # role, path, kind, scale, first_scale, weight_offset
    eval_before: float
    eval_after: float
    seconds: float
    resumed_from: int | None

    def loss_table(self, run: str | None = None) -> pd.DataFrame:
        """One row per step: run, step, training loss, auxiliary loss, learning rate,
        gradient norm and the number of norms removed so far."""
        name = run or ("ln-removal" if self.remove else "vanilla")
        return pd.DataFrame({k: self.history.get(k, []) for k in HISTORY_COLUMNS}).assign(run=name)[
            ["run", *HISTORY_COLUMNS]]


class LossNotFinite(UserError):
    """Training stopped on a NaN or infinite loss or gradient; the last checkpoint is kept."""


def _data_manifest(train: TokenWindows, evaluation: TokenWindows) -> dict:
    return {"train": json.dumps(train.manifest(), sort_keys=True),
            "eval": json.dumps(evaluation.manifest(), sort_keys=True)}


def fine_tune(loaded: LoadedModel, train: TokenWindows, evaluation: TokenWindows, config: RemovalConfig, *,
              remove: bool = True, checkpoint: Path | None = None, checkpoint_every: int = 50,
              resume: bool = False, eval_before: float | None = None, progress: bool = False,
              on_step: Callable[[int], None] | None = None) -> FineTuneResult:
    """Fine-tune `loaded.model` in place for `config.steps` steps, freezing its norms on the
    removal schedule when `remove` (a vanilla fine-tune of the same length otherwise).

    Checkpoints go to `checkpoint` every `checkpoint_every` steps and at the end; with
    `resume`, training continues from that file when it exists.  A non-finite loss or
    gradient stops the run before the optimizer step, leaving the last good checkpoint.
    """
    if checkpoint is not None and checkpoint.exists() and not resume:
        raise UserError(f"{checkpoint} already holds a checkpoint: continue it with --resume, "
                        "or delete it or choose another --checkpoint-dir")
    model = loaded.model
    wrapped = wrap_norms(loaded, config.momentum) if remove else {}
    events = removal_schedule([w.site for w in wrapped.values()], config) if remove else []
    optimizer = make_optimizer(model, config)
    data = _data_manifest(train, evaluation)
    history: dict[str, list] = {k: [] for k in HISTORY_COLUMNS}
    start, resumed_from, elapsed = 0, None, 0.0
    if checkpoint is not None and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        check_resumable(state, checkpoint, loaded, config, data, remove)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        history, start, elapsed = state["history"], state["step"], state["seconds"]
        eval_before, resumed_from = state["eval_before"], state["step"]
    model.eval()  # no dropout: the papers fine-tune without it, and it keeps resumes exact
    if eval_before is None:
        eval_before = eval_ce(loaded, evaluation)
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
            for event in by_step.get(step, []):
                wrapped[event.role].freeze(config.shared_first_scale)
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            with tracking(wrapped):
                loss, _ = token_loss(loaded, batch_for_step(train, step, config.seed), config.seed * 7919 + step)
            aux = aux_std_loss(captured.pop("x"), loaded.adapter.norm_kind, not config.shared_first_scale) \
                if hook is not None else torch.zeros(())
            total = loss + config.aux_weight * aux
            if not torch.isfinite(total):
                _stop(step, f"loss is {total.item()}", checkpoint, last_saved)
            total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf"))
            if not torch.isfinite(grad_norm):
                _stop(step, f"gradient norm is {grad_norm.item()}", checkpoint, last_saved)
            optimizer.step()
            removed = sum(1 for w in wrapped.values() if not w.live)
            for key, value in (("step", step), ("loss", loss.item()), ("aux", aux.item()), ("lr", lr),
                               ("grad_norm", grad_norm.item()), ("removed", removed)):
                history[key].append(value)
            bar.set_postfix(loss=f"{loss.item():.3f}", norms=f"{removed}/{len(wrapped)}" if remove else "kept")
            done = step + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == config.steps):
                save_checkpoint({
                    "format": CHECKPOINT_FORMAT, "model": loaded.spec.name, "weights_hash": loaded.weights_hash,
                    "remove": remove, "config": asdict(config), "data": data, "step": done,
                    "model_state": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "history": history, "eval_before": eval_before,
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
                          eval_ce(loaded, evaluation), seconds, resumed_from)


def _stop(step: int, what: str, checkpoint: Path | None, last_saved: int | None) -> None:
    kept = (f"the last good checkpoint, with {last_saved} steps done, is kept in {checkpoint}"
            if last_saved is not None else "no checkpoint had been written yet")
    raise LossNotFinite(f"{what} at step {step}: stopped; {kept}; lower --lr or raise --grad-clip and --resume")


@torch.no_grad()
def remove_without_finetuning(loaded: LoadedModel, train: TokenWindows, evaluation: TokenWindows,
                              config: RemovalConfig, calibration_batches: int = 8) -> tuple[float, list[dict]]:
    """The control with no training: measure every norm's mean scale on training batches
    with all real norms in place, freeze them all at once, and evaluate.  The model is
    left as it was."""
    wrapped = wrap_norms(loaded, momentum=None)
    try:
        with tracking(wrapped):
            for step in range(min(calibration_batches, max(1, len(train)))):
                token_loss(loaded, batch_for_step(train, step, config.seed), config.seed)
        for wrapper in wrapped.values():
            wrapper.freeze(config.shared_first_scale)
        return eval_ce(loaded, evaluation), frozen_scales(wrapped)
    finally:
        unwrap_norms(loaded, wrapped)
