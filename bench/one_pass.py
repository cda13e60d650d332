"""The survey's streaming measurements together against residual-stats alone, on the same
2k tokens of smollm2-135m: the cost of one shared capture pass for all of them.

Before this runner each streaming measurement made its own pass (about 9x residual-stats'
time for the nine of them).  The tables of the shared pass must equal residual-stats' own
before the timing counts.  Target: all of them at most 1.3x residual-stats alone.

    .venv/bin/python bench/one_pass.py [--repeats 5] [--tokens 2048]
"""

from __future__ import annotations

from harness import (BATCH_SIZE, MODEL, SEQ_LEN, Section, Spread, alternate, case_parser, check_agreement,
                     model_and_windows)


def main() -> None:
    args = case_parser(__doc__, tokens=2048).parse_args()

    from layerscope.analysis.registry import METRICS
    from layerscope.analysis.runner import measure

    loaded, windows = model_and_windows(args.tokens)
    # The nine that each made a pass of their own before; the logit lens unembeds every
    # layer, which costs more than the pass itself, so it is timed on its own elsewhere.
    streaming = [m.name for m in METRICS.values() if m.kind == "streaming" and m.name != "logit-lens"]
    answers = {}

    def alone(batches=windows):
        answers["alone"] = measure(loaded, batches, ["residual-stats"])["residual_stats"]

    def together(batches=windows):
        answers["together"] = measure(loaded, batches, streaming)["residual_stats"]

    warm_up = windows.head(SEQ_LEN * 2)
    seconds = {name: Spread.of(values) for name, values in alternate(
        {"alone": alone, "together": together}, args.repeats,
        warm_ups={"alone": lambda: alone(warm_up), "together": lambda: together(warm_up)}).items()}
    section = Section("one_pass", f"Every streaming measurement in one pass, {args.tokens // 1024}k tokens",
                      f"{MODEL}, stdlib corpus, windows of {SEQ_LEN} tokens, {BATCH_SIZE} a batch; one process, "
                      f"a warm-up on two windows each, then {args.repeats} rounds taking turns. Together: "
                      f"{', '.join(streaming)}.")
    stats = ("mean_norm", "variance", "max_abs")
    section.agreement.append(check_agreement(
        "residual-stats from the shared pass vs alone",
        {f"{r.point}.{r.layer}.{s}": float(getattr(r, s)) for r in answers["together"].itertuples() for s in stats},
        {f"{r.point}.{r.layer}.{s}": float(getattr(r, s)) for r in answers["alone"].itertuples() for s in stats}))
    section.row("residual-stats alone", seconds["alone"])
    section.row(f"{len(streaming)} streaming measurements in one pass", seconds["together"])
    section.target("all streaming measurements / residual-stats alone",
                   seconds["together"].median / seconds["alone"].median, 1.3)
    section.save()


if __name__ == "__main__":
    main()
