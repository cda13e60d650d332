"""The run store: atomic runs, interrupted and corrupt runs, concurrency, keyed lookup,
and the `layerscope runs` and `layerscope report` commands around it."""

import json
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest

from layerscope.analysis.store import (
    export_run,
    find_run,
    latest_run,
    list_runs,
    load_run,
    open_run,
    remove_run,
    run_key,
    save_run,
)
from layerscope.app.cli import main
from layerscope.probes.errors import UserError

MANIFEST = {"metric": "toy", "model": {"model": "tiny-llama"}}


def _table(n=3):
    return pd.DataFrame({"layer": range(n), "value": [float(i) for i in range(n)]})


def _status(root):
    return {row["run_id"]: row["status"] for row in list_runs(root)}


def test_saved_run_round_trips_and_lists_complete(tmp_path):
    path = save_run({"toy": _table()}, {**MANIFEST, "key": "k1"}, tmp_path)
    manifest, tables = load_run(path.name, tmp_path)
    assert manifest["status"] == "complete" and manifest["tables"] == ["toy"] and manifest["created"]
    pd.testing.assert_frame_equal(tables["toy"], _table())
    assert _status(tmp_path) == {path.name: "complete"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no staging folder may remain"
    assert path.stat().st_mode & 0o777 == 0o755


def test_a_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with open_run(MANIFEST, tmp_path) as run:
            run.add_tables({"toy": _table()})
            raise RuntimeError("measurement failed")
    assert list(tmp_path.iterdir()) == []


CRASHING_WRITER = textwrap.dedent("""
    import sys, time
    import pandas as pd
    from layerscope.analysis.store import open_run
    with open_run({"metric": "toy", "model": {"model": "m"}}, sys.argv[1]) as run:
        run.add_tables({"toy": pd.DataFrame({"x": [1]})})
        print(run.run_id, flush=True)
        time.sleep(120)
""")


def test_a_crashed_writer_leaves_a_run_marked_interrupted(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        run_id = writer.stdout.readline().strip()
        assert _status(tmp_path) == {run_id: "running"}
        with pytest.raises(UserError, match="still being written"):
            remove_run(run_id, tmp_path)
    finally:
        writer.kill()
        writer.wait()
    assert _status(tmp_path) == {run_id: "interrupted"}
    with pytest.raises(UserError, match=f"run '{run_id}' is interrupted, not complete"):
        load_run(run_id, tmp_path)
    assert find_run(run_key({}), tmp_path) is None
    remove_run(run_id, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_whose_status_is_not_complete_is_interrupted(tmp_path):
    path = save_run({"toy": _table()}, MANIFEST, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    assert _status(tmp_path) == {path.name: "interrupted"}
    with pytest.raises(UserError, match="interrupted .*manifest status is 'running'"):
        load_run(path.name, tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "manifest.json").write_text("{not json"), "corrupt .*manifest.json unreadable"),
    (lambda p: (p / "manifest.json").unlink(), "corrupt .*manifest.json unreadable"),
    (lambda p: (p / "toy.parquet").unlink(), "corrupt .*missing tables: toy"),
    (lambda p: (p / "toy.parquet").write_bytes(b"PAR1 garbage"), "corrupt: a table cannot be read"),
])
def test_corrupt_runs_are_reported_not_loaded(tmp_path, damage, message):
    path = save_run({"toy": _table()}, MANIFEST, tmp_path)
    damage(path)
    with pytest.raises(UserError, match=message):
        load_run(path.name, tmp_path)


def test_concurrent_writers_never_clash(tmp_path):
    def write(i):
        return save_run({"toy": _table(i + 1)}, MANIFEST, tmp_path).name

    with ThreadPoolExecutor(8) as pool:
        run_ids = list(pool.map(write, range(24)))
    assert len(set(run_ids)) == 24
    assert set(_status(tmp_path).values()) == {"complete"} and len(_status(tmp_path)) == 24
    assert sorted(len(load_run(r, tmp_path)[1]["toy"]) for r in run_ids) == list(range(1, 25))


def test_two_writers_of_one_run_id_one_wins(tmp_path):
    def write(i):
        try:
            return save_run({"toy": _table(i + 2)}, MANIFEST, tmp_path, run_id="same")
        except UserError as err:
            return err

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(write, range(2)))
    errors = [o for o in outcomes if isinstance(o, UserError)]
    assert len(errors) == 1 and "already exists" in str(errors[0])
    assert [p.name for p in tmp_path.iterdir()] == ["same"]


