"""What LN removal keeps on disk: its checkpoints, the norm-free model, and where both go.

Neither ever lives inside the run store (DESIGN section 7): the store lists every folder it
holds as a run, and `layerscope runs rm` deletes them.  By default both go to
`ln-removal/` beside the run store (`./ln-removal/` for the default `./runs/`).  Every
folder is checked before any training, so a bad path costs no compute.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from layerscope.probes.errors import UserError
from layerscope.probes.files import _umask, atomic_path, publish_dir, safe_name
from layerscope.probes.families import get_module
from layerscope.probes.interventions import FrozenNorm, swap_module
from layerscope.probes.zoo import FROZEN_NORMS_FILE, LoadedModel

CHECKPOINT_FORMAT = 2
WORK_FOLDER = "ln-removal"
REMOVAL_CHECKPOINT = "removal.pt"
CONTROL_CHECKPOINT = "control.pt"
# A temporary file or folder untouched this long is a leftover of a killed writer: a live
# one writes to it continuously and renames it within seconds of finishing.
STALE_SECONDS = 600


# ---------------------------------------------------------------- where things go

@dataclass(frozen=True)
class RemovalPaths:
    """The checkpoint folder (removal and control checkpoints) and the norm-free model folder."""

    checkpoint_dir: Path
    output: Path

    @property
    def removal(self) -> Path:
        return self.checkpoint_dir / REMOVAL_CHECKPOINT

    @property
    def control(self) -> Path:
        return self.checkpoint_dir / CONTROL_CHECKPOINT


def default_folder(runs_dir: Path | str) -> Path:
    """`ln-removal/` beside the run store: its sibling, never inside it."""
    runs = Path(runs_dir)
    if runs.name in ("", ".", ".."):
        runs = runs.resolve()
    return runs.parent / WORK_FOLDER


def _inside(path: Path | str, folder: Path | str) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _check_outside_store(path: Path, runs_dir: Path | str, flag: str) -> None:
    if _inside(path, runs_dir):
        raise UserError(f"{flag} {path} is inside the run store {runs_dir}, which lists and deletes what it holds "
                        f"as runs; keep models and checkpoints outside it (e.g. {default_folder(runs_dir)})")


def _check_can_be_folder(path: Path, flag: str) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be written: {existing} is not writable")


def is_norm_free_folder(path: Path) -> bool:
    return (Path(path) / FROZEN_NORMS_FILE).is_file()


def check_replaceable_model_folder(path: Path, flag: str = "--output") -> None:
    """The norm-free model replaces its folder wholesale, so the folder must be new, empty,
    or a norm-free model saved before."""
    _check_can_be_folder(path, flag)
    if path.is_dir() and any(path.iterdir()) and not is_norm_free_folder(path):
        raise UserError(f"{flag} {path} is a folder that holds something other than a norm-free model; "
                        "it would be replaced: choose a new folder")


def plan_paths(runs_dir: Path | str, model_name: str, checkpoint_dir: Path | str | None = None,
               output: Path | str | None = None, resume: bool = False) -> RemovalPaths:
    """Resolve the default folders and check them all before any work: outside the run
    store, folders rather than files, a model folder that may be replaced, and checkpoints
    that match `resume` (present to resume, absent to start)."""
    base = default_folder(runs_dir)
    paths = RemovalPaths(Path(checkpoint_dir) if checkpoint_dir is not None else base / safe_name(model_name),
                         Path(output) if output is not None else base / f"{safe_name(model_name)}-norm-free")
    _check_outside_store(paths.checkpoint_dir, runs_dir, "--checkpoint-dir")
    _check_outside_store(paths.output, runs_dir, "--output")
    _check_can_be_folder(paths.checkpoint_dir, "--checkpoint-dir")
    check_replaceable_model_folder(paths.output)
    if _inside(paths.checkpoint_dir, paths.output):
        raise UserError(f"--output {paths.output} would hold --checkpoint-dir {paths.checkpoint_dir}, and saving "
                        "the model replaces that folder: choose separate folders")
    for checkpoint in (paths.removal, paths.control):
        if checkpoint.is_dir():
            raise UserError(f"{checkpoint} is a folder, not a checkpoint file: choose another --checkpoint-dir")
    remove_stale_temporaries(paths.checkpoint_dir)
    remove_stale_temporaries(paths.output.parent, f".{paths.output.name}")
    if resume and not paths.removal.exists():
        raise UserError(f"--resume: no checkpoint in {paths.checkpoint_dir}")
    if not resume and (paths.removal.exists() or paths.control.exists()):
        raise UserError(f"{paths.checkpoint_dir} already holds checkpoints: continue with --resume, "
                        "or delete them or choose another --checkpoint-dir")
    return paths


# ---------------------------------------------------------------- checkpoints

def remove_stale_temporaries(folder: Path, prefix: str = ".", older_than: float = STALE_SECONDS) -> list[Path]:
    """Delete what a writer killed mid-write left in `folder`: the temporary files of
    checkpoints (`.removal.pt.*.tmp`) and the staging folders of a norm-free model
    (`.<name>-*`, `.<name>.old-*`) that nobody has touched for `older_than` seconds."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        checkpoint_tmp = re.fullmatch(rf"\.({re.escape(REMOVAL_CHECKPOINT)}|{re.escape(CONTROL_CHECKPOINT)})"
                                      r"\.[a-z0-9_]{8}\.tmp", name)
        # Exactly the names mkdtemp and save_norm_free give, so that nothing else is touched.
        model_staging = prefix != "." and re.fullmatch(rf"{re.escape(prefix)}(-[a-z0-9_]{{8}}|\.old-\d+)", name)
        if not (checkpoint_tmp or model_staging):
            continue
        try:
            if now - entry.lstat().st_mtime < older_than:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue
    return removed


