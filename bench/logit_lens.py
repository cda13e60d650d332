"""The logit lens of every layer of smollm2-135m over 2k tokens of the default corpus:
layerscope's logit lens, which stops the pass after the last block and unembeds every
layer's chunk of positions in one matmul, reducing each chunk's log-softmax at once,
against the implementation it replaced (`peers.logit_lens_before`: full logits per layer,
then whole-batch passes for the log-softmax, top-1 and KL), in one process, taking turns
after a warm-up.

Per layer, CE, top-1 accuracy and KL to the final distribution must match to 1e-4
relative before the timing counts (KL to 1e-4 of the largest KL: the last layer's is 0).
Target: layerscope at most 0.5x the replaced implementation's time (2x faster).

    .venv/bin/python bench/logit_lens.py [--repeats 3] [--tokens 2048]
"""

from __future__ import annotations

from harness import (BATCH_SIZE, MODEL, SEQ_LEN, Section, Spread, alternate, case_parser, check_agreement,
                     model_and_windows)

COLUMNS = ("ce", "top1_accuracy", "kl_to_final")


def main() -> None:
    args = case_parser(__doc__, tokens=2048, repeats=3).parse_args()

    from layerscope.analysis import logit_lens
    from layerscope.analysis.metric import NoOptions
    from peers import logit_lens_before

    loaded, windows = model_and_windows(args.tokens)
    answers = {}

    def ours(batches=windows):
        answers["layerscope"] = logit_lens.METRIC(loaded, batches, NoOptions())["logit_lens"]

    def before(batches=windows):
        answers["before"] = logit_lens_before(loaded, batches)[1]

    warm_up = windows.head(SEQ_LEN * 2)
    seconds = {name: Spread.of(values) for name, values in alternate(
        {"layerscope": ours, "before": before}, args.repeats,
        warm_ups={"layerscope": lambda: ours(warm_up), "before": lambda: before(warm_up)}).items()}
    table = answers["layerscope"]
    ours_values = {f"{row.layer}.{c}": float(getattr(row, c)) for row in table.itertuples() for c in COLUMNS}
    theirs = answers["before"]
    # A KL near 0 (the last layers') is compared against the scale of the largest.
    floor = max(theirs[k] for k in theirs if k.endswith("kl_to_final"))
    ours_kl = {k: v + floor for k, v in ours_values.items() if k.endswith("kl_to_final")}
    theirs_kl = {k: v + floor for k, v in theirs.items() if k.endswith("kl_to_final")}
    section = Section("logit_lens", f"Logit lens of all layers over {args.tokens // 1024}k tokens",
                      f"{MODEL}, stdlib corpus, windows of {SEQ_LEN} tokens, {BATCH_SIZE} a batch; one process, "
                      f"a warm-up on two windows each, then {args.repeats} rounds taking turns.")
    section.agreement.append(check_agreement(
        "CE and top-1 accuracy per layer vs the replaced implementation",
        {k: v for k, v in ours_values.items() if not k.endswith("kl_to_final")},
        {k: v for k, v in theirs.items() if not k.endswith("kl_to_final")}))
    section.agreement.append(check_agreement(
        "KL to the final distribution per layer (offset by the largest KL) vs the replaced implementation",
        ours_kl, theirs_kl))
    section.row("layerscope logit-lens (early stop, chunked, layers unembedded together)", seconds["layerscope"])
    section.row("the replaced implementation (full logits per layer, whole-batch passes)", seconds["before"])
    section.target("layerscope time / the replaced implementation",
                   seconds["layerscope"].median / seconds["before"].median, 0.5)
    section.save()


if __name__ == "__main__":
    main()
