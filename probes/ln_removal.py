"""LayerNorm removal by fine-tuning (Heimersheim 2024, "You can remove GPT2's LayerNorm by
fine-tuning"; Baroni et al. 2025, "Transformers Don't Need LayerNorm at Inference Time").

Every norm is wrapped in a `RemovableNorm`.  While live it is the real norm and keeps a
running average of the per-token scale it divides by; when the schedule reaches it, it
freezes that average and from then on divides by a constant (`FrozenNorm`).  The schedule
freezes the pre-MLP norms one by one, then the pre-attention norms, then the final norm
(then any other norm, such as BERT's embedding LayerNorm), while the model is fine-tuned
on next-token (or, for encoders, masked-token) cross-entropy.  The result has no norm
that divides by a data-dependent scale, so every path to the logits is linear in the
final residual stream and direct logit attribution is exact.

The experiment is one call from a notebook::

    from layerscope.probes.ln_removal import RemovalData, RemovalOptions, remove_norms
    from layerscope.probes.zoo import load_model

    loaded = load_model("tiny-llama")
    train, evaluation = RemovalData(seq_len=64).windows(loaded)
    result = remove_norms(loaded, train, evaluation, RemovalOptions())
    result.loss, result.norm_free_model, result.eval_before, result.eval_after

The pieces live by concern: the options in `ln_options`, the fake norm in `norms`, the
schedule in `ln_schedule`, the training loop in `ln_train`, and checkpoints, the saved
model and the folders they go to in `ln_checkpoints`.  This module runs them in order and
re-exports them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from layerscope.probes.corpus import TokenWindows
from layerscope.probes.ln_checkpoints import (CHECKPOINT_FORMAT, CONTROL_CHECKPOINT, REMOVAL_CHECKPOINT,  # noqa: F401
                                              RemovalPaths, default_folder, load_checkpoint, plan_paths,
                                              restore_frozen_norms, save_checkpoint, save_norm_free)
from layerscope.probes.ln_options import RemovalConfig, RemovalData, RemovalOptions
from layerscope.probes.ln_schedule import (RemovalEvent, batch_for_step, learning_rate,  # noqa: F401
                                           removal_schedule)
from layerscope.probes.ln_train import (MASK_RATE, FineTuneResult, LossNotFinite, aux_std_loss,  # noqa: F401
                                        eval_ce, fine_tune, make_optimizer, remove_without_finetuning,
                                        token_loss)
from layerscope.probes.norm_sweep import sensitivity_order
from layerscope.probes.norms import (RemovableNorm, frozen_scales, require_norms, tracking,  # noqa: F401
                                     unwrap_norms, value_split_roles, wrap_norms)
from layerscope.probes.zoo import LoadedModel

__all__ = ["RemovalData", "RemovalOptions", "RemovalResult", "remove_norms", "RemovalConfig", "RemovalEvent",
           "FineTuneResult", "LossNotFinite", "RemovableNorm", "fine_tune", "remove_without_finetuning",
           "removal_schedule", "save_norm_free", "load_checkpoint", "restore_frozen_norms", "plan_paths"]


@dataclass(frozen=True, eq=False)
class RemovalResult:
    """What `remove_norms` produced.

    - `loss`: one row per (run, step): run ("ln-removal" or "vanilla"), step, loss, aux,
      lr, grad_norm, removed (norms frozen so far).
    - `norm_free_model`: the saved model folder; `zoo.load_model(str(path))` loads it.
    - `ranking`: with the sensitivity order, each block norm's KL to the original when
      frozen alone, least sensitive first (the removal order).
    - `eval_before` / `eval_after`: held-out cross-entropy of the original and the
      norm-free model; `eval_vanilla` of the same-length fine-tune with every norm kept;
      `eval_no_finetune` with every norm frozen at once and no training (None without
      the controls).
    """

    loss: pd.DataFrame
    norm_free_model: Path
    checkpoint_dir: Path
    eval_before: float
    eval_after: float
    eval_vanilla: float | None
    eval_no_finetune: float | None
    removal: FineTuneResult
    control: FineTuneResult | None
    base_model: dict  # the original's card and weights hash
    options: RemovalOptions
    seconds: float
    ranking: list[tuple[str, float]] | None = None  # (role, KL frozen alone), least sensitive first


def _working_copy(loaded: LoadedModel) -> LoadedModel:
    """A copy whose weights training may change: the caller's model is never mutated."""
    loaded.weights_hash  # computed once on the original and carried by the shallow copy
    work = copy.copy(loaded)
    work.model = copy.deepcopy(loaded.model)
    return work


def remove_norms(loaded: LoadedModel, train: TokenWindows, evaluation: TokenWindows,
                 options: RemovalOptions = RemovalOptions(), *, progress: bool = False) -> RemovalResult:
    """Remove every norm of `loaded` by fine-tuning on `train`, evaluate on `evaluation`,
    and save the norm-free model; with `options.control`, also evaluate every norm frozen
    with no training and a vanilla fine-tune of the same length.

    `loaded` is left as it was: each run trains a copy.  Folders and the schedule are
    checked before any training; checkpoints are written every `options.checkpoint_every`
    steps, and `options.resume` continues a stopped run bit for bit.
    """
    started = time.perf_counter()
    config = options.config
    paths = options.paths(loaded.spec.name)
    sites = require_norms(loaded)
    # A bad schedule fails before any work.
    removal_schedule(sites, config, split=value_split_roles(loaded, sites) if config.split_value else frozenset())
    base = {**loaded.card(), "weights_hash": loaded.weights_hash}
    ranking = (sensitivity_order(loaded, train.head(config.sensitivity_tokens), sites)
               if config.order == "sensitivity" else None)

    work = _working_copy(loaded)
    # The original, which training never touches, is the distillation teacher.
    removal = fine_tune(work, train, evaluation, config, remove=True, checkpoint=paths.removal,
                        checkpoint_every=options.checkpoint_every, resume=options.resume, progress=progress,
                        teacher=loaded.model, order=[role for role, _ in ranking] if ranking else None)
    if progress:
        tqdm.write(f"norm-free held-out CE {removal.eval_after:.4f} (original {removal.eval_before:.4f}) after "
                   f"{removal.seconds:.0f} s; saving the model to {paths.output}")
    save_norm_free(work, paths.output, {"base_model": loaded.spec.name, "base_weights_hash": loaded.weights_hash,
                                        "config": asdict(config),
                                        "data": {"train": train.manifest(), "eval": evaluation.manifest()}})
    del work
    control = no_finetune = None
    if options.control:
        work = _working_copy(loaded)
        no_finetune, _ = remove_without_finetuning(work, train, evaluation, config)
        control = fine_tune(work, train, evaluation, config, remove=False, checkpoint=paths.control,
                            checkpoint_every=options.checkpoint_every, resume=options.resume,
                            eval_before=removal.eval_before, progress=progress)
        del work
    loss = pd.concat([removal.loss_table()] + ([control.loss_table()] if control else []), ignore_index=True)
    return RemovalResult(loss, paths.output, paths.checkpoint_dir, removal.eval_before, removal.eval_after,
                         control.eval_after if control else None, no_finetune, removal, control, base, options,
                         time.perf_counter() - started, ranking)
