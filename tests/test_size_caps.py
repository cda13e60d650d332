"""Every size option has a cap, in the CLI, the API and the app's widgets; bad numbers are
one line and exit 2, before any model runs."""

from dataclasses import fields

import pytest

from layerscope.analysis.registry import METRICS
from layerscope.app.cli import main
from layerscope.probes.errors import UserError

BAD = [
    (["analyze", "massive", "--top-k", "100000000"], "top_k must be between 1 and 1000"),
    (["analyze", "sinks", "--top-dims", "100000"], "top_dims must be between 1 and 4096"),
    (["analyze", "sinks", "--keys", "100000"], "keys must be between 1 and 4096"),
    (["analyze", "block-influence", "--angular", "100000"], "angular must be between 0 and 4096"),
    (["analyze", "prune-curve", "--eval-tokens", "0"], "eval_tokens must be between 1 and 1000000"),
    (["analyze", "int8-outliers", "--threshold", "nan"], "threshold must be a finite number"),
    (["analyze", "massive", "--min-value", "inf"], "min_value must be a finite number"),
    (["analyze", "layer-skip", "--layers", "1,1"], "names layer 1 more than once"),
    (["analyze", "layer-skip", "--layers", ","], "names no layer"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a[1:3]) for a, _ in BAD])
def test_bad_sizes_are_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--model", "tiny-llama", "--no-save", "--max-tokens", "64", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_sinks_top_dims_is_capped_by_the_model_width(tiny_models):
    from outlier_helpers import small_windows

    loaded = tiny_models["llama"]
    with pytest.raises(UserError, match="top_dims 100 is above d_model"):
        METRICS["sinks"](loaded, small_windows(loaded), METRICS["sinks"].options(top_dims=100))


def test_every_integer_size_option_declares_a_cap():
    for metric in METRICS.values():
        for f in fields(metric.options):
            if "int" in str(f.type) and "bool" not in str(f.type):
                assert "max" in f.metadata, f"{metric.name}.{f.name} has no cap"
            if "float" in str(f.type):
                assert "min" in f.metadata, f"{metric.name}.{f.name} has no lower bound"


def test_app_widgets_carry_the_caps():
    from streamlit.testing.v1 import AppTest

    def page():
        import streamlit as st

        from layerscope.analysis.registry import METRICS
        from layerscope.app import ui

        with ui.user_errors():
            ui.option_controls(METRICS["massive"])
        st.write("ok")

    at = AppTest.from_function(page).run()
    top_k = at.number_input(key="massive.top_k")
    assert top_k.max == 1000 and top_k.min == 1
