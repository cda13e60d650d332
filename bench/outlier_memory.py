"""Peak memory of the `massive` and `sinks` captures over 16k tokens against 2k tokens.

Each (measurement, token budget) runs in a fresh process, which reports the reducer
state's peak bytes (`Capture.peak_state_bytes`) and the process's peak RSS.  The claim is
that streaming keeps memory flat in corpus length: the 16k/2k ratio of peak RSS should be
within 10% of 1 (target <= 1.10), and the reducer state should not grow at all.

    .venv/bin/python bench/outlier_memory.py [--model smollm2-135m] [--tokens 2048 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 1.10
MEASUREMENTS = ("massive", "sinks")


def child(measurement: str, model: str, tokens: int) -> None:
    """Run one capture and print its figures as JSON."""
    from layerscope.analysis import massive, sinks
    from layerscope.probes.capture import capture
    from layerscope.probes.corpus import CorpusSpec, token_windows
    from layerscope.probes.zoo import load_model

    module = {"massive": massive, "sinks": sinks}[measurement]
    options = {"massive": massive.MassiveOptions, "sinks": sinks.SinkOptions}[measurement]()
    # Attention patterns need eager attention; load it that way so both budgets run alike.
    loaded = load_model(model, attn_implementation="eager" if measurement == "sinks" else None)
    windows = token_windows(CorpusSpec("stdlib", seq_len=128, max_tokens=tokens, batch_size=8), loaded.tokenizer,
                            loaded.bos_token_id, loaded.max_context)
    started = time.perf_counter()
    captured = capture(loaded, windows, module.probe(options), progress=False)
    print(json.dumps({"tokens": captured.n_tokens, "state_bytes": captured.peak_state_bytes,
                      "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": time.perf_counter() - started}))


def measure(measurement: str, model: str, tokens: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", measurement, "--model", model, "--tokens", str(tokens)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--child", choices=MEASUREMENTS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.tokens[0])
        return
    small, large = args.tokens
    print(f"{args.model}, stdlib corpus, windows of 128 tokens, batches of 8, hooks backend")
    for measurement in MEASUREMENTS:
        runs = {n: measure(measurement, args.model, n) for n in (small, large)}
        for n, r in runs.items():
            print(f"{measurement:8s} {r['tokens']:6d} tokens: reducer state {r['state_bytes'] / 2**20:8.3f} MiB, "
                  f"peak RSS {r['rss_bytes'] / 2**20:8.1f} MiB, capture {r['seconds']:6.1f} s")
        rss = runs[large]["rss_bytes"] / runs[small]["rss_bytes"]
        state = runs[large]["state_bytes"] / runs[small]["state_bytes"]
        verdict = "pass" if rss <= TARGET and state <= TARGET else "miss"
        print(f"{measurement:8s} {large}/{small} tokens: peak RSS x{rss:.3f}, reducer state x{state:.3f} "
              f"(target <= {TARGET:.2f}: {verdict})")


if __name__ == "__main__":
    main()
