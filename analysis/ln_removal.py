"""The tables, figure and summary of an LN-removal run (Heimersheim 2024, "You can remove
GPT2's LayerNorm by fine-tuning"; Baroni et al. 2025, "Transformers Don't Need LayerNorm
at Inference Time").

The run compares four models on the same held-out windows: the original; the original
with every norm frozen at its mean scale and no training ("removed, no fine-tune"); a
vanilla fine-tune of the same length as the removal, every norm kept (the control); and
the norm-free model.  The papers report the norm-free model against the vanilla one.

`save_ln_removal_run` stores a `remove_norms` result as a run of metric "ln-removal" with
these tables; the norm-free model and the checkpoints stay outside the run store.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from layerscope.analysis.store import package_versions, save_run
from layerscope.probes.corpus import TokenWindows
from layerscope.probes.ln_removal import FineTuneResult, RemovalResult
from layerscope.probes.ln_train import CURVE_COLUMNS

METRIC_NAME = "ln-removal"


def ln_removal_tables(removal: FineTuneResult, control: FineTuneResult | None, no_finetune_ce: float | None,
                      ranking: list[tuple[str, float]] | None = None) -> dict[str, pd.DataFrame]:
    """- `ln_removal_eval`: one row per model: evaluation cross-entropy, its change against
      the original and against the vanilla fine-tune, and a note when it is not finite.
    - `ln_removal_loss`: one row per (run, step): training loss, auxiliary loss, learning
      rate, gradient norm and the number of norms removed so far.
    - `ln_removal_schedule`: one row per removal event: the step, the norm's role, the
      part frozen (all, qk, v; `first` for position 0 of every norm, role `*`), its module
      path, and the frozen scales (other positions, position 0).
    - `ln_removal_curve` (when measured): per removal step, the held-out CE on the curve
      windows just before and just after the removal, and their difference (`cost`).
    - `ln_removal_order` (with the sensitivity order): each block norm's KL to the
      original when frozen alone, in removal order.
    """
    rows = [("original", removal.eval_before, 0)]
    if no_finetune_ce is not None:
        rows.append(("removed, no fine-tune", no_finetune_ce, 0))
    if control is not None:
        rows.append(("vanilla fine-tune", control.eval_after, len(control.history["step"])))
    rows.append(("norm-free", removal.eval_after, len(removal.history["step"])))
    evals = pd.DataFrame(rows, columns=["model", "eval_ce", "steps"])
    evals["delta_vs_original"] = evals["eval_ce"] - removal.eval_before
    evals["delta_vs_vanilla"] = evals["eval_ce"] - control.eval_after if control is not None else float("nan")
    # Freezing every norm at once can overflow float32 (it does on SmolLM2): say so, not just NaN.
    evals["note"] = ["" if math.isfinite(ce) else "loss not finite: the activations overflow float32"
                     for ce in evals["eval_ce"]]
    loss = pd.concat([removal.loss_table()] + ([control.loss_table()] if control is not None else []),
                     ignore_index=True)
    scales = {s["role"]: s for s in removal.scales}
    schedule = pd.DataFrame([{
        "step": e.step, "role": e.role, "part": e.part, "path": e.path,
        "scale": scales.get(e.role, {}).get("scale"), "first_scale": scales.get(e.role, {}).get("first_scale"),
    } for e in removal.events], columns=["step", "role", "part", "path", "scale", "first_scale"])
    tables = {"ln_removal_eval": evals, "ln_removal_loss": loss, "ln_removal_schedule": schedule}
    if removal.curve:
        tables["ln_removal_curve"] = pd.DataFrame(removal.curve, columns=list(CURVE_COLUMNS)).assign(
            cost=lambda t: t["ce_after"] - t["ce_before"])
    if ranking:
        tables["ln_removal_order"] = pd.DataFrame(
            [{"rank": i, "role": role, "kl_frozen_alone": kl} for i, (role, kl) in enumerate(ranking)])
    return tables


def result_tables(result: RemovalResult) -> dict[str, pd.DataFrame]:
    """`ln_removal_tables` of a `remove_norms` result."""
    return ln_removal_tables(result.removal, result.control, result.eval_no_finetune, result.ranking)


def save_ln_removal_run(result: RemovalResult, train: TokenWindows, evaluation: TokenWindows,
                        tables: dict[str, pd.DataFrame] | None = None, runs_dir: Path | None = None,
                        extra_options: dict | None = None) -> Path:
    """Store a `remove_norms` result as a run of metric "ln-removal" (in
    `result.options.runs_dir` unless `runs_dir` is given): the eval, per-step loss and
    schedule tables, with the norm-free model's path in the manifest.  Returns the run folder."""
    tables = tables if tables is not None else result_tables(result)
    options = result.options
    manifest = {
        "metric": METRIC_NAME,
        "model": result.base_model,
        "corpus": {"train": train.manifest(), "eval": evaluation.manifest()},
        "options": {METRIC_NAME: {**asdict(options.config), "checkpoint_every": options.checkpoint_every,
                                  "control": options.control, **(extra_options or {})}},
        "norm_free_model": str(Path(result.norm_free_model).resolve()),
        "checkpoint_dir": str(Path(result.checkpoint_dir).resolve()),
        "results": {row.model: row.eval_ce for row in tables["ln_removal_eval"].itertuples()},
        "resumed_from_step": result.removal.resumed_from,
        "skipped_steps": result.removal.skipped,
        "versions": package_versions(),
        "timings": {"total_seconds": result.seconds, "removal_seconds": result.removal.seconds,
                    "control_seconds": result.control.seconds if result.control else None},
    }
    return save_run(tables, manifest, Path(runs_dir if runs_dir is not None else options.runs_dir))


