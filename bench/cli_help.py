"""How long `layerscope --help` takes: the command a new user types first.

Runs the installed console script (a fresh interpreter each time, as a user's shell
does) five times and reports the median; the target is under 1 s.  `models` and
`runs list` are timed beside it for reference.

    .venv/bin/python bench/cli_help.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import Section, Spread

LIMIT_SECONDS = 1.0


def timed(command: list[str], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        seconds.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    script = str(Path(sys.executable).with_name("layerscope"))
    runs = tempfile.mkdtemp(prefix="layerscope-bench-runs-")
    section = Section("cli_help", "Starting the command line",
                      f"the installed `layerscope` script in a fresh interpreter, {args.repeats} times each; median")
    help_seconds = timed([script, "--help"], args.repeats)
    section.row("layerscope --help", Spread.of(help_seconds))
    for label, command in (("layerscope models", [script, "models"]),
                           ("layerscope runs list (empty store)", [script, "runs", "list", "--runs-dir", runs])):
        seconds = timed(command, args.repeats)
        section.row(label, Spread.of(seconds))
        print(f"{label}: median {statistics.median(seconds):.3f} s")
    passed = section.target("layerscope --help, median", statistics.median(help_seconds), LIMIT_SECONDS, unit=" s")
    section.save()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
