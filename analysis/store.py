"""The run store: `runs/<run_id>/` with `manifest.json` and one Parquet table per result.

A run is written into a hidden staging folder `.<run_id>.<random>/` and renamed into
place when complete, so a crash never leaves a folder that looks like a finished run.
The staging folder names its writer (pid and host) in `.owner`, which the writer holds
locked (`flock`) for as long as it lives and touches every `HEARTBEAT_SECONDS`: while the
lock is held, or on another host while the heartbeat is recent, the run lists as
`running`; otherwise the leftover lists as `interrupted` and `runs rm` removes it (a
reused pid or a dead host cannot keep a run "running" forever; `runs rm --force`
removes one anyway).  Run ids carry a random suffix and every writer has its own staging
folder, so concurrent runs never clash; the final rename refuses to replace a run.

Every read of a run is checked: the manifest against a schema (`read_manifest`), each
table against the sha256 the manifest recorded when it was written.  A run that fails
lists as corrupt, with the reason, and never stops the others from listing or loading.

Only folders that look like runs are listed or removed: a folder with `manifest.json` or
Parquet tables, or a staging folder holding nothing but what a writer puts there.  Any
other folder (a model, checkpoints, a notebook's cache) is not the store's to list or
delete; models and checkpoints belong outside the store anyway (DESIGN section 7).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from layerscope.probes.errors import UserError
from layerscope.probes.files import JSONFileError, _umask, publish_dir, read_json_capped, safe_name, sync_dir

if TYPE_CHECKING:
    import pandas as pd

try:
    import fcntl
except ImportError:  # not on Windows: fall back to asking whether the pid lives
    fcntl = None

DEFAULT_ROOT = Path("runs")
MANIFEST = "manifest.json"
OWNER = ".owner"
COMPLETE = "complete"
VERSIONED_PACKAGES = ("layerscope", "torch", "transformers", "transformer-lens", "nnsight")
# A writer touches its `.owner` this often; a writer on another host whose heartbeat is
# older than LEASE_SECONDS is taken to be gone (its lock cannot be seen from here).
HEARTBEAT_SECONDS = 15.0
LEASE_SECONDS = 120.0
# A manifest is a few kB; these bound what a damaged or hostile one can cost to read.
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_MANIFEST_DEPTH = 32


def new_run_id(metric: str, model: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{safe_name(metric)}-{safe_name(model)}-{uuid.uuid4().hex[:6]}"


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
    if (not isinstance(run_id, str) or not run_id or run_id in (".", "..") or run_id.startswith(".")
            or "/" in run_id or os.sep in run_id or "\0" in run_id):
        raise UserError(f"{run_id!r} is not a run id (see `layerscope runs list`)")
    return run_id


def _valid_table_name(name) -> bool:
    return (isinstance(name, str) and bool(name) and not name.startswith(".") and "/" not in name
            and os.sep not in name and "\0" not in name)


def _check_table_name(name: str) -> str:
    if not _valid_table_name(name):
        raise UserError(f"{name!r} is not a valid table name")
    return name


# ---------------------------------------------------------------- reading manifests

class ManifestError(ValueError):
    """A manifest that cannot be read or does not follow the schema; the message is one line."""


_NUMBER = (int, float)
# field: (accepted types, required).  Anything else in a manifest is kept as it is.
MANIFEST_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "metric": ((str,), True),
    "status": ((str,), True),
    "tables": ((list,), True),
    "run_id": ((str,), False),
    "created": ((str,), False),
    "finished": ((str,), False),
    "model": ((dict,), False),
    "corpus": ((dict,), False),
    "options": ((dict,), False),
    "changed_options": ((dict,), False),
    "backend": ((str,), False),
    "versions": ((dict,), False),
    "timings": ((dict,), False),
    "notes": ((list,), False),
    "tables_by_metric": ((dict,), False),
    "table_sha256": ((dict,), False),
    "capture_passes": ((int,), False),
    "key": ((str, type(None)), False),
    "warnings": ((list,), False),
}


def _type_names(types: tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is(value, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _check_tree(manifest) -> None:
    """Bounded depth, and text that can be printed: no lone surrogates from `\\udXXX` escapes."""
    stack = [(manifest, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_MANIFEST_DEPTH:
            raise ManifestError(f"nested deeper than {MAX_MANIFEST_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((key, depth) for key in value)
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ManifestError(f"holds text that is not valid Unicode ({value[:20]!r})") from None


def validate_manifest(manifest) -> dict:
    """The manifest if it follows the run schema, else a `ManifestError` saying where it does not."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"is {_type_names((type(manifest),))}, not an object")
    _check_tree(manifest)
    for name, (types, required) in MANIFEST_FIELDS.items():
        if name not in manifest:
            if required:
                raise ManifestError(f"has no {name!r}")
            continue
        if not _is(manifest[name], types):
            raise ManifestError(f"{name!r} is {_type_names((type(manifest[name]),))}, not {_type_names(types)}")
    tables = manifest["tables"]
    if not all(_valid_table_name(t) for t in tables) or len(set(tables)) != len(tables):
        raise ManifestError("'tables' must list distinct table names")
    model = manifest.get("model", {})
    if "model" in model and not _is(model["model"], (str,)):
        raise ManifestError("'model.model' is not a string")
    for name, types, what in (("options", (dict,), "an object per measurement"),
                              ("changed_options", (dict,), "an object per measurement"),
                              ("tables_by_metric", (list,), "a list of table names per measurement"),
                              ("timings", (*_NUMBER, type(None)), "a number (or null) per stage"),
                              ("versions", (str,), "a string per package"),
                              ("table_sha256", (str,), "a hex digest per table")):
        if any(not _is(value, types) for value in manifest.get(name, {}).values()):
            raise ManifestError(f"{name!r} must hold {what}")
    if any(not all(isinstance(t, str) and t in tables for t in listed)
           for listed in manifest.get("tables_by_metric", {}).values()):
        raise ManifestError("'tables_by_metric' names a table the run does not hold")
    for name in ("notes", "warnings"):
        if not all(isinstance(line, str) for line in manifest.get(name, [])):
            raise ManifestError(f"{name!r} must be a list of strings")
    if any(isinstance(v, float) and not math.isfinite(v) for v in manifest.get("timings", {}).values()):
        raise ManifestError("'timings' must be finite")
    return manifest


