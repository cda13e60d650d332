"""Block Influence of every block of smollm2-135m over 8k tokens of the default corpus:
layerscope's block-influence against ShortGPT's loop over HF `hidden_states` (Men et al.
2024), in one process, taking turns after a warm-up.

layerscope's answer must match the loop's to 1e-4 relative before the timing counts.
The loop's last value compares the last block's input with the final norm's output, so
the last block is left out of that check (layerscope reads the raw block output).
Target: layerscope at most 0.85x the loop's time: the pass stops after the last block, while
the loop's HF forward also runs the final norm and the unembedding.

    .venv/bin/python bench/block_influence.py [--repeats 5] [--tokens 8192]
"""

from __future__ import annotations


from harness import (BATCH_SIZE, MODEL, SEQ_LEN, Section, Spread, alternate, case_parser, check_agreement,
                     model_and_windows)


def main() -> None:
    args = case_parser(__doc__, tokens=8192).parse_args()

    from layerscope.analysis import block_influence
    from peers import shortgpt_block_influence

    loaded, windows = model_and_windows(args.tokens)
    options = block_influence.BlockInfluenceOptions()
    answers = {}

    def ours(batches=windows):
        answers["layerscope"] = block_influence.METRIC(loaded, batches, options)["block_influence"]

    def loop(batches=windows):
        answers["shortgpt"] = shortgpt_block_influence(loaded.model, batches)

    warm_up = windows.head(SEQ_LEN * 2)
    seconds = {name: Spread.of(values) for name, values in alternate(
        {"layerscope": ours, "shortgpt": loop}, args.repeats,
        warm_ups={"layerscope": lambda: ours(warm_up), "shortgpt": lambda: loop(warm_up)}).items()}
    compared = range(loaded.n_layers - 1)
    section = Section("block_influence", f"Block Influence over {args.tokens // 1024}k tokens",
                      f"{MODEL}, stdlib corpus, windows of {SEQ_LEN} tokens, {BATCH_SIZE} a batch; one process, "
                      f"a warm-up on two windows each, then {args.repeats} rounds taking turns.")
    section.agreement.append(check_agreement(
        f"Block Influence of blocks 0-{loaded.n_layers - 2} vs the ShortGPT loop",
        {str(l): answers["layerscope"]["block_influence"][l] for l in compared},
        {str(l): answers["shortgpt"][l] for l in compared}))
    section.row("layerscope block-influence (block, attention and MLP influence)", seconds["layerscope"])
    section.row("ShortGPT loop over HF output_hidden_states (block influence)", seconds["shortgpt"])
    section.target("layerscope time / ShortGPT loop", seconds["layerscope"].median / seconds["shortgpt"].median, 0.85)
    section.save()


if __name__ == "__main__":
    main()
