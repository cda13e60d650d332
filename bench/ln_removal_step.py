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

    python bench/ln_removal_step.py [--norm-free DIR] [--repeats N] [--batch-size B] [--seq-len T]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM  # noqa: E402

from layerscope.probes.families import adapter_for  # noqa: E402
from layerscope.probes.interventions import FrozenNorm  # noqa: E402
from layerscope.probes.ln_removal import RemovalConfig, RemovalData, batch_for_step, make_optimizer, token_loss  # noqa: E402
from layerscope.probes.norms import is_real_norm  # noqa: E402
from layerscope.probes.zoo import LoadedModel, load_model  # noqa: E402

DEFAULT_DIR = Path("runs/ln-removal/smollm2-135m-norm-free")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm-free", type=Path, default=DEFAULT_DIR, help="a directory saved by ln-removal")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    if not args.norm_free.is_dir():
        raise SystemExit(f"{args.norm_free} does not exist: run `layerscope ln-removal` first or pass --norm-free")
    fake = load_model(str(args.norm_free))
    hf = AutoModelForCausalLM.from_pretrained(args.norm_free, dtype=torch.float32).eval()
    real = LoadedModel(fake.spec, hf, fake.tokenizer, adapter_for(hf), source="same weights, real norms")
    n_frozen = sum(isinstance(m, FrozenNorm) for m in fake.model.modules())
    assert n_frozen and not any(is_real_norm(m) for m in fake.model.modules())
    assert sum(is_real_norm(m) for m in real.model.modules()) == n_frozen
    config = RemovalConfig()
    data = RemovalData(seq_len=args.seq_len, batch_size=args.batch_size,
                       train_tokens=args.seq_len * args.batch_size * (args.repeats + 1), eval_tokens=args.seq_len)
    train, _ = data.windows(real)
    models = {"real norms": real, "frozen norms": fake}
    optimizers = {name: make_optimizer(loaded.model, config) for name, loaded in models.items()}
    saved = {name: {k: v.clone() for k, v in loaded.model.state_dict().items()} for name, loaded in models.items()}

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
        step(name, 0)
    timings = {name: [] for name in models}
    for index in range(1, args.repeats + 1):
        for name in models:
            timings[name].append(step(name, index))
    med = {name: statistics.median(values) for name, values in timings.items()}
    tokens = args.batch_size * args.seq_len
    for name, values in timings.items():
        print(f"{name:12s} median {med[name]:.3f} s  (min {min(values):.3f}, max {max(values):.3f}) over "
              f"{args.repeats} alternating steps of {tokens} tokens, {torch.get_num_threads()} threads")
    ratio = med["frozen norms"] / med["real norms"]
    print(f"{args.norm_free}: fine-tuning step with all {n_frozen} norms frozen vs real norms: {ratio:.3f}x "
          f"(target <= 1.1: {'pass' if ratio <= 1.1 else 'miss'})")


if __name__ == "__main__":
    main()
