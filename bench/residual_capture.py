"""Residual capture of every layer of smollm2-135m over 8k tokens of the default corpus:
layerscope's streaming residual-stats against TransformerLens `run_with_cache` (with a
`names_filter` for the same residual points, and caching every hook), nnsight saving
every layer's output, a plain HF forward with `output_hidden_states`, and the base model's
forward without the unembedding (the least any capture of the residual stream must run);
then residual-stats at 2k, 8k and 32k tokens.

Each method runs in its own fresh process, which loads the model and warms up on two
windows once, then times one pass over the corpus whenever asked; the methods take turns,
round after round, and each process reports its peak RSS at the end.
Peers time only their library calls; layerscope's time includes its statistics.  Each
peer's residual statistics must match layerscope's to 1e-4 relative before any timing
counts.  Targets: layerscope at most 0.85x the HF forward in time, at most 1.06x the base
model's forward (the capture's overhead above that limit), and at most 0.5x
`run_with_cache` without a filter in peak RSS; peak RSS at 32k tokens within 15% of 2k.

    .venv/bin/python bench/residual_capture.py [--repeats 5] [--tokens 8192]
"""

from __future__ import annotations

import time

from harness import (BATCH_SIZE, MODEL, SEQ_LEN, Section, Spread, Worker, case_parser, check_agreement,
                     corpus_windows, serve)

METHODS = ("layerscope", "transformer_lens_filtered", "transformer_lens_all", "nnsight", "hf_hidden_states",
           "hf_base_model")
LABELS = {
    "layerscope": "layerscope residual-stats (streamed, resid_pre/mid/post)",
    "transformer_lens_filtered": "TransformerLens run_with_cache, names_filter for resid_pre/mid/post",
    "transformer_lens_all": "TransformerLens run_with_cache, no filter",
    "nnsight": "nnsight trace saving every layer's output",
    "hf_hidden_states": "plain HF forward, output_hidden_states",
    "hf_base_model": "HF base model without the unembedding, output_hidden_states (the limit)",
}
SCALING_TOKENS = (2048, 8192, 32768)
STATS = ("mean_norm", "variance", "max_abs")


def worker(method: str, tokens: int) -> None:
    """Load, warm up on two windows, then time one pass over `tokens` tokens per request."""
    import torch

    from layerscope.probes.zoo import load_model

    loaded = load_model(MODEL)
    windows = corpus_windows(loaded, tokens)
    warm_up = windows.head(SEQ_LEN * 2)
    if method == "layerscope":
        from layerscope.analysis import residual_stats
        from layerscope.analysis.metric import NoOptions

        def measure(batches):
            started = time.perf_counter()
            table = residual_stats.METRIC(loaded, batches, NoOptions())["residual_stats"]
            values = {f"{row.point}.{row.layer}.{stat}": float(getattr(row, stat))
                      for row in table.itertuples() for stat in STATS}
            return time.perf_counter() - started, values
    elif method.startswith("transformer_lens"):
        from transformer_lens.model_bridge import TransformerBridge

        from peers import transformer_lens_residuals

        bridge = TransformerBridge.boot_transformers(loaded.config._name_or_path or MODEL, hf_model=loaded.model,
                                                     tokenizer=loaded.tokenizer)
        filtered = method.endswith("filtered")

        def measure(batches):
            return transformer_lens_residuals(bridge, batches, loaded.n_layers, filtered)
    elif method == "nnsight":
        from nnsight.modeling.transformers import TransformersModel

        from peers import nnsight_layer_outputs

        envoy = TransformersModel(loaded.model, tokenizer=loaded.tokenizer, task="text-generation")

        def measure(batches):
            return nnsight_layer_outputs(envoy, batches)
    elif method == "hf_base_model":
        from peers import hf_base_model

        def measure(batches):
            return hf_base_model(loaded.model, batches)
    else:
        from peers import hf_hidden_states

        def measure(batches):
            return hf_hidden_states(loaded.model, batches)

    measure(warm_up)

    def job() -> dict:
        seconds, values = measure(windows)
        return {"tokens": windows.n_tokens, "seconds": seconds, "threads": torch.get_num_threads(), "values": values}

    serve(job)


