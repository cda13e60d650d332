"""Peak memory of the `massive` and `sinks` captures over 16k tokens against 2k tokens.

Each (measurement, token budget) runs in a fresh process, which reports the reducer
state's peak bytes (`Capture.peak_state_bytes`) and the process's peak RSS.  The claim is
that streaming keeps memory flat in corpus length: the 16k/2k ratio of peak RSS should be
within 10% of 1 (target <= 1.10), and the reducer state should not grow at all.

    .venv/bin/python bench/outlier_memory.py [--model smollm2-135m] [--tokens 2048 16384]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 1.10
MEASUREMENTS = ("massive", "sinks")


def child(measurement: str, model: str, tokens: int) -> None:
    """Run one capture and print its figures as JSON."""
    from harness import emit, peak_rss_bytes
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
    captured = capture(loaded, windows, module.probe(options, loaded), progress=False)
    emit({"tokens": captured.n_tokens, "state_bytes": captured.peak_state_bytes, "rss_bytes": peak_rss_bytes(),
          "seconds": time.perf_counter() - started})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--child", choices=MEASUREMENTS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.tokens[0])
        return
    from harness import Section, Spread, run_child

    small, large = args.tokens
    print(f"{args.model}, stdlib corpus, windows of 128 tokens, batches of 8, hooks backend")
    section = Section("outlier_memory", "Memory of the outlier captures with corpus length",
                      f"{args.model}, stdlib corpus, windows of 128 tokens, 8 a batch, hooks backend; one fresh "
                      f"process per (measurement, length).")
    for measurement in MEASUREMENTS:
        runs = {n: run_child(__file__, measurement, "--model", args.model, "--tokens", str(n)) for n in (small, large)}
        for n, r in runs.items():
            section.row(f"{measurement} over {r['tokens']} tokens", Spread.of([r["seconds"]]),
                        peak_rss_mib=r["rss_bytes"] / 2**20, reducer_state_mib=r["state_bytes"] / 2**20)
            print(f"{measurement:8s} {r['tokens']:6d} tokens: reducer state {r['state_bytes'] / 2**20:8.3f} MiB, "
                  f"peak RSS {r['rss_bytes'] / 2**20:8.1f} MiB, capture {r['seconds']:6.1f} s")
        rss = runs[large]["rss_bytes"] / runs[small]["rss_bytes"]
        state = runs[large]["state_bytes"] / runs[small]["state_bytes"]
        section.target(f"{measurement}: peak RSS at {large} / {small} tokens", rss, TARGET)
        section.target(f"{measurement}: reducer state at {large} / {small} tokens", state, TARGET)
    section.save()


if __name__ == "__main__":
    main()