def save_checkpoint(state: dict, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # unpickling raises many types
        raise UserError(f"checkpoint {path} cannot be read: {str(err).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} is not an LN-removal checkpoint of format {CHECKPOINT_FORMAT}")
    return state


# What a stopped run may change when it resumes: the remedies a non-finite loss suggests.
# They act from the resumed step on, and the loss history's lr column shows the rate used.
RETUNABLE_ON_RESUME = ("lr", "grad_clip", "max_skipped")


def check_resumable(state: dict, path: Path, loaded: LoadedModel, config, data: dict, remove: bool) -> None:
    """A checkpoint resumes only the run that wrote it: same model, kind and settings, but
    for `RETUNABLE_ON_RESUME`."""
    if state["model"] != loaded.spec.name or state["weights_hash"] != loaded.weights_hash:
        raise UserError(f"--resume: checkpoint {path} is a run for model {state['model']!r}, "
                        f"not {loaded.spec.name!r}; pass the same --model or another --checkpoint-dir")
    if state["remove"] != remove:
        raise UserError(f"--resume: checkpoint {path} is a {'removal' if state['remove'] else 'control'} run")
    changed = [k for k, v in asdict(config).items() if state["config"].get(k) != v and k not in RETUNABLE_ON_RESUME]
    changed += [k for k, v in data.items() if state["data"].get(k) != v]
    if changed:
        raise UserError(f"--resume: settings differ from the checkpoint's ({', '.join(changed)}); "
                        f"resume with the same command (only {', '.join(RETUNABLE_ON_RESUME)} may change)")


# ---------------------------------------------------------------- the norm-free model on disk

def save_norm_free(loaded: LoadedModel, target: Path, provenance: dict) -> Path:
    """Write the model as an HF directory with its real norm modules and weights, plus
    `FROZEN_NORMS_FILE` listing each frozen scale; `zoo.load_model(target)` puts the frozen
    norms back.  The folder is built beside `target` and renamed into place; an existing
    `target` is replaced only when it is empty or a norm-free model itself."""
    model = loaded.model
    frozen = {path: module for path, module in model.named_modules() if isinstance(module, FrozenNorm)}
    if not frozen:
        raise UserError("the model has no frozen norm to save")
    entries = [{"path": path, "kind": m.kind, "scale": float(m.scale), "first_scale": float(m.first_scale),
                "first_positions": m.first_positions, "weight_offset": m.weight_offset}
               for path, m in frozen.items()]
    target = Path(target)
    check_replaceable_model_folder(target, "the norm-free model folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent, f".{target.name}")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for path, module in frozen.items():
            swap_module(model, path, _real_like(module))
        try:
            model.save_pretrained(staging)
        finally:
            for path, module in frozen.items():
                swap_module(model, path, module)
        loaded.tokenizer.save_pretrained(staging)
        (staging / FROZEN_NORMS_FILE).write_text(json.dumps({"format": 1, "norms": entries, **provenance}, indent=1))
        _respect_umask(staging)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            publish_dir(staging, target)
            shutil.rmtree(old)
        else:
            publish_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _respect_umask(folder: Path) -> None:
    """Give a built folder the modes a plain mkdir and open would have: mkdtemp makes the
    folder 0700, and some writers (safetensors) make their files 0600."""
    mask = _umask()
    for root, dirs, names in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in names:
            path = Path(root) / name
            if not path.is_symlink():
                os.chmod(path, 0o666 & ~mask)


def _real_like(frozen: FrozenNorm) -> torch.nn.Module:
    """The real norm module a frozen one stands in for, carrying its (trained) weights."""
    real = getattr(frozen, "real", None)
    if real is None:
        raise UserError("only norms frozen by LN removal can be saved")
    return real


def restore_frozen_norms(model: torch.nn.Module, spec_file: Path) -> None:
    """Replace the norms listed in a `FROZEN_NORMS_FILE` by `FrozenNorm`s with their scales."""
    try:
        spec = json.loads(Path(spec_file).read_text())
        entries = spec["norms"] if isinstance(spec, dict) else None
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise ValueError("'norms' must be a list of objects")
        for entry in entries:
            numbers = (entry["scale"], entry["first_scale"], entry["weight_offset"])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
                raise ValueError(f"the scales and offset of {entry['path']!r} must be finite numbers")
            if not (entry["scale"] > 0 and entry["first_scale"] > 0) or entry["kind"] not in ("layernorm", "rmsnorm"):
                raise ValueError(f"{entry['path']!r} needs positive scales and a kind of layernorm or rmsnorm")
            # Files written before sink positions existed gave position 0 alone its scale.
            first_positions = entry.get("first_positions", 1)
            if type(first_positions) is not int or not 1 <= first_positions <= 64:
                raise ValueError(f"first_positions of {entry['path']!r} must be an integer in 1..64")
            norm = get_module(model, entry["path"])
            swap_module(model, entry["path"], FrozenNorm(norm, entry["kind"], entry["scale"], entry["first_scale"],
                                                         entry["weight_offset"], first_positions))
    except (OSError, ValueError, KeyError, AttributeError, IndexError, TypeError, RecursionError) as err:
        raise UserError(f"{spec_file} does not describe this model's norms: {err}") from None
