"""The typed options of LN removal: the budget and schedule (`RemovalConfig`), the data
(`RemovalData`) and one experiment (`RemovalOptions`).  Frozen dataclasses whose field
metadata become the CLI's flags; importing this module does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from layerscope.probes.errors import UserError

if TYPE_CHECKING:
    from layerscope.probes.corpus import TokenWindows
    from layerscope.probes.ln_checkpoints import RemovalPaths
    from layerscope.probes.zoo import LoadedModel


@dataclass(frozen=True)
class RemovalConfig:
    """The fine-tuning budget and the removal schedule."""

    steps: int = field(default=300, metadata={"help": "fine-tuning steps in all (the budget)"})
    start: int = field(default=10, metadata={"help": "steps with every norm in place before the first removal"})
    gap_mlp: int = field(default=2, metadata={"help": "steps between removals of pre-MLP norms"})
    gap_attn: int = field(default=2, metadata={"help": "steps between removals of pre-attention norms"})
    gap_v: int = field(default=3, metadata={"help": "steps between removals of pre-attention norms' value paths"})
    gap_final: int = field(default=5, metadata={
        "help": "steps before the final norm (and any other norm) is removed, and before position 0's scale is fixed"})
    split_value: bool = field(default=True, metadata={
        "help": "remove each pre-attention norm in two steps, query/key path then value path (Baroni et al.), "
                "where the family has a separate value projection"})
    order: str = field(default="fixed", metadata={
        "help": "removal order: fixed (pre-MLP, pre-attention, final) or sensitivity (block norms least "
                "sensitive first, by their KL when frozen alone)", "choices": ["fixed", "sensitivity"]})
    sensitivity_tokens: int = field(default=1024, metadata={
        "help": "training tokens the sensitivity order is measured on", "min": 2, "max": 1_000_000})
    loss: str = field(default="auto", metadata={
        "help": "distill: KL to the original model's next-token distribution; ce: cross-entropy; auto: distill "
                "when the original fits in memory beside the student", "choices": ["auto", "distill", "ce"]})
    ce_weight: float = field(default=1.0, metadata={
        "help": "with --loss distill, add this times the cross-entropy (0: the KL alone)"})
    curve_tokens: int = field(default=1024, metadata={
        "help": "held-out tokens (the first evaluation windows) evaluated before and after each removal "
                "(0: no per-removal curve)", "min": 0, "max": 1_000_000})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    lr_warmup: int = field(default=10, metadata={"help": "steps of linear learning-rate warm-up"})
    decay: str = field(default="cosine", metadata={"help": "learning-rate decay after warm-up",
                                                   "choices": ["cosine", "constant"]})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at this fraction of --lr"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    aux_weight: float = field(default=0.0, metadata={
        "help": "weight of the auxiliary loss keeping the final residual's per-token std near its mean"})
    guard_weight: float = field(default=0.0, metadata={
        "help": "weight of the loss keeping every token after the sink positions within --guard-ratio times "
                "each norm's average scale: a token far above it (a new massive activation) overflows once "
                "that norm is frozen (0: off)"})
    guard_ratio: float = field(default=10.0, metadata={
        "help": "how far above a norm's average scale a token may go before --guard-weight penalises it"})
    momentum: float = field(default=0.9, metadata={"help": "running-average momentum of each norm's scale"})
    shared_first_scale: bool = field(default=False, metadata={
        "help": "freeze one scale for every position (default: position 0, the BOS/sink token, gets its own)"})
    sink_positions: int = field(default=1, metadata={
        "help": "leading positions that share position 0's own frozen scale: 2 also treats the token "
                "after BOS as a sink, for models that sometimes put a massive activation there "
                "(SmolLM2 does)", "min": 1, "max": 64})
    max_skipped: int = field(default=0, metadata={
        "help": "skip a batch whose loss or gradient is not finite, with no optimizer step, up to this many "
                "times in the run (as PaLM skipped the batches of its loss spikes); 0: stop at the first",
        "min": 0, "max": 1000})
    seed: int = field(default=0, metadata={"help": "seed of the batch order and of the masked-token draws"})

    def __post_init__(self):
        if not 1 <= self.sink_positions <= 64:
            raise UserError(f"sink_positions must be in 1..64, got {self.sink_positions}")
        if not 0 <= self.max_skipped <= 1000:
            raise UserError(f"max_skipped must be in 0..1000, got {self.max_skipped}")
        for name in ("steps", "gap_mlp", "gap_attn", "gap_v", "gap_final"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.start < 0 or self.lr_warmup < 0:
            raise UserError("start and lr_warmup must not be negative")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "aux_weight", "momentum", "ce_weight",
                     "guard_weight", "guard_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            # Below 0 the cosine decay would drive the learning rate negative.
            raise UserError(f"min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if not self.guard_ratio > 1:
            raise UserError(f"guard_ratio must be above 1, got {self.guard_ratio}")
        for name in ("weight_decay", "grad_clip", "aux_weight", "ce_weight", "guard_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}")
        for name, choices in (("order", ("fixed", "sensitivity")), ("loss", ("auto", "distill", "ce"))):
            if getattr(self, name) not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not 2 <= self.sensitivity_tokens <= 1_000_000 or not 0 <= self.curve_tokens <= 1_000_000:
            raise UserError("sensitivity_tokens must be in 2..1000000 and curve_tokens in 0..1000000")
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
    separator: str = field(default="eos", metadata={
        "help": "what joins documents in a window: eos, or blank-line, which keeps a second document start "
                "(a token the model may make a second attention sink) out of the windows",
        "choices": ["eos", "blank-line"]})  # corpus.DOCUMENT_SEPARATORS, named here without importing torch

    def __post_init__(self):
        # Checked here, before any model loads, rather than when the windows are cut.
        for name, least in (("seq_len", 2), ("batch_size", 1), ("train_tokens", 1), ("eval_tokens", 1)):
            if getattr(self, name) < least:
                raise UserError(f"{name} must be at least {least}, got {getattr(self, name)}")

    def windows(self, loaded: LoadedModel) -> tuple[TokenWindows, TokenWindows]:
        from layerscope.probes.corpus import CorpusSpec, token_windows

        train = token_windows(CorpusSpec(self.corpus, self.seq_len, self.train_tokens, self.batch_size),
                              loaded.tokenizer, loaded.bos_token_id, loaded.max_context, separator=self.separator)
        evaluation = token_windows(CorpusSpec(self.corpus, self.seq_len, self.eval_tokens, self.batch_size),
                                   loaded.tokenizer, loaded.bos_token_id, loaded.max_context,
                                   skip_windows=train.input_ids.shape[0], separator=self.separator)
        return train, evaluation


@dataclass(frozen=True)
class RemovalOptions:
    """One LN-removal experiment: the schedule and budget, where its files go, and whether
    to run the controls.

    `checkpoint_dir` and `output` default to `ln-removal/<model>/` and
    `ln-removal/<model>-norm-free/` beside `runs_dir`; neither may lie inside `runs_dir`.
    """

    config: RemovalConfig = field(default_factory=RemovalConfig)
    runs_dir: Path = Path("runs")
    checkpoint_dir: Path | None = None
    output: Path | None = None
    checkpoint_every: int = 50
    resume: bool = False
    control: bool = True

    def __post_init__(self):
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")

    def paths(self, model_name: str) -> RemovalPaths:
        """The checkpoint and model folders, checked (see `ln_checkpoints.plan_paths`)."""
        from layerscope.probes.ln_checkpoints import plan_paths

        return plan_paths(self.runs_dir, model_name, self.checkpoint_dir, self.output, self.resume)
