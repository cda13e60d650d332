"""The one runner: every requested measurement from one capture pass.

`measure` takes the union of the streaming measurements' reducers (reducers are frozen
and hashable, so equal ones are shared: residual-stats and variance read the same
moments), folds them in ONE pass over the corpus, builds each measurement's tables from
that capture, and then runs the replay measurements, which start from it.  The CLI, the
app, the report and notebooks all come through here, so a run's manifest is built here
and nowhere else.
"""

from __future__ import annotations

import time
from dataclasses import MISSING, asdict, fields, replace

import pandas as pd

from layerscope.analysis.metric import Metric, Tables, check_bounds
from layerscope.analysis.registry import METRICS
from layerscope.analysis.result import Result
from layerscope.analysis.store import package_versions
from layerscope.probes import distributed
from layerscope.probes.capture import Capture, ProbeSpec, capture, finish, fold
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.inputs import windows_for
from layerscope.probes.errors import UserError
from layerscope.probes.placements import placement_variants
from layerscope.probes.progress import ProgressArg
from layerscope.probes.zoo import LoadedModel, load_model


def resolve_metrics(names: list[str] | str | None) -> list[Metric]:
    """Registered measurements by name; None means every one."""
    if names is None:
        return list(METRICS.values())
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    if not names:
        raise UserError("no measurement chosen")
    return [METRICS[n] for n in dict.fromkeys(names)]


def resolve_options(metric: Metric, given, shared: dict):
    """A measurement's options: a dataclass as given, or built from a dict of its fields and
    the keyword options that name one of its fields."""
    if isinstance(given, metric.options):
        check_bounds(given)
        return given
    if given is not None and not isinstance(given, dict):
        raise UserError(f"options for {metric.name} must be a {metric.options.__name__} or a dict, "
                        f"not {type(given).__name__}")
    values = {k: v for k, v in shared.items() if k in metric.option_names}
    values.update(given or {})
    unknown = sorted(set(values) - set(metric.option_names))
    if unknown:
        raise UserError(f"{metric.name} has no option {', '.join(unknown)}; its options: "
                        f"{', '.join(metric.option_names) or 'none'}")
    options = metric.options(**values)
    check_bounds(options)
    return options


def changed_options(options) -> dict:
    """The fields of an options dataclass that differ from their defaults: what tells two
    runs of one measurement apart in `layerscope runs list`."""
    defaults = {f.name: f.default if f.default_factory is MISSING else f.default_factory() for f in fields(options)}
    return {name: value for name, value in asdict(options).items() if value != defaults[name]}


def _union(specs: dict[str, ProbeSpec]) -> ProbeSpec:
    reducers: dict[str, object] = {}
    for metric_name, spec in specs.items():
        for reducer in spec.reducers:
            held = reducers.setdefault(reducer.name, reducer)
            if held != reducer:
                raise UserError(f"{metric_name} asks for reducer {reducer.name!r} with other settings than "
                                "another measurement in the same run; measure them separately")
    return ProbeSpec(tuple(reducers.values()))


def _varies_placement(options) -> bool:
    return bool(getattr(options, "placements", ""))


def _over_placements(metric: Metric, loaded: LoadedModel, windows: TokenWindows, options, backend: str,
                     progress: ProgressArg) -> Tables:
    """The measurement on each norm-placement variant of the model, stacked with a `placement` column."""
    stacked: dict[str, list[pd.DataFrame]] = {}
    for placement, variant in placement_variants(loaded, options.placements):
        single = replace(options, placements="")
        tables = measure(variant, windows, [metric.name], options={metric.name: single}, backend=backend,
                         progress=progress).tables
        for name, table in tables.items():
            stacked.setdefault(name, []).append(table.assign(placement=placement))
    return {name: pd.concat(parts, ignore_index=True) for name, parts in stacked.items()}


