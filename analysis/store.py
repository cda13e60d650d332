"""The run store: `runs/<run_id>/` with `manifest.json` and one Parquet table per result.

A run is written into a hidden staging folder and renamed into place when complete, so
a crash never leaves a folder that looks like a finished run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd

from layerscope.probes.errors import UserError

DEFAULT_ROOT = Path("runs")


def new_run_id(metric: str, model: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).name or model)
    return f"{stamp}-{metric}-{safe_model}-{uuid.uuid4().hex[:6]}"


def save_run(tables: dict[str, pd.DataFrame], manifest: dict, root: Path = DEFAULT_ROOT,
             run_id: str | None = None) -> Path:
    """Write tables and manifest atomically; returns the run folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    run_id = run_id or new_run_id(manifest.get("metric", "run"), manifest.get("model", {}).get("model", "model"))
    staging = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=root))
    try:
        for name, table in tables.items():
            table.to_parquet(staging / f"{name}.parquet", index=False)
        manifest = {**manifest, "run_id": run_id, "status": "complete", "tables": sorted(tables)}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        final = root / run_id
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def list_runs(root: Path = DEFAULT_ROOT) -> list[dict]:
    """Every run folder with its status; staging folders left by a crash show as interrupted."""
    root = Path(root)
    if not root.exists():
        return []
    runs = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        if folder.name.startswith("."):
            runs.append({"run_id": folder.name.lstrip(".").split(".")[0], "status": "interrupted", "path": str(folder)})
            continue
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
            runs.append({"run_id": folder.name, "status": manifest.get("status", "unknown"),
                         "metric": manifest.get("metric"), "model": manifest.get("model", {}).get("model"),
                         "path": str(folder)})
        except (OSError, json.JSONDecodeError):
            runs.append({"run_id": folder.name, "status": "corrupt", "path": str(folder)})
    return runs


def load_run(run_id: str, root: Path = DEFAULT_ROOT) -> tuple[dict, dict[str, pd.DataFrame]]:
    folder = Path(root) / run_id
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        tables = {name: pd.read_parquet(folder / f"{name}.parquet") for name in manifest["tables"]}
    except FileNotFoundError:
        raise UserError(f"run {run_id!r} not found in {root}") from None
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"run {run_id!r} is corrupt: {err}") from None
    return manifest, tables
