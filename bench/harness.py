"""What every benchmark shares: alternating timed repeats, runs in fresh processes that
report their peak RSS, the comparison that keeps a fast wrong answer from winning, and the
results file each script leaves for `bench/run_all.py` to gather into RESULTS.md.

Claims are ratios of medians measured side by side in one run; absolute times are
reported only as context.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from layerscope.probes.files import write_atomic

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPEATS = 5
RESULTS_DIR = Path(__file__).with_name("results")
AGREEMENT_RTOL = 1e-4
MODEL = "smollm2-135m"
# Every case reads the default corpus in the default window length, eight windows a batch.
SEQ_LEN = 128
BATCH_SIZE = 8


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values), len(values))


def case_parser(doc: str, tokens: int, repeats: int = REPEATS) -> argparse.ArgumentParser:
    """The options every side-by-side case takes: repeats and corpus length."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--tokens", type=int, default=tokens)
    return parser


def corpus_windows(loaded, tokens: int, seq_len: int = SEQ_LEN, batch_size: int = BATCH_SIZE):
    """`tokens` tokens of the default corpus in the benchmarks' windows and batches."""
    from layerscope.probes.corpus import CorpusSpec, token_windows

    windows = token_windows(CorpusSpec("stdlib", seq_len=seq_len, max_tokens=tokens, batch_size=batch_size),
                            loaded.tokenizer, loaded.bos_token_id, loaded.max_context)
    if windows.n_tokens != tokens:
        raise SystemExit(f"the default corpus gave {windows.n_tokens} tokens, not {tokens}")
    return windows


def model_and_windows(tokens: int):
    """The benchmarks' model, loaded, with `tokens` tokens of the default corpus."""
    from layerscope.probes.zoo import load_model

    loaded = load_model(MODEL)
    return loaded, corpus_windows(loaded, tokens)


def alternate(runs: dict[str, Callable[[], Any]], repeats: int = REPEATS,
              warm_ups: dict[str, Callable[[], Any]] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each run, in rounds A, B, A, B, ... after one untimed warm-up round
    (of `warm_ups`, shorter versions of the runs, when given)."""
    for warm_up in (warm_ups or runs).values():
        warm_up()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(script: str, *args: str) -> dict:
    """Run `script --child ARGS` in a fresh interpreter and return the JSON it prints last."""
    out = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{Path(script).name} --child {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def emit(payload: dict) -> None:
    """A child's report to its parent: one JSON line on stdout."""
    print(json.dumps(payload), flush=True)


# Marks a worker's replies, so that anything a library prints on stdout cannot be taken for one.
REPLY = "@bench-reply "


class Worker:
    """A fresh process that sets up once, then runs a timed job whenever asked: several
    workers can take turns, each keeping its own peak RSS, without paying the set-up
    (imports, model load, corpus) for every repeat.  Workers started together set up
    side by side; `wait_ready` on all of them before timing any."""

    def __init__(self, script: str, *args: str):
        self.label = f"{Path(script).name} {' '.join(args)}"
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, script, "--worker", *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.errors, text=True)
        self.ready = False

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.errors.seek(0)
        raise SystemExit(f"{self.label} stopped:\n{self.errors.read()[-3000:]}")

    def wait_ready(self) -> "Worker":
        """Block until the set-up is done; time nothing before every worker is ready."""
        if not self.ready:
            self.ready = self._reply()["ready"]
        return self

    def run(self) -> dict:
        self.wait_ready()
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._reply()

    def close(self) -> dict:
        """Stop the worker; returns its peak RSS in bytes."""
        self.wait_ready()
        self.process.stdin.write("done\n")
        self.process.stdin.flush()
        final = self._reply()
        self.process.wait()
        self.errors.close()
        return final


def serve(job: Callable[[], dict]) -> None:
    """The worker side: report ready, run `job` on each request, report peak RSS at the end."""

    def reply(payload: dict) -> None:
        print(REPLY + json.dumps(payload), flush=True)

    reply({"ready": True})
    for command in sys.stdin:
        if command.strip() == "run":
            reply(job())
        else:
            break
    reply({"rss_bytes": peak_rss_bytes()})


def max_relative_difference(ours: dict[str, float], theirs: dict[str, float]) -> tuple[float, str]:
    """Largest |ours - theirs| / |theirs| over the keys both hold, and its key."""
    common = ours.keys() & theirs.keys()
    if not common:
        raise SystemExit("the two results share no value to compare")
    return max((abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-30), k) for k in common)


def check_agreement(label: str, ours: dict[str, float], theirs: dict[str, float]) -> str:
    """Stop the benchmark unless the two agree to AGREEMENT_RTOL; else a line for RESULTS.md."""
    worst, key = max_relative_difference(ours, theirs)
    common = len(ours.keys() & theirs.keys())
    if not worst <= AGREEMENT_RTOL:
        raise SystemExit(f"{label}: results differ by {worst:.3g} relative at {key} ({ours[key]!r} vs "
                         f"{theirs[key]!r}; tolerance {AGREEMENT_RTOL}); the timing would compare different answers")
    return f"{label}: {common} values agree, largest relative difference {worst:.2g} (tolerance {AGREEMENT_RTOL:g})"


def verdict(passed: bool) -> str:
    return "pass" if passed else "miss"


@dataclass
class Section:
    """One script's part of RESULTS.md: timed rows, targets, agreement checks and notes."""

    name: str
    title: str
    setup: str
    rows: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    agreement: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, label: str, seconds: Spread | None = None, **extra: Any) -> None:
        entry = {"label": label, **extra}
        if seconds is not None:
            entry["seconds"] = asdict(seconds)
        self.rows.append(entry)

    def target(self, claim: str, figure: float, limit: float, unit: str = "x") -> bool:
        passed = figure <= limit
        self.targets.append({"claim": claim, "figure": figure, "limit": limit, "unit": unit,
                             "verdict": verdict(passed)})
        print(f"{claim}: {figure:.3f}{unit} (target <= {limit:g}{unit}: {verdict(passed)})", flush=True)
        return passed

    def save(self) -> Path:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{self.name}.json"
        write_atomic(path, json.dumps(asdict(self), indent=1))
        return path


