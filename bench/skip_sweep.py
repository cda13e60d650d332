"""The layer-skip sweep over all blocks of smollm2-135m: prefix reuse against the naive
sweep (one full forward per skipped block), side by side in one run.

Both sweeps are checked to agree before timing; the claim is the ratio of medians over
alternating repeats after a warm-up (target 0.6 or less for 30 layers).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from layerscope.analysis.layer_skip import skip_tables  # noqa: E402
from layerscope.probes.corpus import CorpusSpec, token_windows  # noqa: E402
from layerscope.probes.replay import skip_sweep  # noqa: E402
from layerscope.probes.zoo import load_model  # noqa: E402

REPEATS = 5
TOKENS = 256


def main() -> None:
    loaded = load_model("smollm2-135m")
    windows = token_windows(CorpusSpec("stdlib", seq_len=128, max_tokens=TOKENS, batch_size=2),
                            loaded.tokenizer, loaded.bos_token_id, loaded.max_context)
    layers = list(range(loaded.n_layers))
    sweeps = {"prefix_reuse": lambda: skip_sweep(loaded, windows, layers, reuse_prefix=True),
              "naive": lambda: skip_sweep(loaded, windows, layers, reuse_prefix=False)}
    fast, naive = (skip_tables(sweep())["layer_skip"] for sweep in sweeps.values())
    numeric = fast.select_dtypes("number").columns
    np.testing.assert_allclose(fast[numeric].to_numpy(), naive[numeric].to_numpy(), rtol=1e-5, atol=1e-7)
    print(f"prefix reuse and naive sweeps agree to 1e-5 on all {len(layers)} skips")
    timings = {name: [] for name in sweeps}
    for _ in range(REPEATS):
        for name, sweep in sweeps.items():
            start = time.perf_counter()
            sweep()
            timings[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) for name, values in timings.items()}
    for name, values in timings.items():
        print(f"{name:13s} median {med[name]:.2f} s (min {min(values):.2f}, max {max(values):.2f}) "
              f"over {REPEATS} alternating repeats, {windows.n_tokens} tokens")
    ratio = med["prefix_reuse"] / med["naive"]
    print(f"skip sweep, prefix reuse / naive: {ratio:.3f} (target <= 0.6: {'pass' if ratio <= 0.6 else 'miss'})")


if __name__ == "__main__":
    main()
