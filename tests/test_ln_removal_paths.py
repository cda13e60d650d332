"""LN removal keeps its model and checkpoints out of the run store, checks its folders
before any training, and runs as one call from a notebook; the store never lists or
deletes a folder that is not a run."""

import json
import time
from pathlib import Path

import pytest
import torch

from layerscope.analysis.store import list_runs, load_run, remove_run, save_run
from layerscope.app.cli import main
from layerscope.probes import ln_train
from layerscope.probes.errors import UserError
from layerscope.probes.interventions import FrozenNorm
from layerscope.probes.ln_removal import (RemovalConfig, RemovalData, RemovalOptions, RemovalResult, plan_paths,
                                          remove_norms)
from layerscope.probes.zoo import FROZEN_NORMS_FILE, load_model

FAST = RemovalConfig(steps=16, start=1, gap_mlp=1, gap_attn=1, gap_v=1, gap_final=1, lr=1e-3, lr_warmup=2)
SMALL_DATA = RemovalData(seq_len=32, batch_size=4, train_tokens=1024, eval_tokens=256)
TINY_ARGS = ["--seq-len", "32", "--batch-size", "4", "--train-tokens", "1024", "--eval-tokens", "256",
             "--start", "1", "--gap-mlp", "1", "--gap-attn", "1", "--gap-v", "1", "--gap-final", "1", "--steps", "16"]


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_training(monkeypatch):
    """Counts model loads and loss evaluations (every training step and evaluation computes one)."""
    calls = {"token_loss": 0, "load_model": 0}
    token_loss, load = ln_train.token_loss, load_model

    def counted_loss(*args, **kwargs):
        calls["token_loss"] += 1
        return token_loss(*args, **kwargs)

    def counted_load(*args, **kwargs):
        calls["load_model"] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(ln_train, "token_loss", counted_loss)
    monkeypatch.setattr("layerscope.probes.zoo.load_model", counted_load)
    return calls


# ---------------------------------------------------------------- one call from a notebook

def test_remove_norms_returns_named_results_and_leaves_the_model_as_it_was(tmp_path):
    loaded = load_model("tiny-llama")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    train, evaluation = SMALL_DATA.windows(loaded)
    options = RemovalOptions(config=FAST, runs_dir=tmp_path / "runs", checkpoint_every=3)
    result = remove_norms(loaded, train, evaluation, options)
    assert isinstance(result, RemovalResult)
    assert list(result.loss.columns) == ["run", "step", "loss", "ce", "aux", "guard", "lr", "grad_norm", "removed"]
    assert result.loss.groupby("run").size().to_dict() == {"ln-removal": 16, "vanilla": 16}
    assert result.loss[result.loss["run"] == "ln-removal"]["removed"].iloc[-1] == len(result.removal.scales)
    # Distilled from the untouched original; the control fine-tunes on cross-entropy.
    assert (result.removal.loss, result.control.loss) == ("distill", "ce")
    assert result.norm_free_model == tmp_path / "ln-removal" / "tiny-llama-norm-free"
    assert result.checkpoint_dir == tmp_path / "ln-removal" / "tiny-llama"
    assert result.eval_before == result.removal.eval_before and result.eval_after == result.removal.eval_after
    assert result.eval_vanilla == result.control.eval_after and result.eval_no_finetune is not None
    reloaded = load_model(str(result.norm_free_model))
    assert any(isinstance(m, FrozenNorm) for m in reloaded.model.modules())
    # The caller's model was never trained or wrapped.
    assert not any(isinstance(m, FrozenNorm) for m in loaded.model.modules())
    after = loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "runs").exists(), "remove_norms alone writes nothing into the run store"

    from layerscope.analysis.ln_removal import figures, result_tables, save_ln_removal_run

    run = save_ln_removal_run(result, train, evaluation)
    assert run.parent == tmp_path / "runs"
    manifest, tables = load_run(run.name, tmp_path / "runs")
    assert manifest["metric"] == "ln-removal" and manifest["norm_free_model"] == str(result.norm_free_model.resolve())
    assert tables["ln_removal_loss"].equals(result_tables(result)["ln_removal_loss"])
    assert len(figures(tables)) == 1 and len(figures(tables)[0].data) >= 3
    # The report and Result.load draw the stored run like any measurement.
    from layerscope.analysis.report import write_report
    from layerscope.analysis.result import Result

    stored = Result.load(run)
    assert len(stored.figures()) == 1 and stored.summary[0].startswith("ln-removal eval CE")
    assert write_report(run.name, tmp_path / "report.html", tmp_path / "runs") == 1
    assert "not drawn" not in (tmp_path / "report.html").read_text()


