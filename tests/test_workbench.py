"""The app's input checks and run keys, without Streamlit."""

import json
from dataclasses import fields

import pytest

from layerscope.analysis.registry import METRICS
from layerscope.app.workbench import AppSettings, checked_model_name, corpus_choice, measurement_key
from layerscope.probes.errors import UserError


@pytest.fixture
def settings(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    return AppSettings(tmp_path / "runs", (allowed,), max_text_chars=100)


def test_zoo_names_and_hub_ids_pass_through(settings):
    assert checked_model_name(" tiny-llama ", settings) == "tiny-llama"
    assert checked_model_name("someorg/some-model", settings) == "someorg/some-model"


def test_local_models_must_live_in_an_allowed_folder(settings, tmp_path):
    inside = settings.allowed_dirs[0] / "model"
    inside.mkdir()
    assert checked_model_name(str(inside), settings) == str(inside.resolve())
    for outside in ("/etc", str(tmp_path), str(settings.allowed_dirs[0] / ".." / "runs")):
        with pytest.raises(UserError, match="outside the folders this app may read"):
            checked_model_name(outside, settings)


def test_a_symlink_cannot_lead_out_of_an_allowed_folder(settings, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    (settings.allowed_dirs[0] / "link").symlink_to(secret)
    with pytest.raises(UserError, match="outside the folders"):
        checked_model_name(str(settings.allowed_dirs[0] / "link"), settings)


@pytest.mark.parametrize("config_name", ["config.json", "tokenizer_config.json"])
def test_models_that_ship_their_own_code_are_refused(settings, config_name):
    folder = settings.allowed_dirs[0] / "custom"
    folder.mkdir()
    (folder / config_name).write_text(json.dumps({"model_type": "x", "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(UserError, match="never runs code shipped with a model"):
        checked_model_name(str(folder), settings)


@pytest.mark.parametrize("text, message", [
    ("", "the text is empty"), ("  \n ", "the text is empty"),
    ("x" * 101, "the text has 101 characters, over the cap of 100"),
])
def test_bad_text_is_refused_with_the_cap_named(settings, text, message):
    with pytest.raises(UserError, match=message):
        corpus_choice("text", text, "", 64, 512, settings)


def test_corpus_files_must_exist_inside_an_allowed_folder(settings, tmp_path):
    with pytest.raises(UserError, match="outside the folders"):
        corpus_choice("file", "", str(tmp_path / "c.txt"), 64, 512, settings)
    with pytest.raises(UserError, match="does not exist"):
        corpus_choice("file", "", str(settings.allowed_dirs[0] / "c.txt"), 64, 512, settings)


def test_the_run_key_follows_model_corpus_content_and_options(settings):
    metric = METRICS["residual-stats"]
    options = metric.options()
    text = corpus_choice("text", "some text", "", 64, 512, settings)
    key = measurement_key(metric, "tiny-llama", text, options, "hooks")
    assert key == measurement_key(metric, "tiny-llama", corpus_choice("text", "some text", "", 8, 9, settings),
                                  options, "hooks"), "typed text is measured whole: window settings do not apply"
    assert key != measurement_key(metric, "tiny-gpt2", text, options, "hooks")
    assert key != measurement_key(metric, "tiny-llama", corpus_choice("text", "other", "", 64, 512, settings),
                                  options, "hooks")
    assert key != measurement_key(metric, "tiny-llama", text, options, "nnsight")
    corpus_file = settings.allowed_dirs[0] / "c.txt"
    corpus_file.write_text("first version")
    before = measurement_key(metric, "tiny-llama", corpus_choice("file", "", str(corpus_file), 64, 512, settings),
                             options, "hooks")
    corpus_file.write_text("second version")
    after = measurement_key(metric, "tiny-llama", corpus_choice("file", "", str(corpus_file), 64, 512, settings),
                            options, "hooks")
    assert before != after, "an edited corpus file is a different corpus"


def test_different_options_give_different_keys(settings):
    metric, flag = next((m, f.name) for m in METRICS.values() for f in fields(m.options) if f.default is False)
    text = corpus_choice("text", "some text", "", 64, 512, settings)
    assert (measurement_key(metric, "tiny-llama", text, metric.options(), "hooks")
            != measurement_key(metric, "tiny-llama", text, metric.options(**{flag: True}), "hooks"))
