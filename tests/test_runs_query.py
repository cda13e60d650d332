"""`layerscope runs query`: DuckDB views over the tables of every complete run, checked
against the frames the runs were built from."""

import json

import pandas as pd
import pytest

from layerscope.analysis.store import list_runs, save_run
from layerscope.analysis.run_query import MAX_ROWS
from layerscope.app.cli import MAX_QUERY_ROWS, TABLE_ROWS, main


def _manifest(model, corpus="stdlib", metric="block-influence"):
    return {"metric": metric, "model": {"model": model},
            "corpus": {"source": corpus, "tokens": 256, "windows": 2, "seq_len": 128}}


def _bi(values):
    return pd.DataFrame({"layer": range(len(values)), "block_influence": values})


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "runs"
    tables = {"tiny-llama": _bi([0.9, 0.1, 0.2]), "tiny-gpt2": _bi([0.5, 0.3]), "smollm2-135m": _bi([0.7, 0.05, 0.01, 0.4])}
    ids = {model: save_run({"block_influence": t}, _manifest(model, corpus=f"{model}.txt"), root).name
           for model, t in tables.items()}
    save_run({"residual_stats": pd.DataFrame({"layer": [0], "mean_norm": [1.5]})}, _manifest("tiny-llama", metric="x"), root)
    # A damaged run: its table no longer matches the sha256 recorded, so it must not be read.
    broken = save_run({"block_influence": _bi([99.0])}, _manifest("broken-model"), root)
    _bi([99.0, 98.0]).to_parquet(broken / "block_influence.parquet")
    return root, tables, ids


def test_block_influence_across_models_is_one_query(capsys, store):
    root, tables, ids = store
    assert {row["status"] for row in list_runs(root)} == {"complete", "corrupt"}
    code, out, _ = _cli(capsys, "runs", "query", "SELECT run_id, model, corpus, layer, block_influence "
                        "FROM block_influence ORDER BY model, layer", "--runs-dir", str(root), "--format", "json")
    assert code == 0
    got = pd.DataFrame(json.loads(out)["query"])
    expected = pd.concat([t.assign(run_id=ids[m], model=m, corpus=f"{m}.txt") for m, t in tables.items()])
    expected = expected[["run_id", "model", "corpus", "layer", "block_influence"]].sort_values(["model", "layer"])
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True), check_dtype=False)


def test_runs_view_and_per_model_aggregate(capsys, store):
    root, tables, _ = store
    code, out, _ = _cli(capsys, "runs", "query", "SELECT model, max(block_influence) AS top FROM block_influence "
                        "WHERE layer > 0 GROUP BY model ORDER BY model", "--runs-dir", str(root), "--format", "json")
    assert code == 0
    got = {row["model"]: row["top"] for row in json.loads(out)["query"]}
    assert got == {m: t["block_influence"][1:].max() for m, t in tables.items()}
    code, out, _ = _cli(capsys, "runs", "query", "SELECT count(*) AS n FROM runs", "--runs-dir", str(root),
                        "--format", "json")
    assert json.loads(out)["query"] == [{"n": 4}], "the corrupt run is not a complete run"


def test_a_tables_own_model_column_is_kept_apart(capsys, tmp_path):
    own = pd.DataFrame({"model": ["norm-free", "vanilla"], "eval_ce": [3.1, 2.9]})
    run_id = save_run({"ln_removal_eval": own}, _manifest("tiny-gpt2", metric="ln-removal"), tmp_path).name
    code, out, _ = _cli(capsys, "runs", "query", "SELECT * FROM ln_removal_eval ORDER BY eval_ce",
                        "--runs-dir", str(tmp_path), "--format", "json")
    assert code == 0
    assert json.loads(out)["query"] == [
        {"run_id": run_id, "model": "tiny-gpt2", "corpus": "stdlib", "table_model": "vanilla", "eval_ce": 2.9},
        {"run_id": run_id, "model": "tiny-gpt2", "corpus": "stdlib", "table_model": "norm-free", "eval_ce": 3.1}]


@pytest.mark.parametrize("sql, message", [
    ("SELEC 1", "bad SQL: Parser Error"),
    ("SELECT * FROM no_such_table", "tables: runs, block_influence, residual_stats"),
    ("DELETE FROM runs", "runs one SELECT statement"),
    ("SELECT 1; SELECT 2", "runs one SELECT statement"),
    ("COPY (SELECT 1) TO 'out.csv'", "runs one SELECT statement"),
    ("SELECT * FROM read_csv('/etc/passwd')", "disabled by configuration"),
    ("SELECT * FROM read_parquet('../**/*.parquet')", "disabled by configuration"),
])
def test_bad_or_unsafe_sql_is_one_line_and_exit_2(capsys, store, sql, message):
    root, _, _ = store
    code, out, err = _cli(capsys, "runs", "query", sql, "--runs-dir", str(root))
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_rows_are_capped_and_long_tables_cut(capsys, tmp_path):
    n = TABLE_ROWS + 25
    save_run({"block_influence": _bi([i / n for i in range(n)])}, _manifest("tiny-llama"), tmp_path)
    sql = "SELECT layer FROM block_influence ORDER BY layer"
    code, out, err = _cli(capsys, "runs", "query", sql, "--runs-dir", str(tmp_path), "--format", "json",
                          "--max-rows", "7")
    assert code == 0 and [row["layer"] for row in json.loads(out)["query"]] == list(range(7))
    assert "more than 7 rows" in err
    code, out, _ = _cli(capsys, "runs", "query", sql, "--runs-dir", str(tmp_path))
    lines = out.strip().splitlines()
    assert [line.strip() for line in lines[2:2 + TABLE_ROWS + 1]] == [str(i) for i in range(TABLE_ROWS)] + [lines[-1]]
    assert lines[-1] == f"... 25 more rows ({n} in all); `--format json` prints every row"
    code, _, err = _cli(capsys, "runs", "query", sql, "--runs-dir", str(tmp_path), "--max-rows", "0")
    assert code == 2 and "--max-rows must be between 1 and" in err
    assert MAX_QUERY_ROWS == MAX_ROWS, "the CLI's default is the query's cap"


def test_an_empty_store_has_only_the_runs_view(capsys, tmp_path):
    code, out, _ = _cli(capsys, "runs", "query", "SELECT count(*) AS n FROM runs", "--runs-dir", str(tmp_path),
                        "--format", "json")
    assert code == 0 and json.loads(out)["query"] == [{"n": 0}]


def test_an_empty_result_names_its_columns(capsys, store):
    root, _, _ = store
    code, out, _ = _cli(capsys, "runs", "query", "SELECT model, layer FROM block_influence WHERE layer > 99",
                        "--runs-dir", str(root))
    assert code == 0 and out.strip().splitlines() == ["query", "no rows (columns: model, layer)"]
