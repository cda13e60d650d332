"""Issue 15, Medium items: every input listed there is tried, and a test fails on a
traceback, on exit code 0 for bad input, or on lost or corrupted data.

4 `config:` paths confined in the app, and a parameter-count limit the user can raise;
5 hostile manifests; 6 no unpickling; 7 damaged weights; 8 `survey` with defaults on every
tiny model; 9 results kept when saving fails; 10 stale leases; 14 table checksums.
"""

import errno
import json
import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from layerscope.analysis import store
from layerscope.analysis.store import MANIFEST, OWNER, list_runs, load_run, remove_run, save_run
from layerscope.app.cli import main
from layerscope.app.workbench import AppSettings, checked_model_name
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import TINY_FAMILIES, load_model

TINY = ["--model", "tiny-llama", "--max-tokens", "128", "--seq-len", "32"]


def cli(capsys, *argv):
    """Run the CLI in-process; a traceback fails the test by raising here."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *phrases):
    assert code == 2, (code, err)
    assert err.startswith("layerscope: error: ") and err.count("\n") == 1, err
    for phrase in phrases:
        assert phrase in err, err


def table(n=4):
    return pd.DataFrame({"layer": range(n), "value": [float(i) for i in range(n)]})


@pytest.fixture
def runs(tmp_path):
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    """A real residual-stats run of tiny-llama, which the report can draw; measured once."""
    from layerscope.analysis.runner import measure
    from layerscope.probes.inputs import windows

    loaded = load_model("tiny-llama")
    measured = measure(loaded, windows(loaded, "stdlib", seq_len=32, max_tokens=128), ["residual-stats"])
    return measured.save(tmp_path_factory.mktemp("measured"))


@pytest.fixture
def good_run(runs, measured_run):
    runs.mkdir(exist_ok=True)
    shutil.copytree(measured_run, runs / measured_run.name)
    return measured_run.name


def rewrite_manifest(run: Path, **changes):
    manifest = json.loads((run / MANIFEST).read_text())
    manifest.update(changes)
    (run / MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------- 5: hostile manifests

HOSTILE = {
    "nested 100,000 deep": lambda m: '{"metric": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "nested 40 deep": lambda m: json.dumps({**m, "corpus": json.loads("[" * 40 + "]" * 40)}),
    "metric as a list": lambda m: json.dumps({**m, "metric": ["residual-stats"]}),
    "options as a list": lambda m: json.dumps({**m, "options": ["residual-stats"]}),
    "model as a string": lambda m: json.dumps({**m, "model": "tiny-llama"}),
    "model name as a number": lambda m: json.dumps({**m, "model": {"model": 5}}),
    "tables as a string": lambda m: json.dumps({**m, "tables": "residual_stats"}),
    "a table name leaving the run": lambda m: json.dumps({**m, "tables": ["../../etc/passwd"]}),
    "timings as text": lambda m: json.dumps({**m, "timings": {"capture": "fast"}}),
    "a lone surrogate": lambda m: json.dumps({**m, "metric": "\ud800"}),
    "a list at the top": lambda m: json.dumps([m]),
    "not UTF-8": lambda m: b"\xff\xfe" + json.dumps(m).encode(),
    "empty": lambda m: "",
    "a 5000-digit number": lambda m: json.dumps(m)[:-1] + ', "n": ' + "9" * 5000 + "}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_manifest_is_listed_corrupt_and_never_stops_the_others(capsys, runs, good_run, name, tmp_path):
    bad = runs / "hostile-run"
    shutil.copytree(runs / good_run, bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    content = HOSTILE[name]({**manifest, "created": "9999-12-31T00:00:00"})  # the newest, if it were read
    (bad / MANIFEST).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))

    statuses = {row["run_id"]: row["status"] for row in list_runs(runs)}
    assert statuses == {good_run: "complete", "hostile-run": "corrupt"}
    code, out, _ = cli(capsys, "runs", "list", "--runs-dir", runs, "--format", "json")
    assert code == 0 and {r["run_id"]: r["status"] for r in json.loads(out)} == statuses
    code, out, _ = cli(capsys, "runs", "list", "--runs-dir", runs)
    assert code == 0 and "corrupt" in out
    one_line_error(*cli(capsys, "runs", "show", "hostile-run", "--runs-dir", runs)[::2], "is corrupt")
    code, out, err = cli(capsys, "report", "latest", "--runs-dir", runs, "-o", tmp_path / "latest.html")
    assert code == 0 and f"report of {good_run}" in out, err
    with pytest.raises(UserError, match="manifest.json unreadable"):
        load_run("hostile-run", runs)


def _app_page(runs: Path, allowed: Path, page: str):
    from streamlit.testing.v1 import AppTest

    import layerscope.app

    os.environ["LAYERSCOPE_RUNS_DIR"], os.environ["LAYERSCOPE_ALLOWED_DIRS"] = str(runs), str(allowed)
    try:
        at = AppTest.from_file(str(Path(layerscope.app.__file__).with_name("streamlit_app.py")), default_timeout=60)
        at.session_state["model_choice"] = "tiny-llama"
        at.run()
        at.switch_page(page).run()
    finally:
        del os.environ["LAYERSCOPE_RUNS_DIR"], os.environ["LAYERSCOPE_ALLOWED_DIRS"]
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.parametrize("page", ["page_runs.py", "page_compare.py"])
def test_app_pages_that_list_runs_skip_a_hostile_manifest(runs, good_run, tmp_path, page):
    shutil.copytree(runs / good_run, runs / "second-good")
    (runs / "hostile" / "x").mkdir(parents=True)
    (runs / "hostile" / MANIFEST).write_text('{"metric": ' + "[" * 100_000)
    at = _app_page(runs, tmp_path, page)
    if page == "page_runs.py":
        assert sorted(at.dataframe[0].value["status"]) == ["complete", "complete", "corrupt"]
    else:
        assert at.get("plotly_chart"), "the two good runs are compared"


@pytest.mark.parametrize("case", ["an empty table", "another metric's table", "a table of text"])
def test_a_consistent_run_with_odd_tables_is_reported_not_fatal(capsys, runs, tmp_path, case):
    """A run whose manifest and checksums are fine but whose tables are not what its
    measurement draws: the report and the app say so and show the rest."""
    tables = {"an empty table": {"residual_stats": pd.DataFrame()},
              "another metric's table": {"residual_stats": pd.DataFrame({"block": [0], "bi": [0.5]})},
              "a table of text": {"residual_stats": pd.DataFrame({"layer": ["x"], "mean_norm": ["y"]})}}[case]
    manifest = {"metric": "residual-stats", "model": {"model": "tiny-llama"}, "options": {"residual-stats": {}}}
    run_id = save_run(tables, manifest, runs).name
    code, out, err = cli(capsys, "report", run_id, "--runs-dir", runs, "-o", tmp_path / "r.html")
    assert code == 0, err
    assert "cannot be drawn" in (tmp_path / "r.html").read_text()
    code, out, _ = cli(capsys, "runs", "show", run_id, "--runs-dir", runs)
    assert code == 0

    at = _app_page(runs, tmp_path, "page_runs.py")
    assert any("cannot be drawn" in w.value for w in at.warning)


def test_report_latest_passes_over_a_newer_run_that_cannot_be_read(capsys, runs, good_run, tmp_path):
    newer = save_run({"residual_stats": table()}, {"metric": "residual-stats", "model": {"model": "m"}}, runs)
    # Garbage whose checksum is recorded: it lists as complete but cannot be parsed.
    garbage = b"PAR1 not a parquet file"
    (newer / "residual_stats.parquet").write_bytes(garbage)
    manifest = json.loads((newer / MANIFEST).read_text())
    manifest["table_sha256"]["residual_stats"] = store.sha256_bytes(garbage)
    (newer / MANIFEST).write_text(json.dumps(manifest))
    assert {r["run_id"]: r["status"] for r in list_runs(runs)}[newer.name] == "complete"
    code, out, err = cli(capsys, "report", "latest", "--runs-dir", runs, "-o", tmp_path / "latest.html")
    assert code == 0 and f"report of {good_run}" in out
    assert f"skipped: run '{newer.name}' is corrupt" in err


def test_report_latest_with_no_readable_run_is_one_line(capsys, runs):
    runs.mkdir()
    (runs / "broken").mkdir()
    (runs / "broken" / MANIFEST).write_text("[" * 100_000)
    one_line_error(*cli(capsys, "report", "latest", "--runs-dir", runs)[::2], "no readable complete run")


# ---------------------------------------------------------------- 14: table checksums

def flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])


@pytest.mark.parametrize("damage", [flip_a_byte, truncate, lambda p: p.write_bytes(b"")])
def test_a_damaged_table_lists_as_corrupt_and_is_never_read(capsys, runs, good_run, damage, tmp_path):
    manifest = json.loads((runs / good_run / MANIFEST).read_text())
    assert set(manifest["table_sha256"]) == set(manifest["tables"])
    damage(runs / good_run / f"{manifest['tables'][0]}.parquet")
    [row] = list_runs(runs)
    assert row["status"] == "corrupt" and "does not match its recorded sha256" in row["problem"]
    one_line_error(*cli(capsys, "runs", "show", good_run, "--runs-dir", runs)[::2], "is corrupt")
    one_line_error(*cli(capsys, "report", good_run, "--runs-dir", runs, "-o", tmp_path / "r.html")[::2],
                   "is corrupt")
    one_line_error(*cli(capsys, "report", "latest", "--runs-dir", runs)[::2], "no readable complete run")
    assert not (tmp_path / "r.html").exists()


def test_a_run_without_recorded_checksums_is_not_taken_as_whole(runs):
    run = save_run({"toy": table()}, {"metric": "toy"}, runs)
    manifest = json.loads((run / MANIFEST).read_text())
    del manifest["table_sha256"]
    (run / MANIFEST).write_text(json.dumps(manifest))
    [row] = list_runs(runs)
    assert row["status"] == "corrupt" and "no sha256 recorded" in row["problem"]


# ---------------------------------------------------------------- 9: results kept when saving fails

def _full_disk(monkeypatch):
    def no_space(self, tables):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.RunWriter, "add_tables", no_space)


SAVE_FAILURES = {
    "runs-dir is a file": (lambda tmp, mp: tmp.joinpath("a-file").write_text("x") and tmp / "a-file", "is a file"),
    "runs-dir cannot be made": (lambda tmp, mp: Path("/proc/layerscope-runs"), "not saved"),
    "full disk": (lambda tmp, mp: _full_disk(mp) or tmp / "runs", "No space left on device"),
}
if os.geteuid() != 0:  # root writes into read-only folders; /proc above stands in for it
    SAVE_FAILURES["runs-dir read-only"] = (
        lambda tmp, mp: (tmp / "ro").mkdir() or os.chmod(tmp / "ro", 0o555) or tmp / "ro", "Permission denied")


@pytest.mark.parametrize("verb", ["analyze", "survey"])
@pytest.mark.parametrize("failure", SAVE_FAILURES)
def test_results_are_printed_before_a_failed_save_is_reported(capsys, tmp_path, monkeypatch, verb, failure):
    make, message = SAVE_FAILURES[failure]
    runs_dir = make(tmp_path, monkeypatch)
    argv = ["analyze", "residual-stats"] if verb == "analyze" else ["survey", "--metrics", "residual-stats,massive"]
    code, out, err = cli(capsys, *argv, *TINY, "--runs-dir", runs_dir, "--format", "json")
    one_line_error(code, err, "not saved", message)
    printed = json.loads(out)
    assert ("residual_stats" in printed) if verb == "analyze" else printed["summary"], printed
    if runs_dir.is_dir():
        assert not list(runs_dir.iterdir()), "a failed save leaves nothing behind"


REPORT_TARGETS = {
    "a directory": (lambda tmp: tmp, "is a folder"),
    "/dev/full": (lambda tmp: Path("/dev/full"), "not a regular file"),
    "a path that cannot be made": (lambda tmp: Path("/proc/layerscope/report.html"), "could not write the report"),
    "below a file": (lambda tmp: tmp / "a-file" / "report.html", "could not write the report"),
}


@pytest.mark.parametrize("target", REPORT_TARGETS)
def test_report_to_a_bad_output_is_one_line(capsys, runs, good_run, tmp_path, target):
    (tmp_path / "a-file").write_text("x")
    make, message = REPORT_TARGETS[target]
    output = make(tmp_path)
    one_line_error(*cli(capsys, "report", good_run, "--runs-dir", runs, "-o", output)[::2], message)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode), "/dev/full must stay a device"


@pytest.mark.parametrize("target", ["/proc/layerscope-export", "a-file/export"])
def test_runs_export_to_a_bad_target_is_one_line(capsys, runs, good_run, tmp_path, target):
    (tmp_path / "a-file").write_text("x")
    output = target if target.startswith("/") else tmp_path / target
    code, out, err = cli(capsys, "runs", "export", good_run, "--runs-dir", runs, "-o", output)
    one_line_error(code, err)
    assert list_runs(runs)[0]["status"] == "complete"


# ---------------------------------------------------------------- 10: stale leases

def _staging(runs: Path, owner: dict, age: float = 0.0) -> Path:
    folder = runs / ".20260101-000000-toy-m-abcdef.x1y2z3"
    folder.mkdir(parents=True)
    (folder / OWNER).write_text(json.dumps(owner))
    if age:
        stamp = time.time() - age
        os.utime(folder / OWNER, (stamp, stamp))
    return folder


def test_another_hosts_lease_runs_out_without_a_heartbeat(capsys, runs):
    folder = _staging(runs, {"pid": 1, "host": "some-other-host"}, age=store.LEASE_SECONDS + 5)
    assert [r["status"] for r in list_runs(runs)] == ["interrupted"]
    code, out, _ = cli(capsys, "runs", "rm", "--yes", "20260101-000000-toy-m-abcdef", "--runs-dir", runs)
    assert code == 0 and not folder.exists()


def test_a_live_looking_lease_is_refused_unless_forced(capsys, runs):
    folder = _staging(runs, {"pid": 1, "host": "some-other-host"})
    assert [r["status"] for r in list_runs(runs)] == ["running"]
    one_line_error(*cli(capsys, "runs", "rm", "20260101-000000-toy-m-abcdef", "--runs-dir", runs)[::2],
                   "still being written", "--force")
    assert folder.exists()
    code, out, _ = cli(capsys, "runs", "rm", "--force", "--yes", "20260101-000000-toy-m-abcdef", "--runs-dir", runs)
    assert code == 0 and not folder.exists()


def test_a_reused_pid_does_not_keep_a_dead_run_running(runs):
    # This very process is alive, but holds no lock on the lease: its writer is gone.
    _staging(runs, {"pid": os.getpid(), "host": socket.gethostname()})
    assert [r["status"] for r in list_runs(runs)] == ["interrupted"]


def test_a_writer_holds_its_lease_and_beats(runs, monkeypatch):
    monkeypatch.setattr(store, "HEARTBEAT_SECONDS", 0.05)
    with store.open_run({"metric": "toy", "model": {"model": "m"}}, runs) as run:
        owner = run.staging / OWNER
        os.utime(owner, (0, 0))
        time.sleep(0.3)
        assert owner.stat().st_mtime > 1e9, "the heartbeat touches the lease"
        assert [r["status"] for r in list_runs(runs)] == ["running"]
        with pytest.raises(UserError, match="still being written"):
            remove_run(run.run_id, runs)
        run.add_tables({"toy": table()})
    assert [r["status"] for r in list_runs(runs)] == ["complete"]
    assert not (run.path / OWNER).exists()


LIVE_WRITER = textwrap.dedent("""
    import sys, time
    from layerscope.analysis.store import open_run
    with open_run({"metric": "toy", "model": {"model": "m"}}, sys.argv[1]) as run:
        print(run.run_id, flush=True)
        time.sleep(120)
