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


NO_TORCH = """
import sys
from layerscope.app.cli import main
code = main(sys.argv[1:])
heavy = sorted(name for name in ("torch", "transformers", "transformer_lens", "nnsight") if name in sys.modules)
print("HEAVY", code, heavy)
"""


@pytest.mark.parametrize("argv", [["models"], ["runs", "list"], ["runs", "list", "--format", "json"]])
def test_models_and_runs_list_do_not_import_torch(tmp_path, argv):
    result = subprocess.run([sys.executable, "-c", NO_TORCH, *argv, *(["--runs-dir", str(tmp_path)] if "runs" in argv
                                                                      else [])],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "HEAVY 0 []", result.stdout + result.stderr


def test_help_does_not_import_torch():
    code = NO_TORCH.replace("code = main(sys.argv[1:])", "try:\n    main(['--help'])\nexcept SystemExit as e:\n"
                                                          "    code = e.code")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "HEAVY 0 []"


def test_the_torch_free_model_list_names_the_models_the_zoo_builds():
    from layerscope.probes import catalogue, zoo

    assert catalogue.TINY_FAMILIES == zoo.TINY_FAMILIES
    assert [row["model"] for row in catalogue.list_models()] == zoo.known_model_names()


def test_models_table(capsys):
    code, out, _ = _run(capsys, "models")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["model", "kind", "description"]
    assert any(line.split()[:2] == ["tiny-llama", "tiny"] for line in lines)


def _option_help(argv: list[str], capsys) -> dict[str, str]:
    """Each option's help text on the help page of `argv`, joined into one line."""
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    blocks, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    blocks.pop("-h", None)
    return blocks


HELP_PAGES = ([[], ["models"], ["survey"], ["compare"], ["runs", "list"], ["runs", "show"], ["runs", "rm"],
               ["runs", "export"], ["runs", "query"], ["report"], ["app"], ["ln-removal"]]
              + [["analyze", name] for name in __import__("layerscope.analysis.registry", fromlist=["METRICS"]).METRICS])


@pytest.mark.parametrize("argv", HELP_PAGES, ids=" ".join)
def test_every_help_line_gives_its_default(capsys, argv):
    options = _option_help(argv, capsys)
    assert argv == [] or options, "a page with no options parsed means the parsing broke"
    missing = {flag: text for flag, text in options.items() if "default" not in text}
    assert not missing
    assert not [text for text in options.values() if "(default None)" in text or "(default )" in text]


def test_help_defaults_are_the_parsers_defaults(capsys):
    options = _option_help(["analyze", "layer-skip"], capsys)
    assert options["--seq-len"].endswith("(default 128)") and options["--part"].endswith("(default block)")
    assert options["--no-save"].endswith("(default off)") and "(default table)" in options["--format"]


@pytest.mark.parametrize("argv", [["analyze", "residual-stats"], ["survey"], ["compare"], ["ln-removal"], ["app"]])
def test_every_verb_that_loads_a_model_takes_threads(capsys, argv):
    assert "--threads" in _option_help(argv, capsys)


def test_app_passes_threads_to_the_server(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("os.execve", lambda path, command, env: seen.update(env))
    main(["app", "--threads", "3", "--runs-dir", str(tmp_path)])
    assert seen["OMP_NUM_THREADS"] == "3"
    assert main(["app", "--threads", "0"]) == 2


def test_printed_tables_quote_token_texts():
    import pandas as pd

    from layerscope.analysis.registry import METRICS

    grid = pd.DataFrame({"layer": [0, 0], "input_token": [" the", "\n"], "next_token": ["the", "\t"],
                         "top_token": [" ", "a"], "top_prob": [0.5, 0.25]})
    shown = METRICS["logit-lens"].display({"lens_grid": grid})["lens_grid"]
    assert shown["input_token"].tolist() == ['"\u2423the"', '"\u21b5"']
    assert shown["next_token"].tolist() == ['"the"', '"\u2192"'] and shown["top_token"].tolist() == ['"\u2423"', '"a"']
    assert shown["top_prob"].tolist() == [0.5, 0.25]
    massive = pd.DataFrame({"layer": [1], "dim": [3], "token_id": [5], "token": [" x"], "massive": [True]})
    tables = {"massive_top": massive, "massive_dims": massive, "massive_persistence": pd.DataFrame()}
    quoted = [t["token"].tolist() for t in METRICS["massive"].display(tables).values() if "token" in t]
    assert quoted == [['"\u2423x"'], ['"\u2423x"']]


def test_a_measured_run_lists_the_options_it_changed(capsys, tmp_path):
    small = ["--model", "tiny-llama", "--max-tokens", "64", "--seq-len", "16", "--runs-dir", str(tmp_path)]
    assert _run(capsys, "analyze", "layer-skip", "--part", "attn", "--layers", "1", *small)[0] == 0
    code, out, _ = _run(capsys, "runs", "list", "--runs-dir", str(tmp_path))
    lines = out.splitlines()
    assert code == 0 and lines[1].split()[1:] == ["complete", "stdlib", "64", "(4x16)"]
    assert lines[2].strip() == "options: part=attn layers=1"