def test_find_run_returns_the_newest_complete_run_of_a_key(tmp_path):
    key = run_key({"metric": "toy", "model": "tiny-llama", "options": {"a": 1}})
    assert key == run_key({"options": {"a": 1}, "model": "tiny-llama", "metric": "toy"})
    assert key != run_key({"metric": "toy", "model": "tiny-llama", "options": {"a": 2}})
    older = save_run({"toy": _table()}, {**MANIFEST, "key": key}, tmp_path).name
    newer = save_run({"toy": _table()}, {**MANIFEST, "key": key}, tmp_path).name
    save_run({"toy": _table()}, {**MANIFEST, "key": "other"}, tmp_path)
    assert find_run(key, tmp_path) == newer != older
    (tmp_path / newer / "toy.parquet").unlink()
    assert find_run(key, tmp_path) == older


def test_latest_is_the_newest_complete_run(tmp_path):
    with pytest.raises(UserError, match="no complete run"):
        latest_run(tmp_path)
    save_run({"toy": _table()}, MANIFEST, tmp_path)
    newest = save_run({"toy": _table()}, MANIFEST, tmp_path).name
    (tmp_path / ".crashed.abc").mkdir()
    assert latest_run(tmp_path) == newest


@pytest.mark.parametrize("bad", ["../outside", ".hidden", "a/b", "", ".."])
def test_run_ids_cannot_leave_the_store(tmp_path, bad):
    for action in (load_run, remove_run):
        with pytest.raises(UserError, match="not a run id"):
            action(bad, tmp_path)


def test_export_writes_csv_and_refuses_a_non_empty_target(tmp_path):
    run_id = save_run({"toy": _table()}, MANIFEST, tmp_path / "runs").name
    target = export_run(run_id, tmp_path / "out", tmp_path / "runs")
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "toy.csv"]
    pd.testing.assert_frame_equal(pd.read_csv(target / "toy.csv"), _table())
    with pytest.raises(UserError, match="exists and is not an empty folder"):
        export_run(run_id, target, tmp_path / "runs")


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_runs_cli_lists_shows_exports_and_removes(capsys, tmp_path):
    root = tmp_path / "runs"
    run_id = save_run({"toy": _table()}, MANIFEST, root).name
    (root / ".crashed-run.abc123").mkdir()
    code, out, _ = _cli(capsys, "runs", "list", "--runs-dir", str(root), "--format", "json")
    assert code == 0
    assert {(r["run_id"], r["status"]) for r in json.loads(out)} == {(run_id, "complete"), ("crashed-run", "interrupted")}
    code, out, _ = _cli(capsys, "runs", "show", run_id, "--runs-dir", str(root), "--format", "json")
    assert code == 0 and json.loads(out)["run_id"] == run_id
    code, out, _ = _cli(capsys, "runs", "export", run_id, "-o", str(tmp_path / "exported"), "--runs-dir", str(root))
    assert code == 0 and (tmp_path / "exported" / "toy.csv").exists()
    code, _, err = _cli(capsys, "runs", "show", "crashed-run", "--runs-dir", str(root))
    assert code == 2 and "is interrupted, not complete" in err and err.count("\n") == 1
    code, _, _ = _cli(capsys, "runs", "rm", "crashed-run", "--runs-dir", str(root), "--yes")
    assert code == 0
    code, _, _ = _cli(capsys, "runs", "rm", run_id, "--runs-dir", str(root), "--yes")
    assert code == 0 and list(root.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["runs", "show", "no-such-run"], "run 'no-such-run' not found"),
    (["runs", "rm", "../../etc"], "is not a run id"),
    (["runs", "show"], "needs a run id"),
    (["report", "no-such-run"], "run 'no-such-run' not found"),
    (["report", "latest"], "no readable complete run"),
    (["runs", "show", "latest"], "no readable complete run"),
    (["runs", "export", "latest"], "no complete run"),
    (["runs", "rm", "latest", "--yes"], "no complete run"),
])
def test_runs_and_report_errors_are_one_line(capsys, tmp_path, argv, message):
    code, _, err = _cli(capsys, *argv, "--runs-dir", str(tmp_path))
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def _two_runs(root):
    old = save_run({"toy": _table()}, {**MANIFEST, "created": "x"}, root).name
    new = save_run({"toy": _table(5)}, MANIFEST, root).name
    return old, new


def test_latest_is_accepted_wherever_a_run_id_is(capsys, tmp_path):
    root = tmp_path / "runs"
    old, new = _two_runs(root)
    code, out, _ = _cli(capsys, "runs", "show", "latest", "--runs-dir", str(root), "--format", "json")
    assert code == 0 and json.loads(out)["run_id"] == new
    code, out, _ = _cli(capsys, "runs", "export", "latest", "-o", str(tmp_path / "out"), "--runs-dir", str(root))
    assert code == 0 and len(pd.read_csv(tmp_path / "out" / "toy.csv")) == 5
    code, _, _ = _cli(capsys, "runs", "rm", "latest", "--yes", "--runs-dir", str(root))
    assert code == 0 and [p.name for p in root.iterdir()] == [old]


class _Terminal:
    """A stdin that is a terminal on which the person types `answer`."""

    def __init__(self, answer):
        self.answer = answer

    def isatty(self):
        return True

    def readline(self):
        return self.answer