def read_manifest(folder: Path) -> dict:
    """A run folder's manifest, parsed and checked against the schema (`validate_manifest`);
    a `ManifestError` with a one-line reason for anything else."""
    try:
        manifest = read_json_capped(Path(folder) / MANIFEST, MAX_MANIFEST_BYTES)
    except OSError as err:
        raise ManifestError(err.strerror or str(err)) from None
    except JSONFileError as err:
        raise ManifestError(str(err)) from None
    return validate_manifest(manifest)


# ---------------------------------------------------------------- table checksums

_HASHES: dict[tuple, str] = {}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size, times and inode stay the same, so that
    listing a store every time the app redraws does not read every table again."""
    stat = path.stat()
    key = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        if len(_HASHES) > 4096:
            _HASHES.clear()
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _table_problem(folder: Path, manifest: dict) -> str | None:
    """Why the tables do not match the manifest (missing, not a file, or a sha256 other
    than the one recorded when they were written), or None."""
    tables, recorded = manifest["tables"], manifest.get("table_sha256", {})
    missing = [name for name in tables if not (folder / f"{name}.parquet").exists()]
    if missing:
        return f"missing tables: {', '.join(missing)}"
    unrecorded = [name for name in tables if name not in recorded]
    if unrecorded:
        return f"no sha256 recorded for table(s) {', '.join(unrecorded)}"
    for name in tables:
        path = folder / f"{name}.parquet"
        if path.is_symlink() or not path.is_file():
            return f"table {name} is not a regular file"
        try:
            digest = _file_sha256(path)
        except OSError as err:
            return f"table {name} cannot be read ({err.strerror or err})"
        if digest != recorded[name]:
            return f"table {name} does not match its recorded sha256 (truncated or damaged)"
    return None


# ---------------------------------------------------------------- writing runs

class _Lease:
    """The writer's claim on a staging folder: `.owner` names the pid and host, is held
    under `flock` while the writer lives (the kernel drops the lock when it dies, whatever
    later reuses its pid), and is touched every `HEARTBEAT_SECONDS` for readers on other hosts."""

    def __init__(self, staging: Path):
        self.path = staging / OWNER
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}).encode())
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="layerscope-run-lease", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self.fd)

    def release(self) -> None:
        self._stop.set()
        self._beat.join()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C back for a few statements, so that a folder is never made without the
    code that removes it on an error knowing about it.  The handler is swapped rather than
    the signal blocked: another thread would take a blocked signal and interrupt us anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread ever sees KeyboardInterrupt
        return
    held: list[tuple] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            if callable(previous):
                previous(*held[0])  # Python's own handler raises KeyboardInterrupt here
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


class RunWriter:
    """Collects a run's tables in its staging folder; `open_run` publishes them."""

    def __init__(self, run_id: str, path: Path, staging: Path, manifest: dict):
        self.run_id = run_id
        self.path = path
        self.staging = staging
        self.manifest = manifest
        self.tables: list[str] = []
        self.sha256: dict[str, str] = {}

    def add_tables(self, tables: dict[str, pd.DataFrame]) -> None:
        for name, table in tables.items():
            buffer = io.BytesIO()
            table.to_parquet(buffer, index=False)
            data = buffer.getvalue()
            with open(self.staging / f"{_check_table_name(name)}.parquet", "wb") as handle:
                handle.write(data)
            self.sha256[name] = sha256_bytes(data)
            if name not in self.tables:
                self.tables.append(name)

    def write_manifest(self, status: str) -> None:
        manifest = {**self.manifest, "status": status, "tables": sorted(self.tables),
                    "table_sha256": {name: self.sha256[name] for name in sorted(self.tables)}}
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


