"""Warm load time of smollm2-135m, and streaming capture against a plain HF forward.

Both sides run on the same token batches, alternating, after a warm-up; the claim is the
ratio of medians (target: warm load under 3 s, capture overhead 1.15x or less).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from layerscope.analysis.residual_stats import PROBE  # noqa: E402
from layerscope.probes.capture import capture  # noqa: E402
from layerscope.probes.corpus import CorpusSpec, token_windows  # noqa: E402
from layerscope.probes.zoo import load_model  # noqa: E402

REPEATS = 5


def warm_load_seconds() -> float:
    load_model("smollm2-135m")  # makes sure the cache exists
    code = ("import time, os; os.environ['HF_HUB_OFFLINE']='1'; t0=time.perf_counter(); "
            "from layerscope.probes.zoo import load_model; t1=time.perf_counter(); load_model('smollm2-135m'); "
            "print(t1-t0, time.perf_counter()-t1)")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            .stdout.split()[-2:] for _ in range(3)]
    imports = statistics.median(float(r[0]) for r in runs)
    print(f"import of layerscope with torch and transformers: median {imports:.2f} s")
    return statistics.median(float(r[1]) for r in runs)


def main() -> None:
    load = warm_load_seconds()
    print(f"warm load_model('smollm2-135m') from the converted cache: median {load:.2f} s over 3 fresh processes "
          f"(target < 3 s: {'pass' if load < 3 else 'miss'})")
    loaded = load_model("smollm2-135m")
    windows = token_windows(CorpusSpec("stdlib", seq_len=256, max_tokens=2048, batch_size=4),
                            loaded.tokenizer, loaded.bos_token_id, loaded.max_context)

    def plain():
        with torch.no_grad():
            for ids in windows:
                loaded.model(ids)

    def streamed():
        capture(loaded, windows, PROBE, progress=False)

    plain(), streamed()
    timings = {"plain": [], "capture": []}
    for _ in range(REPEATS):
        for name, fn in (("plain", plain), ("capture", streamed)):
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in timings.items()}
    ratio = med["capture"] / med["plain"]
    for name, values in timings.items():
        print(f"{name:8s} median {med[name]:.3f} s  (min {min(values):.3f}, max {max(values):.3f}) "
              f"over {REPEATS} alternating repeats, {windows.n_tokens} tokens")
    print(f"capture overhead (resid_pre/mid/post of all {loaded.n_layers} layers, streamed moments) "
          f"vs plain HF forward: {ratio:.3f}x (target <= 1.15: {'pass' if ratio <= 1.15 else 'miss'})")


if __name__ == "__main__":
    main()
