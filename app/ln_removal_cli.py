"""`layerscope ln-removal`: remove every norm of a model by fine-tuning, save the
norm-free model, and store the run with a vanilla fine-tune of the same length as control."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from layerscope.probes.errors import UserError

REMOVAL_CHECKPOINT = "removal.pt"
CONTROL_CHECKPOINT = "control.pt"


def add_ln_removal_parser(sub) -> None:
    from layerscope.app.cli import _add_metric_options
    from layerscope.probes.ln_removal import RemovalConfig, RemovalData

    parser = sub.add_parser(
        "ln-removal", help="remove every LayerNorm/RMSNorm by fine-tuning (Heimersheim 2024; Baroni et al. 2025)",
        description="Freeze each norm's scale at its running average on a schedule while fine-tuning: pre-MLP "
                    "norms, then pre-attention norms, then the final norm.  Saves the norm-free model as an HF "
                    "directory that `--model DIR` loads, and a run with the loss curve and evaluation "
                    "cross-entropy against a vanilla fine-tune of the same length.")
    parser.add_argument("--model", default="smollm2-135m", help="zoo name, local HF directory or Hub id")
    _add_metric_options(parser, RemovalData)
    _add_metric_options(parser, RemovalConfig)
    parser.add_argument("--checkpoint-dir", help="where checkpoints go (default runs/ln-removal/<model>/)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")
    parser.add_argument("--output", help="norm-free model folder (default runs/ln-removal/<model>-norm-free)")
    parser.add_argument("--no-control", action="store_true", help="skip the vanilla fine-tune and the no-fine-tune control")
    parser.add_argument("--format", default="table", choices=["table", "json"])
    parser.add_argument("--runs-dir", default="runs", help="run store folder")
    parser.add_argument("--no-save", action="store_true", help="do not write a run (the model is still saved)")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or name)


def cmd_ln_removal(args: argparse.Namespace) -> int:
    from layerscope.analysis.ln_removal import ln_removal_tables, summarize
    from layerscope.analysis.store import package_versions, save_run
    from layerscope.app.cli import _print_tables, _progress
    from layerscope.probes.ln_removal import (RemovalConfig, RemovalData, fine_tune,
                                              remove_without_finetuning, removal_schedule, save_norm_free)
    from layerscope.probes.norms import require_norms
    from layerscope.probes.zoo import load_model

    config = RemovalConfig(**{k: getattr(args, k) for k in RemovalConfig.__dataclass_fields__})
    data = RemovalData(**{k: getattr(args, k) for k in RemovalData.__dataclass_fields__})
    if args.checkpoint_every < 1:
        raise UserError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    base = Path(args.runs_dir) / "ln-removal"
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else base / _safe(args.model)
    output = Path(args.output) if args.output else base / f"{_safe(args.model)}-norm-free"
    removal_file, control_file = checkpoints / REMOVAL_CHECKPOINT, checkpoints / CONTROL_CHECKPOINT
    if args.resume and not removal_file.exists():
        raise UserError(f"--resume: no checkpoint in {checkpoints}")
    if not args.resume and (removal_file.exists() or control_file.exists()):
        raise UserError(f"{checkpoints} already holds checkpoints: continue with --resume, "
                        "or delete them or choose another --checkpoint-dir")

    started = time.perf_counter()
    loaded = load_model(args.model)
    removal_schedule(require_norms(loaded), config)  # a bad schedule fails before any work
    train, evaluation = data.windows(loaded)
    progress = _progress(args)
    removal = fine_tune(loaded, train, evaluation, config, remove=True, checkpoint=removal_file,
                        checkpoint_every=args.checkpoint_every, resume=args.resume, progress=progress)
    save_norm_free(loaded, output, {"base_model": args.model, "base_weights_hash": loaded.weights_hash,
                                    "config": asdict(config), "data": asdict(data)})
    base_card = {**loaded.card(), "weights_hash": loaded.weights_hash}
    del loaded
    control = no_finetune = None
    if not args.no_control:
        fresh = load_model(args.model)
        no_finetune, _ = remove_without_finetuning(fresh, train, evaluation, config)
        control = fine_tune(fresh, train, evaluation, config, remove=False, checkpoint=control_file,
                            checkpoint_every=args.checkpoint_every, resume=args.resume,
                            eval_before=removal.eval_before, progress=progress)
    tables = ln_removal_tables(removal, control, no_finetune)
    run_path = None
    if not args.no_save:
        manifest = {
            "metric": "ln-removal",
            "model": base_card,
            "corpus": {"train": train.manifest(), "eval": evaluation.manifest()},
            "options": {"ln-removal": asdict(config), "data": asdict(data),
                        "checkpoint_every": args.checkpoint_every},
            "norm_free_model": str(output.resolve()),
            "results": {row.model: row.eval_ce for row in tables["ln_removal_eval"].itertuples()},
            "resumed_from_step": removal.resumed_from,
            "versions": package_versions(),
            "timings": {"total_seconds": time.perf_counter() - started, "removal_seconds": removal.seconds,
                        "control_seconds": control.seconds if control else None},
        }
        run_path = save_run(tables, manifest, Path(args.runs_dir))
    if args.format == "json":
        print(json.dumps({"summary": summarize(tables), "norm_free_model": str(output),
                          "run": str(run_path) if run_path else None,
                          "eval": json.loads(tables["ln_removal_eval"].to_json(orient="records"))}))
    else:
        _print_tables({"ln_removal_eval": tables["ln_removal_eval"]}, "table", run_path)
        print(f"norm-free model: {output} (load it with --model {output})")
    return 0
