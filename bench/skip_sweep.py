"""The layer-skip sweep over all 30 blocks of smollm2-135m: layerscope's sweep, which
reuses the clean pass's prefix, against the naive loop of one nnsight trace per layer with
that layer `.skip()`ped, in one process, taking turns after a warm-up.

Both compute per skipped layer the cross-entropy, KL from the clean model, top-1
agreement, the change of the final residual and each later block's change of
contribution; every value must match to 1e-4 relative before the timing counts.
Target: layerscope at most 0.55x the naive loop's time.

    .venv/bin/python bench/skip_sweep.py [--repeats 5] [--tokens 128]
"""

from __future__ import annotations

import copy

from harness import MODEL, Section, Spread, alternate, case_parser, check_agreement, corpus_windows

TABLE_COLUMNS = ("ce_skipped", "kl", "top1_agreement", "final_change")
NOTE = ("Counting arithmetic alone, reusing the clean prefix brings the sweep to (L(L+1)/2 + L·U) / (L² + L·U) "
        "= 0.615 of the naive loop, where U, the 49,152 x 576 unembedding, costs about 7.7 blocks; with a free "
        "unembedding the bound would be 0.52. The clean pass stops after the last block, and each batch's variants "
        "are unembedded together over chunks of positions, the log-softmax, cross-entropy, KL and top-1 taken from "
        "each chunk while it is small; the unembedding's multiply is exact and no cheaper, so the ratio stays near "
        "the counting bound.")


def main() -> None:
    args = case_parser(__doc__, tokens=128).parse_args()

    from nnsight.modeling.transformers import TransformersModel

    from layerscope.analysis.layer_skip import skip_tables
    from layerscope.probes.replay import skip_sweep
    from layerscope.probes.zoo import load_model
    from peers import nnsight_skip_sweep

    loaded = load_model(MODEL)
    windows = corpus_windows(loaded, args.tokens, seq_len=min(args.tokens, 128), batch_size=1)
    # nnsight instruments every module it wraps; its copy keeps layerscope's model untouched.
    envoy = TransformersModel(copy.deepcopy(loaded.model), tokenizer=loaded.tokenizer, task="text-generation")
    layers = list(range(loaded.n_layers))
    answers = {}

    def ours():
        answers["layerscope"] = skip_tables(skip_sweep(loaded, windows, layers, reuse_prefix=True))

    def naive():
        answers["nnsight"] = nnsight_skip_sweep(envoy, windows, loaded.n_layers)

    # Warming up on the last two blocks runs every code path of either sweep.
    warm_ups = {"layerscope": lambda: skip_sweep(loaded, windows, layers[-2:], reuse_prefix=True),
                "nnsight": lambda: nnsight_skip_sweep(envoy, windows, loaded.n_layers, layers[-2:])}
    seconds = {name: Spread.of(values) for name, values in
               alternate({"layerscope": ours, "nnsight": naive}, args.repeats, warm_ups=warm_ups).items()}
    table, future = answers["layerscope"]["layer_skip"], answers["layerscope"]["skip_future"]
    values = {f"{row.layer}.{column}": float(getattr(row, column))
              for row in table.itertuples() for column in TABLE_COLUMNS}
    values |= {f"{row.skipped_layer}.future.{row.later_layer}": row.effect for row in future.itertuples()}
    section = Section("skip_sweep", f"Skip sweep over all {loaded.n_layers} blocks",
                      f"{MODEL}, {windows.n_tokens} tokens of the stdlib corpus in windows of {windows.input_ids.shape[1]}; "
                      f"one process, a warm-up skipping the last two blocks, then {args.repeats} rounds taking turns.")
    section.agreement.append(check_agreement(
        "cross-entropy, KL, top-1 agreement, final-residual change and later blocks' change per skipped block "
        "vs the nnsight loop", values, answers["nnsight"]))
    section.row("layerscope skip sweep (clean prefix reused)", seconds["layerscope"])
    section.row("nnsight, one .skip() trace per block", seconds["nnsight"])
    section.notes.append(NOTE)
    section.target("layerscope time / naive nnsight loop", seconds["layerscope"].median / seconds["nnsight"].median,
                   0.55)
    section.save()


if __name__ == "__main__":
    main()
