"""One LN-removal fine-tuning step (forward, backward, clip, AdamW) with every norm frozen
against the same step with the real norms.

Both sides start from the weights of a norm-free model written by `layerscope ln-removal`:
one loads it through the zoo (frozen norms), the other loads the same directory with plain
transformers (real norms).  Starting from norm-free weights keeps both sides' activations
finite; freezing the norms of the original model at once overflows float32 on SmolLM2,
and timing NaN arithmetic would say nothing.  For the same reason every timed step starts
from the saved weights again (restored outside the timing), so a step that diverges cannot
poison the next.  The two copies train on the same batches, alternating, after a warm-up;
the claim is the ratio of the medians (target: 1.1 or less).

Without a norm-free model on disk (a fresh clone has none: `layerscope ln-removal` takes
tens of minutes), the step runs on a stand-in: smollm2-135m with every norm frozen, in the
order the forward pass reaches them, at the mean scale it sees once the norms before it
are frozen, without fine-tuning.  Its step costs what a fine-tuned one's does (the same
shapes and operations).  Either way the timed steps use the first training batches on
which both copies' losses are finite.

    python bench/ln_removal_step.py [--norm-free DIR] [--repeats N] [--batch-size B] [--seq-len T]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from harness import REPEATS, Section, Spread  # noqa: E402
from layerscope.probes.families import adapter_for  # noqa: E402
from layerscope.probes.interventions import FrozenNorm  # noqa: E402
from layerscope.probes.ln_removal import (RemovalConfig, RemovalData, batch_for_step, frozen_scales,  # noqa: E402
                                          make_optimizer, token_loss, tracking, unwrap_norms, wrap_norms)
from layerscope.probes.norms import is_real_norm  # noqa: E402
from layerscope.probes.zoo import FROZEN_NORMS_FILE, LoadedModel, load_model  # noqa: E402

MODEL = "smollm2-135m"
DEFAULT_DIR = Path(f"ln-removal/{MODEL}-norm-free")
CANDIDATE_BATCHES = 24


def calibrated_stand_in(target: Path, seq_len: int) -> Path:
    """smollm2-135m saved as a norm-free model without fine-tuning: each norm is frozen at
    its mean scale over one batch once the norms before it are."""
    stand_in = load_model(MODEL)
    model = stand_in.model
    batch = RemovalData(seq_len=seq_len, batch_size=1, train_tokens=seq_len).windows(stand_in)[0].input_ids
    wrapped = wrap_norms(stand_in, momentum=None)
    reached = []
    hooks = [w.register_forward_pre_hook(lambda module, args: reached.append(module)) for w in wrapped.values()]
    with torch.no_grad():
        model(batch)
    for handle in hooks:
        handle.remove()
    for wrapper in dict.fromkeys(reached):
        with torch.no_grad(), tracking({wrapper.site.role: wrapper}):
            model(batch)
        wrapper.freeze(shared_first_scale=False)
    scales = frozen_scales(wrapped)
    unwrap_norms(stand_in, wrapped)
    model.save_pretrained(target)
    stand_in.tokenizer.save_pretrained(target)
    (target / FROZEN_NORMS_FILE).write_text(json.dumps({"format": 1, "norms": scales}))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm-free", type=Path, help=f"a directory saved by ln-removal (default {DEFAULT_DIR} "
                        "when it exists, else a random-weights stand-in)")
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    if args.norm_free is not None and not args.norm_free.is_dir():
        raise SystemExit(f"{args.norm_free} does not exist: run `layerscope ln-removal` first")
    if args.norm_free is None and DEFAULT_DIR.is_dir():
        args.norm_free = DEFAULT_DIR
    stand_in_dir = None
    weights = f"trained by `layerscope ln-removal` ({args.norm_free})"
    if args.norm_free is None:
        stand_in_dir = args.norm_free = calibrated_stand_in(
            Path(tempfile.mkdtemp(prefix="layerscope-bench-norm-free-")), args.seq_len)
        weights = "with norms frozen one by one without fine-tuning (no norm-free model on disk)"
    fake = load_model(str(args.norm_free))
    hf = AutoModelForCausalLM.from_pretrained(args.norm_free, dtype=torch.float32).eval()
    real = LoadedModel(fake.spec, hf, fake.tokenizer, adapter_for(hf), source="same weights, real norms")
    n_frozen = sum(isinstance(m, FrozenNorm) for m in fake.model.modules())
    assert n_frozen and not any(is_real_norm(m) for m in fake.model.modules())
    assert sum(is_real_norm(m) for m in real.model.modules()) == n_frozen
    config = RemovalConfig()
    data = RemovalData(seq_len=args.seq_len, batch_size=args.batch_size,
                       train_tokens=args.seq_len * args.batch_size * CANDIDATE_BATCHES, eval_tokens=args.seq_len)
    train, _ = data.windows(real)
    models = {"real norms": real, "frozen norms": fake}
    optimizers = {name: make_optimizer(loaded.model, config) for name, loaded in models.items()}
    saved = {name: {k: v.clone() for k, v in loaded.model.state_dict().items()} for name, loaded in models.items()}

    def finite_loss(name: str, index: int) -> bool:
        with torch.no_grad():
            return bool(torch.isfinite(token_loss(models[name], batch_for_step(train, index, 0), index)[0]))

    usable = []
    for index in range(CANDIDATE_BATCHES):
        if len(usable) == args.repeats + 1:
            break
        if all(finite_loss(name, index) for name in models):
            usable.append(index)
    if len(usable) < args.repeats + 1:
        raise SystemExit(f"only {len(usable)} of {CANDIDATE_BATCHES} batches give finite losses with frozen norms")

    def step(name: str, index: int) -> float:
        loaded, optimizer = models[name], optimizers[name]
        loaded.model.load_state_dict(saved[name])
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = token_loss(loaded, batch_for_step(train, index, 0), index)
        if not torch.isfinite(loss):
            raise SystemExit(f"{name}: the loss is {loss.item()}, so the timing would measure NaN arithmetic")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(loaded.model.parameters(), config.grad_clip)
        optimizer.step()
        return time.perf_counter() - start

    for name in models:
        step(name, usable[0])
    timings = {name: [] for name in models}
    for index in usable[1:]:
        for name in models:
            timings[name].append(step(name, index))
    seconds = {name: Spread.of(values) for name, values in timings.items()}
    tokens = args.batch_size * args.seq_len
    section = Section("ln_removal_step", "One LN-removal fine-tuning step",
                      f"{MODEL} weights {weights}; forward, backward, clipping and AdamW on {tokens} tokens "
                      f"({args.batch_size} windows of {args.seq_len}); a warm-up step, then {args.repeats} steps "
                      f"taking turns, each from the saved weights.")
    for name in models:
        section.row(f"step with {name}" + (f" (all {n_frozen} frozen)" if name == "frozen norms" else ""),
                    seconds[name])
    section.target("step with every norm frozen / with real norms",
                   seconds["frozen norms"].median / seconds["real norms"].median, 1.1)
    section.save()
    if stand_in_dir is not None:
        shutil.rmtree(stand_in_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