""")


def test_a_killed_writer_on_this_host_is_interrupted_even_if_its_pid_comes_back(runs):
    writer = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(runs)], stdout=subprocess.PIPE, text=True)
    try:
        run_id = writer.stdout.readline().strip()
        assert [r["status"] for r in list_runs(runs)] == ["running"]
    finally:
        writer.kill()
        writer.wait()
    # Say the pid was reused by a live process: the lease names it, yet no one holds the lock.
    [staging] = [p for p in runs.iterdir() if p.name.startswith(".")]
    owner = json.loads((staging / OWNER).read_text())
    (staging / OWNER).write_text(json.dumps({**owner, "pid": os.getpid()}))
    assert [r["status"] for r in list_runs(runs)] == ["interrupted"]
    remove_run(run_id, runs)
    assert list(runs.iterdir()) == []


# ---------------------------------------------------------------- 6 and 7: weights


def variant(saved: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "variant"
    shutil.copytree(saved, folder)
    weights = load_file(folder / "model.safetensors")
    edited = edit(weights, folder)
    if edited is not None:
        save_file(edited, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


class Evil:
    """Unpickling this creates a marker file: proof that a pickle was opened."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("keep_safetensors", [True, False])
def test_a_pickle_is_never_opened(capsys, saved_llama, tmp_path, keep_safetensors):
    marker = tmp_path / "UNPICKLED"

    def add_pickle(weights, folder):
        with open(folder / "pytorch_model.bin", "wb") as handle:
            pickle.dump({"x": Evil(str(marker))}, handle)
        if not keep_safetensors:
            (folder / "model.safetensors").unlink()

    folder = variant(saved_llama, tmp_path, add_pickle)
    code, out, err = cli(capsys, "analyze", "residual-stats", "--no-save", "--model", folder, "--max-tokens", "128")
    if keep_safetensors:
        assert code == 0, err
    else:
        one_line_error(code, err, "holds no .safetensors weights")
    assert not marker.exists()


