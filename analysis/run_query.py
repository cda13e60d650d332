"""`layerscope runs query "SQL"`: DuckDB over the tables of every complete run in a store.

Each table name (`block_influence`, `residual_stats`, ...) is one view over that table in
every complete run, each row carrying `run_id`, `model` and `corpus` (a table's own column
of one of these names is kept as `table_<name>`).  The view `runs` lists the complete runs
themselves.  Comparing Block Influence across models is then one query:

    SELECT model, layer, block_influence FROM block_influence ORDER BY model, layer

Only the Parquet files of complete runs, whose sha256 the listing has just checked, are
read; the connection may open no other file, write none, and load no extension, and only
one SELECT statement is run.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from layerscope.analysis.store import COMPLETE, DEFAULT_ROOT, list_runs, read_manifest
from layerscope.probes.errors import UserError

RUN_COLUMNS = ("run_id", "model", "corpus")
LISTED = ("run_id", "metric", "model", "created", "corpus", "tokens", "windows", "seq_len", "options")
MAX_ROWS = 100_000
_FILE = "__layerscope_file"  # the column naming each row's Parquet file
_FILES = "__layerscope_files"  # the table from a Parquet file to its run


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _connect(files: list[str]):
    import duckdb

    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                              "autoload_known_extensions": False})
    if files:
        con.execute(f"SET allowed_paths = [{', '.join(_literal(f) for f in files)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def _create_views(con, runs: list[dict]) -> list[str]:
    """The `runs` table, and one view per table name over every complete run that holds it;
    the view names."""
    files = pd.DataFrame([(path, run["run_id"], run["model"], run["corpus"]) for run in runs
                          for path in run["files"].values()], columns=["file", *RUN_COLUMNS], dtype=object)
    listed = pd.DataFrame([{k: run.get(k) for k in LISTED} for run in runs], columns=list(LISTED))
    for table, frame in ((_FILES, files), ("runs", listed)):
        con.register("frame", frame)
        con.execute(f"CREATE TEMP TABLE {_identifier(table)} AS SELECT * FROM frame")
        con.unregister("frame")
    by_table: dict[str, list[str]] = {}
    for run in runs:
        for name, path in run["files"].items():
            by_table.setdefault(name, []).append(path)
    names = sorted(name for name in by_table if name not in ("runs", _FILES))
    for name in names:
        source = (f"read_parquet([{', '.join(_literal(p) for p in by_table[name])}], union_by_name = true, "
                  f"filename = {_literal(_FILE)})")
        own = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
        renamed = [f"{_identifier(c)} AS {_identifier('table_' + c)}" for c in RUN_COLUMNS if c in own]
        rename = f" RENAME ({', '.join(renamed)})" if renamed else ""
        con.execute(f"CREATE TEMP VIEW {_identifier(name)} AS SELECT r.run_id, r.model, r.corpus, "
                    f"t.* EXCLUDE ({_identifier(_FILE)}){rename} FROM {source} t "
                    f"JOIN {_FILES} r ON t.{_identifier(_FILE)} = r.file")
    return names


def query_runs(sql: str, root: Path | str = DEFAULT_ROOT, max_rows: int = MAX_ROWS) -> tuple[pd.DataFrame, bool]:
    """The result of one SELECT over the store's complete runs, at most `max_rows` rows, and
    whether more rows were left out.  Bad SQL is a `UserError` whose message is one line."""
    import duckdb

    if not 1 <= max_rows <= MAX_ROWS:
        raise UserError(f"--max-rows must be between 1 and {MAX_ROWS}, got {max_rows}")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise UserError(f"bad SQL: {_first_line(err)}") from None
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        raise UserError("`runs query` runs one SELECT statement (a WITH ... SELECT included), nothing else")
    runs = []
    for row in list_runs(root):
        if row["status"] != COMPLETE:
            continue
        folder = Path(row["path"]).resolve()
        # The tables the manifest lists, whose sha256 the listing checked; any other file is not read.
        tables = read_manifest(folder)["tables"]
        runs.append({**row, "files": {name: str(folder / f"{name}.parquet") for name in tables}})
    con = _connect([path for run in runs for path in run["files"].values()])
    try:
        try:
            names = _create_views(con, runs)
        except duckdb.Error as err:
            raise UserError(f"the stored tables cannot be joined into views: {_first_line(err)}") from None
        try:
            frame = con.sql(sql).limit(max_rows + 1).df()
        except duckdb.Error as err:
            known = f" (tables: runs, {', '.join(names)})" if "does not exist" in str(err) else ""
            raise UserError(f"bad SQL: {_first_line(err)}{known}") from None
    finally:
        con.close()
    return frame.head(max_rows), len(frame) > max_rows


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
