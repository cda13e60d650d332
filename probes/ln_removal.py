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

Training is deterministic on CPU: the batch of step *s* and the learning rate at step *s*
are functions of *s* and the seed, and checkpoints hold the model, optimizer, running
averages and history, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from layerscope.probes.corpus import CorpusSpec, TokenWindows, token_windows
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module
from layerscope.probes.interventions import FrozenNorm, swap_module
from layerscope.probes.norms import NormSite, require_norms, token_scale
from layerscope.probes.zoo import FROZEN_NORMS_FILE, LoadedModel

CHECKPOINT_FORMAT = 1
MASK_RATE = 0.15


@dataclass(frozen=True)
class RemovalConfig:
    """The fine-tuning budget and the removal schedule."""

    steps: int = field(default=300, metadata={"help": "fine-tuning steps in all (the budget)"})
    start: int = field(default=10, metadata={"help": "steps with every norm in place before the first removal"})
    gap_mlp: int = field(default=2, metadata={"help": "steps between removals of pre-MLP norms"})
    gap_attn: int = field(default=2, metadata={"help": "steps between removals of pre-attention norms"})
    gap_final: int = field(default=5, metadata={"help": "steps before the final norm (and any other norm) is removed"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    lr_warmup: int = field(default=10, metadata={"help": "steps of linear learning-rate warm-up"})
    decay: str = field(default="cosine", metadata={"help": "learning-rate decay after warm-up",
                                                   "choices": ["cosine", "constant"]})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at this fraction of --lr"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    aux_weight: float = field(default=0.0, metadata={
        "help": "weight of the auxiliary loss keeping the final residual's per-token std near its mean"})
    momentum: float = field(default=0.9, metadata={"help": "running-average momentum of each norm's scale"})
    shared_first_scale: bool = field(default=False, metadata={
        "help": "freeze one scale for every position (default: position 0, the BOS/sink token, gets its own)"})
    seed: int = field(default=0, metadata={"help": "seed of the batch order and of the masked-token draws"})

    def __post_init__(self):
        for name in ("steps", "gap_mlp", "gap_attn", "gap_final"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.start < 0 or self.lr_warmup < 0:
            raise UserError("start and lr_warmup must not be negative")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class RemovalData:
    """Disjoint train and evaluation windows cut from one corpus."""

    corpus: str = field(default="stdlib", metadata={"help": "'stdlib', a .txt or .jsonl file, or 'text:...'"})
    seq_len: int = field(default=128, metadata={"help": "tokens per window"})
    batch_size: int = field(default=8, metadata={"help": "windows per training step"})
    train_tokens: int = field(default=65536, metadata={"help": "training tokens (cycled when steps need more)"})
    eval_tokens: int = field(default=8192, metadata={"help": "evaluation tokens, after the training windows"})

    def windows(self, loaded: LoadedModel) -> tuple[TokenWindows, TokenWindows]:
        train = token_windows(CorpusSpec(self.corpus, self.seq_len, self.train_tokens, self.batch_size),
                              loaded.tokenizer, loaded.bos_token_id, loaded.max_context)
        evaluation = token_windows(CorpusSpec(self.corpus, self.seq_len, self.eval_tokens, self.batch_size),
                                   loaded.tokenizer, loaded.bos_token_id, loaded.max_context,
                                   skip_windows=train.input_ids.shape[0])
        return train, evaluation


@dataclass(frozen=True)
class RemovalEvent:
    step: int
    role: str
    path: str


# ---------------------------------------------------------------- the fake norm

class RemovableNorm(FrozenNorm):
    """A norm that is the real one until frozen, keeping a running average of its
    per-token scale meanwhile (position 0, the other positions, and all positions apart).

    Live, the output is the wrapped norm's own forward, bit for bit.  `freeze()` turns it
    into a `FrozenNorm` dividing by the averaged scale.  The wrapped module is held outside
    the module tree, so each weight appears once in parameters and state dicts.
    """

    def __init__(self, norm: torch.nn.Module, site: NormSite, momentum: float | None):
        super().__init__(norm, site.kind, 1.0, None, site.weight_offset)
        object.__setattr__(self, "real", norm)
        self.site = site
        self.eps = site.eps
        # None: a plain cumulative mean (calibration); otherwise an exponential average.
        self.momentum = momentum
        self.tracking = False
        self.register_buffer("frozen", torch.tensor(False))
        self.register_buffer("average", torch.zeros(3, dtype=torch.float64))  # first, rest, all
        self.register_buffer("updates", torch.tensor(0))

    @property
    def live(self) -> bool:
        return not bool(self.frozen)

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        if bool(self.frozen):
            return super().forward(x)
        if self.tracking:
            self._observe(x.detach())
        return self.real(x)

    @torch.no_grad()
    def _observe(self, x: Float[torch.Tensor, "batch pos d_model"]) -> None:
        s = token_scale(x.float(), self.kind, self.eps)
        rest = s[:, 1:] if s.shape[1] > 1 else s
        batch = torch.stack([s[:, 0].mean(), rest.mean(), s.mean()]).double()
        self.updates += 1
        if self.updates == 1:
            self.average.copy_(batch)
        elif self.momentum is None:
            self.average += (batch - self.average) / self.updates
        else:
            self.average.mul_(self.momentum).add_((1 - self.momentum) * batch)

    def freeze(self, shared_first_scale: bool) -> None:
        if int(self.updates) == 0:
            raise RuntimeError("a norm was frozen before its scale was measured")
        first, rest, every = self.average.tolist()
        self.scale.fill_(every if shared_first_scale else rest)
        self.first_scale.fill_(every if shared_first_scale else first)
        self.frozen.fill_(True)


def wrap_norms(loaded: LoadedModel, momentum: float | None) -> dict[str, RemovableNorm]:
    """Replace every real norm by a live `RemovableNorm` (same output); role -> wrapper."""
    wrapped = {}
    for site in require_norms(loaded):
        wrapper = RemovableNorm(get_module(loaded.model, site.path), site, momentum)
        swap_module(loaded.model, site.path, wrapper)
        wrapped[site.role] = wrapper
    return wrapped


def unwrap_norms(loaded: LoadedModel, wrapped: dict[str, RemovableNorm]) -> None:
    """Put the real norms back (they share their weights with the wrappers)."""
    for wrapper in wrapped.values():
        swap_module(loaded.model, wrapper.site.path, wrapper.real)


@contextlib.contextmanager
def tracking(wrapped: dict[str, RemovableNorm]) -> Iterator[None]:
    for wrapper in wrapped.values():
        wrapper.tracking = True
    try:
        yield
    finally:
        for wrapper in wrapped.values():
            wrapper.tracking = False


# ---------------------------------------------------------------- schedule and optimisation

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
    if loaded.adapter.causal:
        logits = loaded.model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()), ids[:, 1:].numel()
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


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # unpickling raises many types
        raise UserError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} is not an LN-removal checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def _check_resumable(state: dict, path: Path, loaded: LoadedModel, config: RemovalConfig,
                     data: dict, remove: bool) -> None:
    if state["model"] != loaded.spec.name or state["weights_hash"] != loaded.weights_hash:
        raise UserError(f"--resume: checkpoint {path} is a run for model {state['model']!r}, "
                        f"not {loaded.spec.name!r}; pass the same --model or another --checkpoint-dir")
    if state["remove"] != remove:
        raise UserError(f"--resume: checkpoint {path} is a {'removal' if state['remove'] else 'control'} run")
    changed = [k for k, v in asdict(config).items() if state["config"].get(k) != v]
    changed += [k for k, v in data.items() if state["data"].get(k) != v]
    if changed:
        raise UserError(f"--resume: settings differ from the checkpoint's ({', '.join(changed)}); "
                        "resume with the same command")


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
    model = loaded.model
    wrapped = wrap_norms(loaded, config.momentum) if remove else {}
    events = removal_schedule([w.site for w in wrapped.values()], config) if remove else []
    optimizer = make_optimizer(model, config)
    data = _data_manifest(train, evaluation)
    history: dict[str, list] = {k: [] for k in ("step", "loss", "aux", "lr", "grad_norm", "removed")}
    start, resumed_from, elapsed = 0, None, 0.0
    if checkpoint is not None and checkpoint.exists():
        if not resume:
            raise UserError(f"{checkpoint} already holds a checkpoint: continue it with --resume, "
                            "or delete it or choose another --checkpoint-dir")
        state = load_checkpoint(checkpoint)
        _check_resumable(state, checkpoint, loaded, config, data, remove)
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