def _drop_layer_0(weights, folder):
    return {k: v for k, v in weights.items() if ".layers.0." not in k}


def _all_nan(weights, folder):
    return {k: torch.full_like(v, float("nan")) for k, v in weights.items()}


def _one_inf(weights, folder):
    weights["model.norm.weight"][0] = float("inf")
    return weights


def _overflowing(weights, folder):
    # Finite weights whose logits overflow float32: the activations are not finite.
    weights["lm_head.weight"] = torch.full_like(weights["lm_head.weight"], 3e38)
    return weights


@pytest.mark.parametrize("edit, message", [
    (_drop_layer_0, "lacks 9 weight tensor(s) the model needs"),
    (_all_nan, "non-finite weights"),
    (_one_inf, "non-finite weights"),
    (_overflowing, "non-finite outputs"),
], ids=["missing layer 0", "all NaN", "one inf", "overflowing activations"])
def test_damaged_weights_are_refused(capsys, saved_llama, tmp_path, edit, message):
    folder = variant(saved_llama, tmp_path, edit)
    code, out, err = cli(capsys, "analyze", "residual-stats", "--model", folder, *TINY[2:],
                         "--runs-dir", tmp_path / "runs")
    one_line_error(code, err, message)
    assert not (tmp_path / "runs").exists()