@contextlib.contextmanager
def open_run(manifest: dict, root: Path | str = DEFAULT_ROOT, run_id: str | None = None) -> Iterator[RunWriter]:
    """Stage a run while it is computed and written; on a clean exit rename it into place.

    An exception (Ctrl-C included) removes the staging folder; a hard crash leaves it, and
    it then lists as interrupted.
    """
    root = _check_root(root)
    root.mkdir(parents=True, exist_ok=True)
    model = manifest.get("model")
    model_name = model.get("model", "model") if isinstance(model, dict) else "model"
    run_id = _check_run_id(run_id or new_run_id(str(manifest.get("metric", "run")), str(model_name)))
    staging, lease = None, None
    try:
        with _interrupts_held():
            staging = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=root))
            lease = _Lease(staging)
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a run is read by whoever reads the store
        writer = RunWriter(run_id, root / run_id, staging, {**manifest, "run_id": run_id, "created": _now()})
        writer.write_manifest("running")
        yield writer
        writer.manifest["finished"] = _now()
        writer.write_manifest(COMPLETE)
        try:
            # Renaming onto an existing run fails because a run folder is never empty.  The
            # lease goes along and is dropped once the run is in place, so no reader ever
            # sees the staging folder without its writer.
            publish_dir(staging, writer.path)
        except OSError:
            if writer.path.exists():
                raise UserError(f"run {run_id!r} already exists in {root}") from None
            raise
        staging = None
        (writer.path / OWNER).unlink()
        sync_dir(writer.path)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if lease is not None:
            lease.release()


def save_run(tables: dict[str, pd.DataFrame], manifest: dict, root: Path | str = DEFAULT_ROOT,
             run_id: str | None = None) -> Path:
    """Write tables and manifest atomically; returns the run folder."""
    with open_run(manifest, root, run_id) as writer:
        writer.add_tables(tables)
    return writer.path


# ---------------------------------------------------------------- listing runs

def _lock_held(path: Path) -> bool | None:
    """Whether some process holds `path` under flock; None when that cannot be told."""
    if fcntl is None:
        return None
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(handle)


def _writer_alive(staging: Path) -> tuple[bool, int | None]:
    path = staging / OWNER
    try:
        owner = json.loads(path.read_text())
        if not isinstance(owner, dict):
            raise ValueError("not an object")
    except (OSError, ValueError, RecursionError):
        return False, None
    pid = owner.get("pid") if isinstance(owner.get("pid"), int) and not isinstance(owner.get("pid"), bool) else None
    locked = _lock_held(path)
    if locked:
        return True, pid
    if owner.get("host") != socket.gethostname():
        # Another machine's lock may not be visible here: trust its heartbeat for a while.
        try:
            age = time.time() - path.stat().st_mtime
        except OSError:
            return False, pid
        return age < LEASE_SECONDS, pid
    if locked is False or pid is None:
        return False, pid
    try:  # no flock on this system: whether the pid lives is the best guess
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, pid
    except (PermissionError, OverflowError, ValueError):
        pass
    return True, pid


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


