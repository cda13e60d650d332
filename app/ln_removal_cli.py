"""`layerscope ln-removal`: remove every norm of a model by fine-tuning, save the
norm-free model, and store the run with a vanilla fine-tune of the same length as control.

Only arguments and printing live here: the experiment is
`layerscope.probes.ln_removal.remove_norms`, the run record
`layerscope.analysis.ln_removal.save_ln_removal_run`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from layerscope.probes.errors import UserError


def add_ln_removal_parser(sub) -> None:
    from layerscope.app.cli import _add_metric_options, add_format_arg, add_placement_args, add_runs_dir_arg
    from layerscope.probes.ln_removal import RemovalConfig, RemovalData

    parser = sub.add_parser(
        "ln-removal", help="remove every LayerNorm/RMSNorm by fine-tuning (Heimersheim 2024; Baroni et al. 2025)",
        description="Freeze each norm's scale at its running average on a schedule while fine-tuning: pre-MLP "
                    "norms, then pre-attention norms, then the final norm.  Saves the norm-free model as an HF "
                    "directory that `--model DIR` loads, and a run with the loss curve and evaluation "
                    "cross-entropy against a vanilla fine-tune of the same length.  The model and checkpoints "
                    "go to ln-removal/ beside the run store, never inside it.")
    parser.add_argument("--model", default="smollm2-135m", help="zoo name, local HF directory or Hub id")
    add_placement_args(parser)
    _add_metric_options(parser, RemovalData)
    _add_metric_options(parser, RemovalConfig)
    parser.add_argument("--checkpoint-dir", help="where checkpoints go, outside the run store "
                                                 "(default ln-removal/<model>/ beside --runs-dir)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --checkpoint-dir")
    parser.add_argument("--output", help="norm-free model folder, outside the run store "
                                         "(default ln-removal/<model>-norm-free/ beside --runs-dir)")
    parser.add_argument("--no-control", action="store_true", help="skip the vanilla fine-tune and the no-fine-tune control")
    add_format_arg(parser)
    add_runs_dir_arg(parser)
    parser.add_argument("--no-save", action="store_true", help="do not write a run (the model is still saved)")


def cmd_ln_removal(args: argparse.Namespace) -> int:
    from layerscope.analysis.ln_removal import result_tables, save_ln_removal_run, summarize
    from layerscope.app.cli import _print_tables, _progress, set_threads
    from layerscope.probes.corpus import user_path
    from layerscope.probes.ln_removal import RemovalConfig, RemovalData, RemovalOptions, remove_norms
    from layerscope.probes.zoo import load_model

    options = RemovalOptions(
        config=RemovalConfig(**{k: getattr(args, k) for k in RemovalConfig.__dataclass_fields__}),
        runs_dir=user_path(args.runs_dir, "--runs-dir"),
        checkpoint_dir=user_path(args.checkpoint_dir, "--checkpoint-dir") if args.checkpoint_dir else None,
        output=user_path(args.output, "--output") if args.output else None,
        checkpoint_every=args.checkpoint_every, resume=args.resume, control=not args.no_control)
    data = RemovalData(**{k: getattr(args, k) for k in RemovalData.__dataclass_fields__})
    options.paths(args.model)  # bad folders fail before the model loads

    set_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    train, evaluation = data.windows(loaded)
    result = remove_norms(loaded, train, evaluation, options, progress=_progress(args))
    del loaded
    tables = result_tables(result)
    run_path, save_error = None, None
    if not args.no_save:
        try:
            run_path = save_ln_removal_run(result, train, evaluation, tables, extra_options={"data": asdict(data)})
        except (OSError, UserError) as err:  # the results are printed all the same
            save_error = str(err).splitlines()[0] if str(err) else type(err).__name__
    if args.format == "json":
        print(json.dumps({"summary": summarize(tables), "norm_free_model": str(result.norm_free_model),
                          "checkpoint_dir": str(result.checkpoint_dir),
                          "run": str(run_path) if run_path else None,
                          "eval": json.loads(tables["ln_removal_eval"].to_json(orient="records"))}))
    else:
        _print_tables({"ln_removal_eval": tables["ln_removal_eval"]}, "table", run_path)
        print(f"norm-free model: {result.norm_free_model} (load it with --model {result.norm_free_model})")
    if save_error:
        raise UserError(f"the run was not saved in {args.runs_dir}: {save_error}")
    return 0