def test_unused_weights_are_a_loud_warning_recorded_in_the_manifest(capsys, saved_llama, tmp_path):
    def add_unused(weights, folder):
        return {**weights, "model.stray.weight": torch.zeros(3)}

    folder = variant(saved_llama, tmp_path, add_unused)
    code, out, err = cli(capsys, "analyze", "residual-stats", "--model", folder, *TINY[2:],
                         "--runs-dir", tmp_path / "runs", "--format", "json")
    assert code == 0
    assert "layerscope: warning: " in err and "model.stray.weight" in err
    manifest = json.loads((Path(json.loads(out)["run"]) / MANIFEST).read_text())
    assert "model.stray.weight" in manifest["model"]["warnings"][0]


# ---------------------------------------------------------------- 4: config: paths and size

def _config(folder: Path, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "vocab_size": 260, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "bos_token_id": 256, "eos_token_id": 257, **overrides}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


@pytest.mark.parametrize("outside", ["/etc/passwd", "/no/such/config.json", "~/../../etc/hostname",
                                     "config.json/../../../../etc/passwd"])
def test_config_paths_are_confined_in_the_app_and_existence_is_not_revealed(tmp_path, outside):
    settings = AppSettings(tmp_path / "runs", (tmp_path / "allowed",))
    (tmp_path / "allowed").mkdir()
    for suffix in ("", "@peri"):
        with pytest.raises(UserError, match="outside the folders this app may read") as refused:
            checked_model_name(f"config:{outside}{suffix}", settings)
        assert "does not exist" not in str(refused.value)