def _inspect(folder: Path) -> tuple[dict, dict | None]:
    """A run folder's row for `list_runs`, and its checked manifest when the run is complete."""
    if folder.name.startswith("."):
        alive, pid = _writer_alive(folder)
        run_id = folder.name[1:].rsplit(".", 1)[0]
        if alive:
            return {"run_id": run_id, "status": "running", "pid": pid, "path": str(folder)}, None
        return {"run_id": run_id, "status": "interrupted", "problem": "staging folder left by a crash",
                "path": str(folder)}, None
    try:
        manifest = read_manifest(folder)
    except ManifestError as err:
        return {"run_id": folder.name, "status": "corrupt", "problem": f"manifest.json unreadable: {err}",
                "path": str(folder)}, None
    status, problem = COMPLETE, None
    if manifest["status"] != COMPLETE:
        status, problem = "interrupted", f"manifest status is {manifest['status']!r}"
    else:
        problem = _table_problem(folder, manifest)
        status = "corrupt" if problem else COMPLETE
    row = {"run_id": folder.name, "status": status, "metric": manifest["metric"],
           "model": manifest.get("model", {}).get("model"), "created": manifest.get("created"),
           **corpus_summary(manifest), "options": options_summary(manifest),
           "key": manifest.get("key"), "path": str(folder),
           "metrics": list(manifest.get("tables_by_metric") or {})}
    if problem:
        row["problem"] = problem
    if manifest.get("warnings"):
        row["warnings"] = len(manifest["warnings"])
    return row, manifest if status == COMPLETE else None


def corpus_summary(manifest: dict) -> dict:
    """A run's corpus as `runs list` shows it: the source, the tokens measured, and the
    windows they were cut into.  A fine-tuning run (LayerNorm removal) names its training corpus."""
    corpus = manifest.get("corpus") or {}
    if isinstance(corpus.get("train"), dict):
        corpus = corpus["train"]

    def number(name):
        value = corpus.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    source = corpus.get("source")
    return {"corpus": source if isinstance(source, str) else None, "tokens": number("tokens"),
            "windows": number("windows"), "seq_len": number("seq_len")}


def options_summary(manifest: dict) -> str:
    """The options a run set away from their defaults, as `name=value` (prefixed with the
    measurement in a run of several); empty when every option kept its default, or for a run
    stored before the manifest recorded them."""
    changed = manifest.get("changed_options") or {}
    several = len(manifest.get("options") or changed) > 1
    return " ".join(f"{metric + '.' if several else ''}{name}={value}"
                    for metric, options in changed.items() if isinstance(options, dict)
                    for name, value in options.items())


def _describe(folder: Path) -> dict:
    return _inspect(folder)[0]


def _check_root(root: Path | str) -> Path:
    if "\0" in str(root):
        raise UserError(f"run store {str(root)!r} contains a NUL byte")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"run store {root} is a file, not a folder")
    return root


def list_runs(root: Path | str = DEFAULT_ROOT) -> list[dict]:
    """Every run with its status: complete, running, interrupted (a staging folder whose
    writer is gone, or a manifest whose status is not complete) or corrupt (a manifest
    that breaks the schema, or tables missing or not matching their recorded sha256)."""
    root = _check_root(root)
    if not root.is_dir():
        return []
    try:
        folders = sorted(root.iterdir())
    except OSError as err:
        raise UserError(f"run store {root} cannot be read: {err.strerror or err}") from None
    return [_describe(folder) for folder in folders if folder.is_dir() and _is_run_folder(folder)]


def newest_first(rows: list[dict]) -> list[dict]:
    """Rows of `list_runs`, the newest first (by creation time, to the microsecond)."""
    return sorted(rows, key=lambda row: row.get("created") or "", reverse=True)


def runs_with_key(key: str, root: Path | str = DEFAULT_ROOT) -> list[dict]:
    """The rows of every run stored under `key` whose manifest can be read, newest first:
    complete ones, and those whose tables were damaged after they were written."""
    return newest_first([row for row in list_runs(root) if row.get("key") == key])


def find_run(key: str, root: Path | str = DEFAULT_ROOT) -> str | None:
    """The newest complete run stored under `key`, if any."""
    matches = [row for row in runs_with_key(key, root) if row["status"] == COMPLETE]
    return matches[0]["run_id"] if matches else None


def latest_run(root: Path | str = DEFAULT_ROOT) -> str:
    """The newest complete run, for commands given `latest` instead of a run id."""
    complete = [row for row in list_runs(root) if row["status"] == COMPLETE]
    if not complete:
        raise UserError(f"no complete run in {root}")
    return newest_first(complete)[0]["run_id"]


LATEST = "latest"


def resolve_run_id(run_id: str, root: Path | str = DEFAULT_ROOT) -> str:
    """`run_id` itself, or for "latest" the newest complete run's id; every command that
    takes a run id accepts "latest"."""
    return latest_run(root) if run_id == LATEST else run_id