def main() -> None:
    parser = case_parser(__doc__, tokens=8192)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "TOKENS"))
    parser.add_argument("--methods", nargs="+", choices=METHODS[1:], default=METHODS[1:],
                        help="the peers to run beside layerscope (default: all)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 2k and 32k token runs")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return

    def report(method: str, result: dict) -> dict:
        print(f"  {method:26s} {result['tokens']:6d} tokens {result['seconds']:7.2f} s", flush=True)
        return result

    def once(single: Worker, method: str) -> dict:
        result = report(method, single.run())
        return result | single.close()

    methods = ("layerscope", *dict.fromkeys(args.methods))
    scaling_lengths = () if args.no_scaling else (SCALING_TOKENS[0], SCALING_TOKENS[-1])
    # Every process sets up side by side; nothing is timed until all are ready.
    ends = {tokens: Worker(__file__, "layerscope", str(tokens)) for tokens in scaling_lengths}
    workers = {method: Worker(__file__, method, str(args.tokens)) for method in methods}
    for process in [*ends.values(), *workers.values()]:
        process.wait_ready()
    smallest = once(ends[SCALING_TOKENS[0]], "layerscope") if ends else None
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method, process in workers.items():
            runs[method].append(report(method, process.run()))
    peak_rss = {method: process.close()["rss_bytes"] / 2**20 for method, process in workers.items()}
    for method in methods:
        print(f"  {method:26s} peak RSS {peak_rss[method]:7.0f} MiB", flush=True)
    largest = once(ends[SCALING_TOKENS[-1]], "layerscope") if ends else None

    section = Section("residual_capture", f"Residual capture of all layers over {args.tokens // 1024}k tokens",
                      f"{MODEL}, stdlib corpus, windows of {SEQ_LEN} tokens, {BATCH_SIZE} a batch; one fresh process "
                      f"per method (load and a warm-up on two windows once), {args.repeats} rounds with the methods "
                      f"taking turns; peak RSS of each process over its passes.")
    ours = runs["layerscope"][0]["values"]
    for method in methods[1:]:
        label = f"{LABELS[method]}: residual mean norm, variance and max|x| per layer vs layerscope"
        lines = [check_agreement(label, ours, result["values"]) for result in runs[method]]
        section.agreement.append(lines[0])
    seconds = {m: Spread.of([r["seconds"] for r in rs]) for m, rs in runs.items()}
    for method in methods:
        section.row(LABELS[method], seconds[method], peak_rss_mib=peak_rss[method],
                    time_vs_layerscope=seconds[method].median / seconds["layerscope"].median)
    if "hf_hidden_states" in seconds:
        section.target("layerscope time / plain HF forward with output_hidden_states",
                       seconds["layerscope"].median / seconds["hf_hidden_states"].median, 0.85)
    if "hf_base_model" in seconds:
        section.target("layerscope time / HF base model without the unembedding (overhead above the limit)",
                       seconds["layerscope"].median / seconds["hf_base_model"].median, 1.06)
    if {"hf_base_model", "hf_hidden_states"} <= seconds.keys():
        section.notes.append("the limit: HF base model without the unembedding / plain HF forward = "
                             f"{seconds['hf_base_model'].median / seconds['hf_hidden_states'].median:.3f}x")
    if "transformer_lens_all" in peak_rss:
        section.target("layerscope peak RSS / TransformerLens run_with_cache without a filter",
                       peak_rss["layerscope"] / peak_rss["transformer_lens_all"], 0.5)
    section.save()
    if not ends:
        return

    scaling = Section("scaling", "Scaling of residual-stats with corpus length",
                      f"{MODEL}, stdlib corpus, layerscope residual-stats, one fresh process per length "
                      f"({args.tokens} tokens: the rounds above).")
    by_length = {SCALING_TOKENS[0]: (Spread.of([smallest["seconds"]]), smallest["rss_bytes"] / 2**20),
                 args.tokens: (seconds["layerscope"], peak_rss["layerscope"]),
                 SCALING_TOKENS[-1]: (Spread.of([largest["seconds"]]), largest["rss_bytes"] / 2**20)}
    base_seconds, base_rss = by_length[SCALING_TOKENS[0]]
    for tokens, (secs, rss_mib) in sorted(by_length.items()):
        scaling.row(f"{tokens} tokens", secs, peak_rss_mib=rss_mib, seconds_per_1k_tokens=secs.median / tokens * 1024,
                    time_vs_smallest=secs.median / base_seconds.median, rss_vs_smallest=rss_mib / base_rss)
    scaling.target(f"peak RSS at {SCALING_TOKENS[-1]} tokens / at {SCALING_TOKENS[0]} tokens",
                   largest["rss_bytes"] / smallest["rss_bytes"], 1.15)
    scaling.notes.append(f"time per 1k tokens: {smallest['seconds'] / smallest['tokens'] * 1024:.2f} s at "
                         f"{smallest['tokens']} tokens, {largest['seconds'] / largest['tokens'] * 1024:.2f} s at "
                         f"{largest['tokens']} (linear growth keeps it level)")
    scaling.save()


if __name__ == "__main__":
    main()
