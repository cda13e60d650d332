import json
import subprocess
import sys

import pytest

from layerscope.app.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'; known: smollm2-135m"),
    (["--model", "someorg/some-model"], "HF_HUB_OFFLINE=1"),
    (["--model", "tiny-gpt2", "--corpus", "missing.txt"], "does not exist"),
    (["--model", "tiny-gpt2", "--seq-len", "100000"], "above the model's context"),
    (["--model", "tiny-gpt2", "--max-tokens", "0"], "max_tokens must be positive"),
    (["--model", "./no/such/dir"], "does not exist"),
])
def test_bad_input_gives_one_line_and_exit_2(capsys, argv, message):
    code, out, err = _run(capsys, "analyze", "residual-stats", "--no-save", *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"\xff\xfe bad", "not UTF-8"), (b'{"body": 1}\n', "no string field 'text'"),
])
def test_bad_corpus_files_on_the_cli(capsys, tmp_path, content, message):
    path = tmp_path / ("c.jsonl" if b"{" in content else "c.txt")
    path.write_bytes(content)
    code, _, err = _run(capsys, "analyze", "residual-stats", "--no-save", "--model", "tiny-llama",
                        "--corpus", str(path))
    assert code == 2 and message in err and err.count("\n") == 1


def test_residual_stats_json_and_run_store(capsys, tmp_path):
    code, out, _ = _run(capsys, "analyze", "residual-stats", "--model", "tiny-llama", "--max-tokens", "512",
                        "--format", "json", "--runs-dir", str(tmp_path))
    assert code == 0
    payload = json.loads(out)
    rows = payload["residual_stats"]
    assert len(rows) == 3 * 4
    assert {"layer", "mean_norm", "std", "max_abs", "max_position", "max_dim"} <= set(rows[0])
    code, out, _ = _run(capsys, "runs", "list", "--runs-dir", str(tmp_path), "--format", "json")
    runs = json.loads(out)
    assert len(runs) == 1 and runs[0]["status"] == "complete"
    manifest = json.loads((tmp_path / runs[0]["run_id"] / "manifest.json").read_text())
    assert manifest["corpus"]["corpus_sha256"] and manifest["model"]["weights_hash"]


def test_models_lists_the_zoo(capsys):
    code, out, _ = _run(capsys, "models", "--format", "json")
    names = {row["model"] for row in json.loads(out)}
    assert {"smollm2-135m", "minilm-l6", "tiny-gpt2", "tiny-bert", "tiny-gemma"} <= names


def test_console_script_reports_errors_without_traceback():
    result = subprocess.run([sys.executable, "-m", "layerscope.app.cli", "analyze", "residual-stats",
                             "--model", "nope"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("layerscope: error: unknown model") and "Traceback" not in result.stderr


def test_a_checkpoint_with_its_own_code_never_runs_it(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"},
    }))
    marker = tmp_path / "ran"
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (tmp_path / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    code, _, err = _run(capsys, "analyze", "residual-stats", "--no-save", "--model", str(tmp_path))
    assert code == 2 and err.startswith("layerscope: error: could not load")
    assert not marker.exists()


@pytest.mark.parametrize("argv", [["--help"], ["analyze", "--help"], ["survey", "--help"], ["ln-removal", "--help"]]
                         + [["analyze", name, "--help"] for name in __import__(
                             "layerscope.analysis.registry", fromlist=["METRICS"]).METRICS])
def test_every_help_page_renders(capsys, argv):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 0
    assert "usage: layerscope" in capsys.readouterr().out
