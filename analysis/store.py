"""The run store: `runs/<run_id>/` with `manifest.json` and one Parquet table per result.

A run is written into a hidden staging folder `.<run_id>.<random>/` and renamed into
place when complete, so a crash never leaves a folder that looks like a finished run.
The staging folder names its writer (pid and host) in `.owner`: while that process lives
the run lists as `running`; once it is gone the leftover lists as `interrupted`.  Run ids
carry a random suffix and every writer has its own staging folder, so concurrent runs
never clash; the final rename refuses to replace an existing run.

Only folders that look like runs are listed or removed: a folder with `manifest.json` or
Parquet tables, or a staging folder holding nothing but what a writer puts there.  Any
other folder (a model, checkpoints, a notebook's cache) is not the store's to list or
delete; models and checkpoints belong outside the store anyway (DESIGN section 7).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Iterator

import pandas as pd

from layerscope.probes.errors import UserError
from layerscope.probes.files import publish_dir, safe_name

DEFAULT_ROOT = Path("runs")
MANIFEST = "manifest.json"
OWNER = ".owner"
COMPLETE = "complete"
VERSIONED_PACKAGES = ("layerscope", "torch", "transformers", "transformer-lens", "nnsight")


def new_run_id(metric: str, model: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{metric}-{safe_name(model)}-{uuid.uuid4().hex[:6]}"


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def run_key(identity: dict) -> str:
    """A stable hash of what determines a run's result (model, corpus, metric, settings),
    so that asking again for the same thing finds the stored run."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="microseconds")


def _check_run_id(run_id: str) -> str:
    if not run_id or run_id in (".", "..") or run_id.startswith(".") or "/" in run_id or os.sep in run_id:
        raise UserError(f"{run_id!r} is not a run id (see `layerscope runs list`)")
    return run_id


def _check_table_name(name: str) -> str:
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise UserError(f"{name!r} is not a valid table name")
    return name


class RunWriter:
    """Collects a run's tables in its staging folder; `open_run` publishes them."""

    def __init__(self, run_id: str, path: Path, staging: Path, manifest: dict):
        self.run_id = run_id
        self.path = path
        self.staging = staging
        self.manifest = manifest
        self.tables: list[str] = []

    def add_tables(self, tables: dict[str, pd.DataFrame]) -> None:
        for name, table in tables.items():
            table.to_parquet(self.staging / f"{_check_table_name(name)}.parquet", index=False)
            if name not in self.tables:
                self.tables.append(name)

    def write_manifest(self, status: str) -> None:
        manifest = {**self.manifest, "status": status, "tables": sorted(self.tables)}
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


@contextlib.contextmanager
def open_run(manifest: dict, root: Path = DEFAULT_ROOT, run_id: str | None = None) -> Iterator[RunWriter]:
    """Stage a run while it is computed and written; on a clean exit rename it into place.

    An exception removes the staging folder; a hard crash leaves it, and it then lists as
    interrupted.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model_name = manifest.get("model", {}).get("model", "model")
    run_id = _check_run_id(run_id or new_run_id(manifest.get("metric", "run"), model_name))
    staging = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; a finished run is read by whoever reads the store
    (staging / OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    writer = RunWriter(run_id, root / run_id, staging, {**manifest, "run_id": run_id, "created": _now()})
    try:
        writer.write_manifest("running")
        yield writer
        writer.manifest["finished"] = _now()
        writer.write_manifest(COMPLETE)
        (staging / OWNER).unlink()
        try:
            # Renaming onto an existing run fails because a run folder is never empty.
            publish_dir(staging, writer.path)
        except OSError:
            raise UserError(f"run {run_id!r} already exists in {root}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_run(tables: dict[str, pd.DataFrame], manifest: dict, root: Path = DEFAULT_ROOT,
             run_id: str | None = None) -> Path:
    """Write tables and manifest atomically; returns the run folder."""
    with open_run(manifest, root, run_id) as writer:
        writer.add_tables(tables)
    return writer.path


def _writer_alive(staging: Path) -> tuple[bool, int | None]:
    try:
        owner = json.loads((staging / OWNER).read_text())
    except (OSError, ValueError):
        return False, None
    if owner.get("host") != socket.gethostname():
        return True, owner.get("pid")  # cannot see another machine's processes; assume it still runs
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False, owner["pid"]
    except PermissionError:
        pass  # the process exists but belongs to someone else
    return True, owner["pid"]


def _is_staging(folder: Path) -> bool:
    """`.<run_id>.<random>` holding only what `open_run` writes (possibly nothing yet)."""
    stem, dot, suffix = folder.name[1:].rpartition(".")
    if not (folder.name.startswith(".") and stem and dot and suffix):
        return False
    try:
        return all(entry.name in (OWNER, MANIFEST) or entry.suffix == ".parquet" for entry in folder.iterdir())
    except OSError:
        return False


def _is_run_folder(folder: Path) -> bool:
    """A run, complete or damaged, or a run's staging folder; never a model or checkpoint folder."""
    if folder.name.startswith("."):
        return _is_staging(folder)
    try:
        return (folder / MANIFEST).exists() or any(entry.suffix == ".parquet" for entry in folder.iterdir())
    except OSError:
        return False