@pytest.mark.parametrize("answer, removed", [("y\n", True), ("yes\n", True), ("n\n", False), ("\n", False),
                                             ("", False)])
def test_rm_asks_on_a_terminal(capsys, monkeypatch, tmp_path, answer, removed):
    run_id = save_run({"toy": _table()}, MANIFEST, tmp_path).name
    monkeypatch.setattr("sys.stdin", _Terminal(answer))
    code, _, err = _cli(capsys, "runs", "rm", run_id, "--runs-dir", str(tmp_path))
    assert f"remove run {run_id}" in err and "[y/N]" in err
    assert (code, (tmp_path / run_id).exists()) == ((0, False) if removed else (1, True))


def test_rm_without_a_terminal_needs_yes(capsys, monkeypatch, tmp_path):
    run_id = save_run({"toy": _table()}, MANIFEST, tmp_path).name
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("y\n"))
    code, out, err = _cli(capsys, "runs", "rm", run_id, "--runs-dir", str(tmp_path))
    assert code == 2 and out == "" and err.count("\n") == 1 and "--yes" in err
    assert (tmp_path / run_id).is_dir()


def test_runs_list_shows_corpus_tokens_and_changed_options_in_100_columns(capsys, tmp_path):
    from layerscope.analysis.layer_skip import LayerSkipOptions
    from layerscope.analysis.runner import changed_options

    corpus = {"source": "/data/a/very/long/folder/name/of/a/corpus/file/wikitext-103-train.jsonl", "tokens": 4096,
              "windows": 32, "seq_len": 128}
    ids = []
    for options in (LayerSkipOptions(), LayerSkipOptions(part="attn", layers="1,2")):
        manifest = {"metric": "layer-skip", "model": {"model": "smollm2-135m"}, "corpus": corpus,
                    "options": {"layer-skip": {}}, "changed_options": {"layer-skip": changed_options(options)}}
        ids.append(save_run({"toy": _table()}, manifest, tmp_path, run_id=f"20261123-120000-norm-sensitivity-"
                            f"smollm2-135m-{len(ids)}abcde").name)
    code, out, _ = _cli(capsys, "runs", "list", "--runs-dir", str(tmp_path))
    lines = out.splitlines()
    assert code == 0 and max(len(line) for line in lines) <= 100, out
    assert lines[0].split() == ["run_id", "status", "corpus", "tokens"]
    first, second = (lines.index(line) for line in lines if line.startswith(tuple(ids)))
    cells = lines[first].split()
    assert cells[3:] == ["4096", "(32x128)"] and cells[1] == "complete"
    assert cells[2].startswith("\u2026") and corpus["source"].endswith(cells[2][1:]) and len(cells[2]) > 12
    assert lines[second + 1].strip() == "options: part=attn layers=1,2", "two runs of one measurement differ"
    assert second == first + 1, "a run with default options has no options line"
    code, out, _ = _cli(capsys, "runs", "list", "--runs-dir", str(tmp_path), "--format", "json")
    rows = {row["run_id"]: row for row in json.loads(out)}
    assert rows[ids[1]]["options"] == "part=attn layers=1,2" and rows[ids[0]]["options"] == ""
    assert (rows[ids[0]]["corpus"], rows[ids[0]]["tokens"], rows[ids[0]]["seq_len"]) == (corpus["source"], 4096, 128)


def test_runs_list_cuts_to_the_newest_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("layerscope.app.cli.TABLE_ROWS", 3)
    ids = [save_run({"toy": _table()}, MANIFEST, tmp_path, run_id=f"2026-run-{i}").name for i in range(5)]
    code, out, _ = _cli(capsys, "runs", "list", "--runs-dir", str(tmp_path))
    shown = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert shown == ids[2:] and out.splitlines()[-1] == ("... 2 older runs left out (5 in all); "
                                                         "`--format json` lists every run")


def test_runs_show_quotes_tokens_and_cuts_long_tables(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("layerscope.app.cli.TABLE_ROWS", 4)
    tokens = pd.DataFrame({"position": range(6), "token": [" the", "the", "\n", " ", "a", "b"],
                           "top_token": ["x"] * 6, "token_id": range(6)})
    run_id = save_run({"tokens": tokens}, MANIFEST, tmp_path).name
    code, out, _ = _cli(capsys, "runs", "show", run_id, "--runs-dir", str(tmp_path))
    rows = [line.split() for line in out.split("\ntokens\n")[1].splitlines()[1:5]]
    assert rows == [["0", '"\u2423the"', '"x"', "0"], ["1", '"the"', '"x"', "1"], ["2", '"\u21b5"', '"x"', "2"],
                    ["3", '"\u2423"', '"x"', "3"]]
    assert "... 2 more rows (6 in all); `--format json` prints every row" in out