def test_remove_norms_without_controls_and_with_explicit_folders(tmp_path):
    loaded = load_model("tiny-gpt2")
    train, evaluation = SMALL_DATA.windows(loaded)
    options = RemovalOptions(config=FAST, runs_dir=tmp_path / "runs", checkpoint_dir=tmp_path / "ck",
                             output=tmp_path / "model", control=False)
    result = remove_norms(loaded, train, evaluation, options)
    assert result.control is None and result.eval_vanilla is None and result.eval_no_finetune is None
    assert set(result.loss["run"]) == {"ln-removal"}
    assert (tmp_path / "model" / FROZEN_NORMS_FILE).is_file()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["removal.pt"]


# ---------------------------------------------------------------- folders outside the run store

@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--output"])
@pytest.mark.parametrize("inside", ["runs", "runs/ln-removal/tiny-llama"])
def test_a_folder_inside_the_runs_dir_is_refused(capsys, tmp_path, no_training, flag, inside):
    runs = tmp_path / "runs"
    code, _, err = _cli(capsys, "ln-removal", "--model", "tiny-llama", *TINY_ARGS, "--runs-dir", str(runs),
                        flag, str(tmp_path / inside))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{flag} {tmp_path / inside} is inside the run store {runs}" in err
    assert no_training == {"token_loss": 0, "load_model": 0}
    assert not runs.exists() and not (tmp_path / "ln-removal").exists(), "a refused run writes nothing"


def test_default_folders_sit_beside_the_runs_dir_even_when_it_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = plan_paths("runs", "org/model")
    assert (paths.checkpoint_dir, paths.output) == (Path("ln-removal/model"), Path("ln-removal/model-norm-free"))
    paths = plan_paths(".", "tiny-llama")
    assert paths.checkpoint_dir == tmp_path.parent / "ln-removal" / "tiny-llama"
    with pytest.raises(UserError, match=r"--checkpoint-dir ck is inside the run store \."):
        plan_paths(".", "tiny-llama", checkpoint_dir=Path("ck"))


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_any_training_step(capsys, tmp_path, no_training):
    (tmp_path / "ck").write_text("not a folder")
    started = time.perf_counter()
    code, _, err = _cli(capsys, "ln-removal", "--model", "tiny-llama", *TINY_ARGS,
                        "--runs-dir", str(tmp_path / "runs"), "--checkpoint-dir", str(tmp_path / "ck"))
    seconds = time.perf_counter() - started
    assert code == 2 and err.count("\n") == 1 and f"--checkpoint-dir {tmp_path / 'ck'} is a file, not a folder" in err
    # Before the model is even loaded, let alone a training step run.
    assert no_training == {"token_loss": 0, "load_model": 0}
    assert seconds < 1.0, f"the refusal took {seconds:.2f}s"
    # A folder under that file cannot be made either; the library checks up front too.
    loaded = load_model("tiny-llama")
    train, evaluation = SMALL_DATA.windows(loaded)
    for checkpoint_dir in (tmp_path / "ck", tmp_path / "ck" / "sub"):
        started = time.perf_counter()
        with pytest.raises(UserError, match="is a file"):
            remove_norms(loaded, train, evaluation, RemovalOptions(config=FAST, runs_dir=tmp_path / "runs",
                                                                   checkpoint_dir=checkpoint_dir))
        assert time.perf_counter() - started < 1.0
    assert no_training["token_loss"] == 0
    assert (tmp_path / "ck").read_text() == "not a folder"


def test_an_output_folder_that_is_not_a_model_is_never_replaced(capsys, tmp_path, no_training):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    code, _, err = _cli(capsys, "ln-removal", "--model", "tiny-llama", *TINY_ARGS,
                        "--runs-dir", str(tmp_path / "runs"), "--output", str(precious))
    assert code == 2 and "holds something other than a norm-free model" in err and err.count("\n") == 1
    code, _, err = _cli(capsys, "ln-removal", "--model", "tiny-llama", *TINY_ARGS, "--runs-dir", str(tmp_path / "runs"),
                        "--output", str(tmp_path / "m"), "--checkpoint-dir", str(tmp_path / "m" / "ck"))
    assert code == 2 and "would hold --checkpoint-dir" in err and err.count("\n") == 1
    assert no_training["token_loss"] == 0
    assert (precious / "thesis.tex").read_text() == "years of work"


# ---------------------------------------------------------------- the run store's listing