def _not_a_run(folder: Path) -> UserError:
    return UserError(f"{folder} is not a run (it holds no manifest.json or tables); "
                     "layerscope does not read or remove it")


def _describe(folder: Path) -> dict:
    if folder.name.startswith("."):
        alive, pid = _writer_alive(folder)
        run_id = folder.name[1:].rsplit(".", 1)[0]
        if alive:
            return {"run_id": run_id, "status": "running", "pid": pid, "path": str(folder)}
        return {"run_id": run_id, "status": "interrupted", "problem": "staging folder left by a crash",
                "path": str(folder)}
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        tables = [_check_table_name(name) for name in manifest["tables"]]
        model = manifest.get("model", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as err:
        return {"run_id": folder.name, "status": "corrupt", "problem": f"manifest.json unreadable: {err}",
                "path": str(folder)}
    missing = [name for name in tables if not (folder / f"{name}.parquet").is_file()]
    status, problem = COMPLETE, None
    if manifest.get("status") != COMPLETE:
        status, problem = "interrupted", f"manifest status is {manifest.get('status')!r}"
    elif missing:
        status, problem = "corrupt", f"missing tables: {', '.join(missing)}"
    row = {"run_id": folder.name, "status": status, "metric": manifest.get("metric"),
           "model": model.get("model") if isinstance(model, dict) else None,
           "created": manifest.get("created"), "key": manifest.get("key"), "path": str(folder)}
    if problem:
        row["problem"] = problem
    return row


def list_runs(root: Path = DEFAULT_ROOT) -> list[dict]:
    """Every run with its status: complete, running, interrupted (a staging folder whose
    writer is gone, or a manifest whose status is not complete) or corrupt."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [_describe(folder) for folder in sorted(root.iterdir()) if folder.is_dir() and _is_run_folder(folder)]


def find_run(key: str, root: Path = DEFAULT_ROOT) -> str | None:
    """The newest complete run stored under `key`, if any."""
    matches = [row for row in list_runs(root) if row["status"] == COMPLETE and row.get("key") == key]
    if not matches:
        return None
    return max(matches, key=lambda row: row.get("created") or "")["run_id"]


def latest_run(root: Path = DEFAULT_ROOT) -> str:
    """The newest complete run, for commands given `latest` instead of a run id."""
    complete = [row for row in list_runs(root) if row["status"] == COMPLETE]
    if not complete:
        raise UserError(f"no complete run in {root}")
    return max(complete, key=lambda row: row.get("created") or "")["run_id"]


def load_run(run_id: str, root: Path = DEFAULT_ROOT) -> tuple[dict, dict[str, pd.DataFrame]]:
    """The manifest and tables of a complete run; a readable UserError for anything else."""
    folder = Path(root) / _check_run_id(run_id)
    if not folder.is_dir():
        staged = [row for row in list_runs(root) if row["run_id"] == run_id]
        if staged:
            raise UserError(f"run {run_id!r} is {staged[0]['status']}, not complete; "
                            f"remove it with `layerscope runs rm {run_id}`")
        raise UserError(f"run {run_id!r} not found in {root}")
    if not _is_run_folder(folder):
        raise _not_a_run(folder)
    row = _describe(folder)
    if row["status"] != COMPLETE:
        raise UserError(f"run {run_id!r} is {row['status']} ({row['problem']}); "
                        f"remove it with `layerscope runs rm {run_id}`")
    manifest = json.loads((folder / MANIFEST).read_text())
    try:
        tables = {name: pd.read_parquet(folder / f"{name}.parquet") for name in manifest["tables"]}
    except (OSError, ValueError) as err:
        raise UserError(f"run {run_id!r} is corrupt: a table cannot be read ({str(err).splitlines()[0]}); "
                        f"remove it with `layerscope runs rm {run_id}`") from None
    return manifest, tables


def remove_run(run_id: str, root: Path = DEFAULT_ROOT) -> list[Path]:
    """Delete a run, or the staging leftovers of an interrupted one; refuses a running one."""
    root = Path(root)
    folder = root / _check_run_id(run_id)
    if folder.is_dir():
        if not _is_run_folder(folder):
            raise _not_a_run(folder)
        shutil.rmtree(folder)
        return [folder]
    leftovers = [row for row in list_runs(root) if row["run_id"] == run_id and row["path"] != str(folder)]
    running = [row for row in leftovers if row["status"] == "running"]
    if running:
        raise UserError(f"run {run_id!r} is still being written by process {running[0]['pid']}")
    if not leftovers:
        raise UserError(f"run {run_id!r} not found in {root}")
    for row in leftovers:
        shutil.rmtree(row["path"])
    return [Path(row["path"]) for row in leftovers]


def export_run(run_id: str, target: Path, root: Path = DEFAULT_ROOT) -> Path:
    """Copy a complete run out as CSV tables plus its manifest, into a new or empty folder."""
    manifest, tables = load_run(run_id, root)
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"export target {target} exists and is not an empty folder")
    target.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        table.to_csv(target / f"{name}.csv", index=False)
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return target
