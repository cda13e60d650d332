"""`make bench`: run every benchmark in turn, then gather what they measured into
bench/RESULTS.md with the machine and the versions.

A script that fails is named in RESULTS.md and makes the run exit non-zero; a missed
target is a finding, reported as such.

    .venv/bin/python bench/run_all.py [--only SCRIPT ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from harness import RESULTS_DIR, write_atomic

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SCRIPTS = ("load_time.py", "residual_capture.py", "block_influence.py", "one_pass.py", "data_parallel.py", "skip_sweep.py",
           "logit_lens.py", "survey.py", "outlier_memory.py", "ln_removal_step.py", "app_reopen.py", "cli_help.py")
RESULTS_FILE = BENCH / "RESULTS.md"


def machine() -> dict[str, str]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
    return {
        "CPU": cpu,
        "cores available": str(len(os.sched_getaffinity(0))),
        "memory": f"{memory_kib / 2**20:.1f} GiB",
        "torch threads": str(torch.get_num_threads()),
        "accelerator": "CUDA" if torch.cuda.is_available() else "none",
        "system": f"{platform.system()} {platform.release()}",
    }


def versions() -> dict[str, str]:
    from layerscope.analysis.store import package_versions

    return package_versions()


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _seconds(spread: dict) -> list[str]:
    return [f"{spread['median']:.3g}", f"{spread['low']:.3g}–{spread['high']:.3g}", str(spread["n"])]


def section_markdown(section: dict) -> list[str]:
    lines = [f"### {section['title']}", "", section["setup"], ""]
    extras = list(dict.fromkeys(k for row in section["rows"] for k in row if k not in ("label", "seconds")))
    header = ["", "median s", "min–max s", "n", *[k.replace("_", " ") for k in extras]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in section["rows"]:
        timing = _seconds(row["seconds"]) if "seconds" in row else ["", "", ""]
        lines.append("| " + " | ".join([row["label"], *timing, *[_number(row.get(k, "")) for k in extras]]) + " |")
    lines.append("")
    for target in section["targets"]:
        lines.append(f"- **{target['verdict']}**: {target['claim']} = {target['figure']:.3f}{target['unit']} "
                     f"(target at most {target['limit']:g}{target['unit']})")
    for line in section["agreement"]:
        lines.append(f"- agreement: {line}")
    for note in section["notes"]:
        lines.append(f"- {note}")
    return lines + [""]


def write_results(sections: list[dict], wall: dict[str, float], failed: list[str], total: float) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Benchmarks", "",
             f"Written by `make bench` ({now}) in {total / 60:.1f} minutes.  Every claim is a ratio of medians "
             "measured side by side in this run; absolute times only give the scale.  Every layerscope answer "
             "timed against a peer was first checked to agree with it to 1e-4 relative.", ""]
    if failed:
        lines += [f"**Failed:** {', '.join(failed)} (see the `make bench` output).", ""]
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in machine().items()] + [""]
    lines += ["## Versions", ""] + [f"- {k} {v}" for k, v in versions().items()] + [""]
    lines += ["## Targets", "", "| case | claim | figure | target | verdict |", "|---|---|---|---|---|"]
    for section in sections:
        for t in section["targets"]:
            lines.append(f"| {section['title']} | {t['claim']} | {t['figure']:.3f}{t['unit']} | "
                         f"≤ {t['limit']:g}{t['unit']} | {t['verdict']} |")
    lines += ["", "## Cases", ""]
    for section in sections:
        lines += section_markdown(section)
    lines += ["## Wall time per script", "", "| script | minutes |", "|---|---|"]
    lines += [f"| {name} | {seconds / 60:.1f} |" for name, seconds in wall.items()]
    write_atomic(RESULTS_FILE, "\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these scripts")
    args = parser.parse_args()
    scripts = args.only or SCRIPTS
    RESULTS_DIR.mkdir(exist_ok=True)
    for old in RESULTS_DIR.glob("*.json"):
        old.unlink()
    started = time.perf_counter()
    wall, failed = {}, []
    for script in scripts:
        print(f"== {script}", flush=True)
        began = time.perf_counter()
        if subprocess.run([sys.executable, str(BENCH / script)], cwd=ROOT).returncode != 0:
            failed.append(script)
        wall[script] = time.perf_counter() - began
    order = {name: i for i, name in enumerate(
        ("load_time", "residual_capture", "scaling", "block_influence", "skip_sweep", "logit_lens", "survey",
         "outlier_memory", "ln_removal_step", "app_reopen", "cli_help"))}
    sections = sorted((json.loads(p.read_text()) for p in RESULTS_DIR.glob("*.json")),
                      key=lambda s: order.get(s["name"], len(order)))
    total = time.perf_counter() - started
    write_results(sections, wall, failed, total)
    print(f"wrote {RESULTS_FILE.relative_to(ROOT)} in {total / 60:.1f} minutes"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