def _model_and_checkpoints_in(folder):
    """The layout earlier versions wrote into runs/ln-removal/."""
    (folder / "tiny-llama").mkdir(parents=True)
    (folder / "tiny-llama" / "removal.pt").write_bytes(b"checkpoint")
    (folder / "tiny-llama-norm-free").mkdir()
    (folder / "tiny-llama-norm-free" / "model.safetensors").write_bytes(b"weights")
    (folder / "tiny-llama-norm-free" / FROZEN_NORMS_FILE).write_text("{}")


def test_runs_list_does_not_show_the_checkpoint_folder_as_a_run(capsys, tmp_path):
    runs = tmp_path / "runs"
    code, out, err = _cli(capsys, "ln-removal", "--model", "tiny-llama", *TINY_ARGS, "--runs-dir", str(runs),
                          "--no-control", "--format", "json")
    assert code == 0, err
    run_id = json.loads(out)["run"].split("/")[-1]
    # A store that still holds the old layout, a notebook cache and a stray model folder.
    _model_and_checkpoints_in(runs / "ln-removal")
    (runs / ".ipynb_checkpoints.x").mkdir()
    (runs / ".ipynb_checkpoints.x" / "note.ipynb").write_text("{}")
    code, out, _ = _cli(capsys, "runs", "list", "--runs-dir", str(runs), "--format", "json")
    assert code == 0
    assert [(r["run_id"], r["status"], r["metric"]) for r in json.loads(out)] == [(run_id, "complete", "ln-removal")]
    code, out, _ = _cli(capsys, "runs", "list", "--runs-dir", str(runs))
    assert len(out.strip().splitlines()) == 2 and run_id in out and "corrupt" not in out, out
    for folder in ("ln-removal", ".ipynb_checkpoints.x"):
        code, _, err = _cli(capsys, "runs", "rm", folder, "--runs-dir", str(runs))
        assert code == 2 and "is not a run" in err and err.count("\n") == 1, err
    code, _, err = _cli(capsys, "runs", "show", "ln-removal", "--runs-dir", str(runs))
    assert code == 2 and "is not a run" in err and "runs rm" not in err
    assert (runs / "ln-removal" / "tiny-llama" / "removal.pt").read_bytes() == b"checkpoint"
    assert (runs / "ln-removal" / "tiny-llama-norm-free" / "model.safetensors").exists()
    assert (runs / ".ipynb_checkpoints.x" / "note.ipynb").exists()


def test_damaged_runs_and_crash_leftovers_are_still_listed_and_removable(tmp_path):
    import pandas as pd

    manifest = {"metric": "toy", "model": {"model": "m"}}
    damaged = save_run({"toy": pd.DataFrame({"x": [1]})}, manifest, tmp_path)
    (damaged / "manifest.json").unlink()
    (tmp_path / ".crashed-run.abc123").mkdir()
    leftover = tmp_path / ".half.def456"
    leftover.mkdir()
    (leftover / "manifest.json").write_text("{}")
    (leftover / "toy.parquet").write_bytes(b"PAR1")
    rows = {r["run_id"]: r["status"] for r in list_runs(tmp_path)}
    assert rows == {damaged.name: "corrupt", "crashed-run": "interrupted", "half": "interrupted"}
    for run_id in rows:
        remove_run(run_id, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_sensitivity_order_follows_the_norms_own_kl_measured_by_norm_sensitivity(tmp_path):
    from dataclasses import replace

    from layerscope.analysis.ln_removal import result_tables
    from layerscope.analysis.runner import measure

    loaded = load_model("tiny-llama")
    train, evaluation = SMALL_DATA.windows(loaded)
    config = replace(FAST, order="sensitivity", sensitivity_tokens=256)
    result = remove_norms(loaded, train, evaluation, RemovalOptions(config=config, runs_dir=tmp_path / "runs",
                                                                    control=False))
    ranked = result_tables(result)["ln_removal_order"]
    assert ranked["kl_frozen_alone"].is_monotonic_increasing and len(ranked) == 9
    # The same KLs as the measurement reports for the same tokens.
    table = measure(loaded, train.head(256), ["norm-sensitivity"]).tables["norm_sensitivity"].set_index("role")
    for row in ranked.itertuples():
        assert row.kl_frozen_alone == pytest.approx(table.loc[row.role, "kl_own_first"], rel=1e-6, abs=1e-12)
    # Block norms are removed in that order; the final norm and position 0 come last.
    block = [r for r in ranked["role"] if r != "final_norm"]
    firsts = list(dict.fromkeys(e.role for e in result.removal.events))
    assert firsts == [*block, "final_norm", "*"]
