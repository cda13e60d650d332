"""The data-parallel path's overhead: the survey's streaming measurements on smollm2-135m
over 2k tokens, run by `torchrun --nproc_per_node 2` (gloo) against one process, on this
machine.  Each run is a fresh command, so both pay the same start-up and model load; the
times are wall-clock per command.  With two ranks sharing two cores there is no speed-up
to expect: this reports the ratio as it is, and the per-token cost that the README's
estimate for large models is built from.

Both runs' tables must agree to 1e-6 relative before the timing counts.

    .venv/bin/python bench/data_parallel.py [--repeats 3] [--tokens 2048]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import MODEL, SEQ_LEN, Section, Spread, case_parser, check_agreement

METRICS = "residual-stats,massive,super-weights,int8-outliers,kurtosis,sinks,block-influence,variance,dla"


def survey(tokens: int, ranks: int, runs: Path) -> float:
    command = ["-m", "layerscope.app.cli", "survey", "--model", MODEL, "--max-tokens", str(tokens),
               "--seq-len", str(SEQ_LEN), "--metrics", METRICS, "--runs-dir", str(runs), "--format", "json"]
    if ranks > 1:
        command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(ranks),
                   "--master_port", "29655", *command]
    else:
        command = [sys.executable, *command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"survey on {ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    return seconds


def residual_norms(runs: Path) -> dict[str, float]:
    from layerscope.analysis.result import Result

    [run] = [p for p in runs.iterdir() if not p.name.startswith(".")]
    table = Result.load(run)["residual_stats"]
    return {f"{r.point}.{r.layer}.{s}": float(getattr(r, s)) for r in table.itertuples()
            for s in ("mean_norm", "variance", "max_abs")}


def main() -> None:
    parser = case_parser(__doc__, tokens=2048)
    parser.set_defaults(repeats=3)
    args = parser.parse_args()
    seconds: dict[int, list[float]] = {1: [], 2: []}
    answers = {}
    for _ in range(args.repeats):
        for ranks in (1, 2):
            with tempfile.TemporaryDirectory() as folder:
                seconds[ranks].append(survey(args.tokens, ranks, Path(folder)))
                answers[ranks] = residual_norms(Path(folder))
    spread = {ranks: Spread.of(values) for ranks, values in seconds.items()}
    section = Section("data_parallel", f"Data-parallel overhead, {args.tokens // 1024}k tokens",
                      f"{MODEL}, stdlib corpus, windows of {SEQ_LEN}; `layerscope survey --metrics {METRICS}` as one "
                      f"process and under torchrun with 2 gloo ranks (OMP threads split between ranks), "
                      f"{args.repeats} rounds taking turns, each a fresh command including the model load.")
    section.agreement.append(check_agreement("residual-stats under torchrun vs one process", answers[2], answers[1]))
    section.row("one process", spread[1])
    section.row("torchrun, 2 gloo ranks", spread[2])
    ratio = spread[2].median / spread[1].median
    section.notes.append(f"2 ranks / 1 process = {ratio:.3f}x on this {os.cpu_count()}-core machine; "
                         f"per 1k tokens, one process: {spread[1].median / (args.tokens / 1024):.2f} s "
                         "(including the model load).")
    print(json.dumps({"ratio": ratio}))
    section.save()


if __name__ == "__main__":
    main()
