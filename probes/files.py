"""Writing files and folders so that a crash or power loss never leaves half of one.

A file is written to a temporary name in its own folder, synced, and renamed over the
target; a folder is built under a temporary name, every file in it synced, then renamed
into place.  The containing folder is synced after each rename, as SQLite does, so the
rename itself survives a power loss.  New files respect the umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def safe_name(text: str) -> str:
    """A file-name-safe form of a model name or path: its last part, with anything but
    letters, digits and `-_.` replaced by `_`."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(text).name or text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sync_dir(folder: Path) -> None:
    """fsync a folder, so the names created or renamed in it are durable."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def sync_tree(folder: Path) -> None:
    """fsync every file in a folder tree, then the folders themselves."""
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        sync_dir(Path(root))


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on a clean exit it is synced and renamed
    over `path`, on an error it is removed."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
        sync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` so that a reader sees the old file or the whole new one."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def publish_dir(staging: Path, target: Path) -> None:
    """Sync a fully built folder and rename it to `target`, which must not exist."""
    sync_tree(staging)
    os.rename(staging, target)
    sync_dir(target.parent)


def build_dir_atomic(target: Path, build: Callable[[Path], None]) -> None:
    """Build a folder with `build(staging)` under a temporary name and publish it as
    `target`; a folder another process published first is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        build(staging)
        try:
            publish_dir(staging, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class JSONFileError(ValueError):
    """A file that is not a small JSON document; the message is the reason, such as
    "not UTF-8 (byte 3)", to follow the file's name."""


def read_json_capped(path: Path, max_bytes: int):
    """The JSON document in `path`, read no further than `max_bytes`, so that a huge or
    hostile file can never exhaust memory or the interpreter's stack.  OSError passes
    through; anything else wrong is a `JSONFileError`."""
    with open(path, "rb") as handle:
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise JSONFileError(f"larger than {max_bytes >> 20} MiB")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise JSONFileError(f"not UTF-8 (byte {err.start})") from None
    except RecursionError:
        raise JSONFileError("not valid JSON (nested too deeply to read)") from None
    except ValueError as err:
        raise JSONFileError(f"not valid JSON ({str(err).splitlines()[0]})") from None