def load_latest(root: Path | str = DEFAULT_ROOT) -> tuple[str, dict, dict[str, pd.DataFrame], list[str]]:
    """The newest run that loads, with its manifest and tables, and one line for each newer
    run skipped because it could not be read."""
    skipped = []
    for row in newest_first([row for row in list_runs(root) if row["status"] == COMPLETE]):
        try:
            manifest, tables = load_run(row["run_id"], root)
        except UserError as err:
            skipped.append(str(err))
            continue
        return row["run_id"], manifest, tables, skipped
    raise UserError(f"no readable complete run in {root}" + (f" ({len(skipped)} damaged)" if skipped else ""))


def _read_table(folder: Path, name: str, recorded: str) -> pd.DataFrame:
    # Read once, check that very content against its sha256, then parse it.
    with open(folder / f"{name}.parquet", "rb") as handle:
        data = handle.read()
    if sha256_bytes(data) != recorded:
        raise ValueError(f"table {name} does not match its recorded sha256 (truncated or damaged)")
    import pandas as pd  # here, so that listing runs does not pay for importing pandas

    return pd.read_parquet(io.BytesIO(data))


def load_run(run_id: str, root: Path | str = DEFAULT_ROOT) -> tuple[dict, dict[str, pd.DataFrame]]:
    """The manifest and tables of a complete run; a readable UserError for anything else."""
    root = _check_root(root)
    folder = root / _check_run_id(run_id)
    if not folder.is_dir():
        staged = [row for row in list_runs(root) if row["run_id"] == run_id]
        if staged:
            raise UserError(f"run {run_id!r} is {staged[0]['status']}, not complete; "
                            f"remove it with `layerscope runs rm {run_id}`")
        raise UserError(f"run {run_id!r} not found in {root}")
    if not _is_run_folder(folder):
        raise _not_a_run(folder)
    row, manifest = _inspect(folder)
    if manifest is None:
        if row["problem"].startswith("table "):
            raise UserError(f"run {run_id!r} is corrupt: a table cannot be read ({row['problem']}); "
                            f"remove it with `layerscope runs rm {run_id}`")
        raise UserError(f"run {run_id!r} is {row['status']} ({row['problem']}); "
                        f"remove it with `layerscope runs rm {run_id}`")
    try:
        tables = {name: _read_table(folder, name, manifest["table_sha256"][name]) for name in manifest["tables"]}
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"run {run_id!r} is corrupt: a table cannot be read ({reason}); "
                        f"remove it with `layerscope runs rm {run_id}`") from None
    return manifest, tables


# ---------------------------------------------------------------- removing and exporting

def _remove_tree(path: Path) -> None:
    try:
        if path.is_symlink():
            path.unlink()  # a link is removed, never what it points at
        else:
            shutil.rmtree(path)
    except OSError as err:
        raise UserError(f"could not remove {path}: {err.strerror or err}") from None


def removal_targets(run_id: str, root: Path | str = DEFAULT_ROOT, force: bool = False) -> list[Path]:
    """What `remove_run` would delete, or the `UserError` it would raise, deleting nothing:
    so that a person is asked only about something that can be removed."""
    root = _check_root(root)
    folder = root / _check_run_id(run_id)
    if folder.is_symlink():
        return [folder]
    if folder.is_dir():
        if not _is_run_folder(folder):
            raise _not_a_run(folder)
        return [folder]
    leftovers = [row for row in list_runs(root) if row["run_id"] == run_id and row["path"] != str(folder)]
    running = [row for row in leftovers if row["status"] == "running"]
    if running and not force:
        raise UserError(f"run {run_id!r} is still being written by process {running[0]['pid']}; "
                        f"if that process is gone, remove it with `layerscope runs rm --force {run_id}`")
    if not leftovers:
        raise UserError(f"run {run_id!r} not found in {root}")
    return [Path(row["path"]) for row in leftovers]


def remove_run(run_id: str, root: Path | str = DEFAULT_ROOT, force: bool = False) -> list[Path]:
    """Delete a run, or the staging leftovers of an interrupted one.  A run still being
    written is refused unless `force`; a run folder that is a symlink is unlinked and
    what it points at is left alone."""
    targets = removal_targets(run_id, root, force)
    for path in targets:
        _remove_tree(path)
    return targets


def export_run(run_id: str, target: Path, root: Path | str = DEFAULT_ROOT) -> Path:
    """Copy a complete run out as CSV tables plus its manifest, into a new or empty folder."""
    manifest, tables = load_run(run_id, root)
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"export target {target} exists and is not an empty folder")
    from layerscope.probes.files import write_atomic

    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, table in tables.items():
            write_atomic(target / f"{name}.csv", table.to_csv(index=False))
        write_atomic(target / MANIFEST, json.dumps(manifest, indent=2, default=str))
    except OSError as err:
        raise UserError(f"could not export to {target}: {err.strerror or err}") from None
    return target
