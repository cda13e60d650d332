"""Literal text is measured whole, the same way in the CLI, the API and the app: one window
of the text's own tokens, BOS first where the family uses one, and no EOS appended; a text
longer than a window is split, and the user is told what was left out."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from streamlit.util import calc_hash

import layerscope as ls
import layerscope.app
from layerscope.analysis.store import list_runs, load_run
from layerscope.app.cli import main

# 21 characters: the tiny models' tokenizer gives one token a character (checked below
# with the tokenizer itself, not with layerscope).
TEXT = "Sinks hold attention."


@pytest.fixture(scope="module")
def loaded():
    return ls.load_model("tiny-llama")


def _expected(loaded):
    body = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(body) == 21 and loaded.bos_token_id is not None
    return [loaded.bos_token_id, *body]


def _check_run(loaded, manifest: dict, grid) -> None:
    ids = _expected(loaded)
    corpus = manifest["corpus"]
    assert (corpus["windows"], corpus["seq_len"], corpus["tokens"]) == (1, 22, 22)
    # The grid reads each position's input and true next token: BOS, the text, and no EOS after it.
    decode = loaded.tokenizer.decode
    first_layer = grid[grid["layer"] == 0].sort_values("position")
    assert first_layer["input_token"].tolist() == [decode([i]) for i in ids[:-1]]
    assert first_layer["next_token"].tolist() == [decode([i]) for i in ids[1:]]


def test_a_21_token_text_is_one_22_token_window_in_the_api_the_cli_and_the_app(loaded, tmp_path, monkeypatch):
    ids = _expected(loaded)
    assert ls.text_windows(loaded, TEXT).input_ids.tolist() == [ids]
    result = ls.measure(loaded, TEXT, ["logit-lens"])
    _check_run(loaded, result.manifest, result["lens_grid"])

    cli_runs = tmp_path / "cli-runs"
    assert main(["analyze", "logit-lens", "--model", "tiny-llama", "--corpus", "text:" + TEXT,
                 "--runs-dir", str(cli_runs), "--format", "json"]) == 0
    [run] = list_runs(cli_runs)
    manifest, tables = load_run(run["run_id"], cli_runs)
    _check_run(loaded, manifest, tables["lens_grid"])

    app_runs = tmp_path / "app-runs"
    monkeypatch.setenv("LAYERSCOPE_RUNS_DIR", str(app_runs))
    monkeypatch.setenv("LAYERSCOPE_ALLOWED_DIRS", str(tmp_path))
    at = AppTest.from_file(str(Path(layerscope.app.__file__).with_name("streamlit_app.py")), default_timeout=120)
    for key, value in {"model_choice": "tiny-llama", "corpus_kind": "text", "corpus_text": TEXT}.items():
        at.session_state[key] = value
    at.run()
    at._page_hash = calc_hash("logit-lens")
    at.run()
    at.button(key="logit-lens.run").click().run()
    assert not at.exception and not at.error
    [run] = list_runs(app_runs)
    manifest, tables = load_run(run["run_id"], app_runs)
    _check_run(loaded, manifest, tables["lens_grid"])


def test_a_text_longer_than_the_context_is_split_and_the_rest_named(loaded, tmp_path, capsys):
    text = "abcdefghij" * 30  # 300 tokens, over the tiny models' context of 256
    assert len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) == 300 == 255 + 45
    with pytest.warns(UserWarning, match="its last 45 tokens are left out"):
        windows = ls.text_windows(loaded, text)
    assert windows.input_ids.shape == (1, 256)
    with pytest.warns(UserWarning, match=r"3 windows of 100 text tokens after BOS$"):
        split = ls.text_windows(loaded, text, max_length=101)
    assert split.input_ids[:, 1:].flatten().tolist() == loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert main(["analyze", "residual-stats", "--model", "tiny-llama", "--corpus", "text:" + text, "--no-save",
                 "--format", "json"]) == 0
    assert "layerscope: warning: the text is 300 tokens" in capsys.readouterr().err
