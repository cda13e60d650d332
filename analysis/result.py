"""What `layerscope.measure` returns: named tables, the manifest that produced them, and
their figures and findings; saved to and loaded from the run store."""

from __future__ import annotations

import os
import sys
import tempfile
import webbrowser
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from layerscope.analysis.store import DEFAULT_ROOT, latest_run, load_run, save_run

Tables = dict[str, pd.DataFrame]
SURVEY = "survey"


def metric_names(manifest: dict) -> list[str]:
    """The measurements a run holds: one for a single measurement, every surveyed one for a survey."""
    if manifest.get("metric") == SURVEY:
        return list(manifest.get("options") or {})
    return [manifest["metric"]] if manifest.get("metric") else []


@dataclass
class Result:
    """Tables by name (`result["block_influence"]`), the run manifest, and where it was saved."""

    tables: Tables
    manifest: dict
    path: Path | None = None

    def __getitem__(self, table: str) -> pd.DataFrame:
        return self.tables[table]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name} {t.shape[0]}x{t.shape[1]}" for name, t in self.tables.items())
        model = self.manifest.get("model", {}).get("model", "?")
        return f"Result({', '.join(self.metrics)} on {model}: {shapes})"

    @property
    def metrics(self) -> list[str]:
        return metric_names(self.manifest)

    def figures(self) -> list[go.Figure]:
        """Every figure of every measurement in the result, in measurement order."""
        from layerscope.analysis.registry import DRAWN

        return [fig for name in self.metrics if name in DRAWN
                for fig in [*DRAWN[name].draw(self.tables),
                            *(view.figure(self.tables) for view in DRAWN[name].views_for(self.tables))]]

    @property
    def summary(self) -> list[str]:
        """One-line findings of each measurement, and a note for each one left out."""
        from layerscope.analysis.registry import DRAWN

        lines = [line for name in self.metrics if name in DRAWN for line in DRAWN[name].summarize(self.tables)]
        return lines + list(self.manifest.get("notes", []))

    def show(self) -> Path | None:
        """Draw every figure: inline in Jupyter; from a plain script, in one offline HTML
        page opened in the browser (its path is returned and printed)."""
        figures = self.figures()
        if "ipykernel" in sys.modules:
            for fig in figures:
                fig.show()
            return None
        handle, name = tempfile.mkstemp(prefix="layerscope-", suffix=".html")
        os.close(handle)
        page = Path(name)
        parts = [fig.to_html(full_html=False, include_plotlyjs=i == 0) for i, fig in enumerate(figures)]
        page.write_text(f"<html><head><meta charset='utf-8'></head><body>{''.join(parts)}</body></html>")
        print(f"figures: {page}")
        webbrowser.open(page.as_uri())
        return page

    def save(self, runs_dir: Path | str = DEFAULT_ROOT) -> Path:
        """Write the result as a run (`runs_dir/<run_id>/`), atomically; returns its folder."""
        self.path = save_run(self.tables, self.manifest, Path(runs_dir))
        return self.path

    @classmethod
    def load(cls, path: Path | str, runs_dir: Path | str | None = None) -> "Result":
        """A stored run, by its folder, or by run id (or `latest`) inside `runs_dir`."""
        path = Path(path)
        root = Path(runs_dir) if runs_dir is not None else path.parent
        run_id = path.name
        if run_id == "latest":
            run_id = latest_run(root)
        manifest, tables = load_run(run_id, root)
        return cls(tables, manifest, root / run_id)
