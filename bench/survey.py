"""The demo's survey (`make demo`): every measurement of smollm2-135m on 1,024 tokens of
the default corpus, counted in passes, i.e. its time divided by the time of one plain HF
forward (the full model, with the logits) over the same tokens, measured in the same
process after a warm-up.

The survey runs with `measure`'s defaults, as `layerscope survey` does; its manifest's
timings split the time between the shared capture pass and each measurement.  A survey
costs minutes, so it runs `--repeats` times (default 1) between the forwards' rounds.
Target: at most 55 passes.

    .venv/bin/python bench/survey.py [--repeats 1] [--tokens 1024]
"""

from __future__ import annotations

import time

from harness import MODEL, SEQ_LEN, Section, Spread, case_parser, model_and_windows

FORWARDS = 5
NOTE = ("Counted in blocks (SmolLM2: L = 30 blocks, the unembedding U ≈ 7.7 blocks, one pass L + U = 37.7): each "
        "greedy prune-curve step evaluates every remaining block's removal from the shared prefix, "
        "L(L+1)/2 + L·U ≈ 696 blocks, about 18.5 passes, and the default 4 steps on the survey's 1,024 tokens "
        "take about 74 passes on their own; the layer-skip sweep adds about 18.5, the logit lens about 7. An exact "
        "greedy curve cannot fit under 55 passes with these defaults.")


def main() -> None:
    args = case_parser(__doc__, tokens=1024, repeats=1).parse_args()

    from layerscope.analysis.runner import measure
    from peers import hf_forward

    loaded, windows = model_and_windows(args.tokens)
    measure(loaded, windows.head(SEQ_LEN), ["residual-stats", "logit-lens"])
    hf_forward(loaded.model, windows)
    forwards, surveys, timings = [], [], []
    for _ in range(args.repeats):
        forwards += [hf_forward(loaded.model, windows) for _ in range(FORWARDS // 2 + 1)]
        started = time.perf_counter()
        result = measure(loaded, windows)
        surveys.append(time.perf_counter() - started)
        timings.append(result.manifest["timings"])
        forwards += [hf_forward(loaded.model, windows) for _ in range(FORWARDS // 2)]
    forward, survey = Spread.of(forwards), Spread.of(surveys)
    section = Section("survey", f"The demo survey over {args.tokens:,} tokens, in passes",
                      f"{MODEL}, stdlib corpus, windows of {SEQ_LEN} tokens; one process, a warm-up, then "
                      f"{args.repeats} survey(s) of every measurement with measure's defaults between rounds of a "
                      f"plain HF forward over the same tokens.")
    section.row("layerscope survey (every measurement)", survey)
    section.row("one plain HF forward with the logits", forward)
    by_part = {name: sum(t[name] for t in timings) / len(timings) for name in timings[0]}
    for name, seconds in sorted(by_part.items(), key=lambda kv: -kv[1]):
        section.row(f"survey part: {name}", None, mean_seconds=seconds, passes=seconds / forward.median)
    section.notes.append(NOTE)
    section.target("survey time / one plain HF forward (passes)", survey.median / forward.median, 55, unit="")
    section.save()


if __name__ == "__main__":
    main()