def test_a_config_inside_the_allowed_folders_is_accepted(tmp_path):
    config = _config(tmp_path / "allowed" / "cfg")
    settings = AppSettings(tmp_path / "runs", (tmp_path / "allowed",))
    assert checked_model_name(f"config:{config}", settings) == f"config:{config.resolve()}"
    assert checked_model_name(f"config:{config}@peri", settings) == f"config:{config.resolve()}@peri"
    link = tmp_path / "allowed" / "link.json"
    link.symlink_to("/etc/hostname")
    with pytest.raises(UserError, match="outside the folders"):
        checked_model_name(f"config:{link}", settings)


def test_a_huge_config_is_refused_before_any_memory_is_taken(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("LAYERSCOPE_MAX_CONFIG_PARAMS", raising=False)
    config = _config(tmp_path / "big", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8, vocab_size=128000)
    started = time.perf_counter()
    code, out, err = cli(capsys, "analyze", "residual-stats", "--no-save", "--model", f"config:{config}")
    one_line_error(code, err, "asks for 70,", "above the limit of 500,000,000", "--max-config-params")
    assert time.perf_counter() - started < 20


def test_the_config_limit_can_be_lowered_and_raised(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("LAYERSCOPE_MAX_CONFIG_PARAMS", raising=False)
    config = _config(tmp_path / "small")
    argv = ["analyze", "residual-stats", "--no-save", "--model", f"config:{config}", *TINY[2:]]
    one_line_error(*cli(capsys, *argv, "--max-config-params", "1000")[::2], "above the limit of 1,000")
    monkeypatch.setenv("LAYERSCOPE_MAX_CONFIG_PARAMS", "1000")
    one_line_error(*cli(capsys, *argv)[::2], "above the limit of 1,000")
    code, out, err = cli(capsys, *argv, "--max-config-params", "10000000")
    assert code == 0, err
    assert os.environ["LAYERSCOPE_MAX_CONFIG_PARAMS"] == "1000", "a flag holds for its own command only"
    one_line_error(*cli(capsys, *argv, "--max-config-params", "0")[::2], "must be positive")
    monkeypatch.setenv("LAYERSCOPE_MAX_CONFIG_PARAMS", "lots")
    one_line_error(*cli(capsys, *argv)[::2], "is not a number of parameters")


# ---------------------------------------------------------------- 8: survey adapts to the model

@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_survey_with_defaults_succeeds_on_every_tiny_model(capsys, family):
    """Every measurement with its default options on a 4-layer model; only the corpus is
    small, to keep the test fast (the defaults that broke, --max-removed, follow the depth)."""
    code, out, err = cli(capsys, "survey", "--model", f"tiny-{family}", "--no-save", "--format", "json",
                         "--max-tokens", "64", "--seq-len", "16")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert summary and all(isinstance(line, str) for line in summary)
    assert any(line.startswith("prune-curve") for line in summary) or family == "bert", summary