def loss_curve_figure(loss: pd.DataFrame, schedule: pd.DataFrame | None = None,
                      curve: pd.DataFrame | None = None) -> go.Figure:
    """Training cross-entropy per step of the removal run and the vanilla control (and the
    distillation objective when there is one), the held-out CE just before and after each
    removal, and the number of norms removed on a second axis."""
    fig = go.Figure()
    for run, rows in loss.groupby("run", sort=False):
        column = "ce" if "ce" in rows else "loss"
        fig.add_scatter(x=rows["step"], y=rows[column], name=f"{run} training CE", mode="lines")
        if column == "ce" and not rows["loss"].equals(rows["ce"]):
            fig.add_scatter(x=rows["step"], y=rows["loss"], name=f"{run} KL to the original", mode="lines",
                            line={"dash": "dash"})
    if curve is not None and not curve.empty:
        for column, name in (("ce_before", "held-out CE before removal"), ("ce_after", "held-out CE after removal")):
            fig.add_scatter(x=curve["step"], y=curve[column], name=name, mode="markers", text=curve["role"],
                            hovertemplate="step %{x}: %{text}<br>CE %{y:.3f}<extra></extra>")
    removal = loss[loss["run"] == "ln-removal"]
    fig.add_scatter(x=removal["step"], y=removal["removed"], name="norms removed", mode="lines",
                    line={"dash": "dot", "color": "gray"}, yaxis="y2")
    if schedule is not None and not schedule.empty:
        fig.add_scatter(x=schedule["step"], y=list(range(1, len(schedule) + 1)), mode="markers", yaxis="y2",
                        name="norm frozen", marker={"size": 5, "color": "gray"}, text=schedule["role"],
                        hovertemplate="step %{x}: %{text} frozen<extra></extra>")
    fig.update_layout(title="LN removal: training loss while the norms are frozen one by one",
                      xaxis_title="training step", yaxis_title="cross-entropy (nats)",
                      yaxis2={"title": "norms removed", "overlaying": "y", "side": "right", "rangemode": "tozero",
                              "tickformat": "d", "showgrid": False})
    return fig


def figures(tables: dict[str, pd.DataFrame]) -> list[go.Figure]:
    """The figures of a stored ln-removal run, for the report and the app."""
    return [loss_curve_figure(tables["ln_removal_loss"], tables.get("ln_removal_schedule"),
                              tables.get("ln_removal_curve"))]


def summarize(tables: dict[str, pd.DataFrame]) -> list[str]:
    evals = tables["ln_removal_eval"].set_index("model")
    parts = [f"{model} {row['eval_ce']:.4f}" + (f" ({row['note']})" if row["note"] else "")
             for model, row in evals.iterrows()]
    line = "ln-removal eval CE: " + ", ".join(parts)
    if "vanilla fine-tune" in evals.index:
        line += f"; norm-free - vanilla {evals.loc['norm-free', 'delta_vs_vanilla']:+.4f}"
    line += f"; norm-free - original {evals.loc['norm-free', 'delta_vs_original']:+.4f}"
    return [line]