def frozen_scales(wrapped: dict[str, RemovableNorm]) -> list[dict]:
    return [{"role": role, "path": w.site.path, "kind": w.kind, "scale": float(w.scale),
             "first_scale": float(w.first_scale), "weight_offset": w.weight_offset}
            for role, w in wrapped.items() if not w.live]


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


# ---------------------------------------------------------------- the norm-free model on disk

def save_norm_free(loaded: LoadedModel, target: Path, provenance: dict) -> Path:
    """Write the model as an HF directory with its real norm modules and weights, plus
    `FROZEN_NORMS_FILE` listing each frozen scale; `zoo.load_model(target)` puts the frozen
    norms back.  The folder is built beside `target` and renamed into place."""
    model = loaded.model
    frozen = {path: module for path, module in model.named_modules() if isinstance(module, FrozenNorm)}
    if not frozen:
        raise UserError("the model has no frozen norm to save")
    entries = [{"path": path, "kind": m.kind, "scale": float(m.scale), "first_scale": float(m.first_scale),
                "weight_offset": m.weight_offset} for path, m in frozen.items()]
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
    try:
        for path, module in frozen.items():
            swap_module(model, path, _real_like(module))
        try:
            model.save_pretrained(staging)
        finally:
            for path, module in frozen.items():
                swap_module(model, path, module)
        loaded.tokenizer.save_pretrained(staging)
        (staging / FROZEN_NORMS_FILE).write_text(json.dumps({"format": 1, "norms": entries, **provenance}, indent=1))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _real_like(frozen: FrozenNorm) -> torch.nn.Module:
    """The real norm module a frozen one stands in for, carrying its (trained) weights."""
    real = getattr(frozen, "real", None)
    if real is None:
        raise UserError("only norms frozen by LN removal can be saved")
    return real


def restore_frozen_norms(model: torch.nn.Module, spec_file: Path) -> None:
    """Replace the norms listed in a `FROZEN_NORMS_FILE` by `FrozenNorm`s with their scales."""
    try:
        entries = json.loads(Path(spec_file).read_text())["norms"]
        for entry in entries:
            norm = get_module(model, entry["path"])
            swap_module(model, entry["path"], FrozenNorm(norm, entry["kind"], entry["scale"], entry["first_scale"],
                                                         entry["weight_offset"]))
    except (OSError, ValueError, KeyError, AttributeError, IndexError) as err:
        raise UserError(f"{spec_file} does not describe this model's norms: {err}") from None