def measure(model: LoadedModel | str, corpus: TokenWindows | str, metrics: list[str] | str | None = None, *,
            options: dict | None = None, backend: str = "hooks", progress: ProgressArg = False,
            **shared_options) -> Result | None:
    """Measure `metrics` (names, default all that apply) of `model` on `corpus` in one pass.

    `corpus` is token windows (`layerscope.windows`), or a string: "stdlib", a .txt/.jsonl
    path, or literal text measured whole.  `options` maps a measurement to its options (a
    dataclass or a dict of fields); other keyword arguments set the option of that name in
    every chosen measurement that has one, e.g. `measure(m, c, ["massive"], top_k=5)`.
    `progress` is False, True (a bar on the terminal) or `progress(done, total, stage)`,
    called after each batch of the pass and each step of a replay.
    """
    loaded = load_model(model) if isinstance(model, str) else model
    windows = windows_for(loaded, corpus)
    chosen = resolve_metrics(metrics)
    given = options or {}
    stray = sorted(set(given) - {m.name for m in chosen})
    if stray:
        raise UserError(f"options given for {', '.join(stray)}, which is not measured here")
    unused = sorted(k for k in shared_options if not any(k in m.option_names for m in chosen))
    if unused:
        raise UserError(f"no chosen measurement has the option {', '.join(unused)}")
    notes = []
    if metrics is None:
        for metric in [m for m in chosen if not m.applies_to(loaded)]:
            notes.append(f"{metric.name}: not applicable to an encoder")
        chosen = [m for m in chosen if m.applies_to(loaded)]
    for metric in chosen:
        metric.check_applies(loaded)
    resolved = {m.name: resolve_options(m, given.get(m.name), shared_options) for m in chosen}

    parallel = distributed.active()
    lead = not parallel or distributed.rank() == 0
    if parallel and any(_varies_placement(opts) for opts in resolved.values()):
        raise UserError("norm-placement comparisons load several models and run in one process, not under torchrun")

    timings: dict[str, float] = {}
    tables: Tables = {}
    per_metric: dict[str, list[str]] = {}
    in_pass = [m for m in chosen if not _varies_placement(resolved[m.name])]
    specs = {m.name: m.probe(resolved[m.name], loaded) for m in in_pass}
    union = _union(specs)
    started = time.perf_counter()
    captured = _capture(loaded, windows, union, backend, progress, parallel) if union.reducers else None
    passes = 1 if union.reducers else 0
    timings["capture"] = time.perf_counter() - started
    for metric in chosen:
        started = time.perf_counter()
        opts = resolved[metric.name]
        if metric not in in_pass:
            found = _over_placements(metric, loaded, windows, opts, backend, progress)
        else:
            found = metric.tables(captured, loaded, opts) if lead and specs[metric.name].reducers else {}
            if parallel and metric.sharded_replay is not None:
                found = {**found, **(metric.sharded_replay(loaded, windows, opts, captured, found, progress) or {})}
            elif metric.replay is not None and lead:
                found = {**found, **metric.replay(loaded, windows, opts, captured, found, progress)}
        timings[metric.name] = time.perf_counter() - started
        per_metric[metric.name] = list(found)
        tables.update(found)
    if not lead:
        return None
    manifest = {
        "metric": chosen[0].name if len(chosen) == 1 and metrics is not None else "survey",
        "model": {**loaded.card(), "weights_hash": loaded.weights_hash},
        "corpus": windows.manifest(),
        "options": {name: asdict(opts) for name, opts in resolved.items()},
        "changed_options": {name: changed_options(opts) for name, opts in resolved.items()},
        "backend": backend,
        "versions": package_versions(),
        "tables_by_metric": per_metric,
        "capture_passes": passes,
        "timings": timings,
        "notes": notes,
    }
    if parallel:
        manifest["distributed"] = distributed.describe_shards(windows.input_ids.shape[0])
    return Result(tables, manifest)


def _capture(loaded: LoadedModel, windows: TokenWindows, union: ProbeSpec, backend: str, progress: ProgressArg,
             parallel: bool) -> Capture | None:
    """One pass over the corpus; in a data-parallel run, over this rank's share, with the
    states merged on rank 0 (None on the other ranks)."""
    if not parallel:
        return capture(loaded, windows, union, backend=backend, progress=progress)
    mine, index = distributed.shard(windows)
    folded = distributed.merged_on_rank0(fold(loaded, mine, union, backend=backend, progress=progress,
                                              window_index=index))
    return None if folded is None else finish(loaded, windows, folded)
