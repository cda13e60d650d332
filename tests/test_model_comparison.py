"""`layerscope compare`: models side by side by relative depth, checked against HF hidden states."""

import json

import pytest
import torch

import layerscope as ls
from layerscope.app.cli import main


def test_compare_joins_models_by_relative_depth(tmp_path, capsys):
    page = tmp_path / "compare.html"
    assert main(["compare", "--models", "tiny-llama,tiny-gemma3", "--max-tokens", "128", "--seq-len", "32",
                 "--runs-dir", str(tmp_path / "runs"), "-o", str(page), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    depth = {(r["model"], r["layer"]): r for r in out["depth_comparison"]}
    assert {r["placement"] for r in out["depth_comparison"]} == {"pre", "peri"}
    assert depth[("tiny-gemma3", 0)]["relative_depth"] == 0.5 and depth[("tiny-llama", 3)]["relative_depth"] == 1.0

    model = ls.load_model("tiny-llama")
    ids = ls.windows(model, "stdlib", seq_len=32, max_tokens=128).input_ids
    with torch.no_grad():
        hidden = model.model(ids, output_hidden_states=True).hidden_states
    norms = [hidden[layer + 1][:, 1:].double().norm(dim=-1).mean().item() for layer in range(3)]
    for layer in range(3):
        assert depth[("tiny-llama", layer)]["mean_norm"] == pytest.approx(norms[layer], rel=1e-5)
        assert depth[("tiny-llama", layer)]["norm_over_block_0"] == pytest.approx(norms[layer] / norms[0], rel=1e-5)
    growth = {r["model"]: r for r in out["growth_comparison"]}["tiny-llama"]
    assert growth["growth_per_tenth_of_depth"] == pytest.approx(growth["growth_per_layer"] ** 0.4, rel=1e-9)
    assert len(out["runs"]) == 2 and all((tmp_path / "runs").glob("*survey-tiny-llama*"))
    assert "plotly" in page.read_text() and "relative depth" in page.read_text()


@pytest.mark.parametrize("models", ["tiny-llama", "tiny-llama,tiny-llama", ",".join(["tiny-llama"] * 9)])
def test_compare_refuses_a_bad_model_list_in_one_line(models, capsys):
    assert main(["compare", "--models", models, "--no-save"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--models" in err[0]


def test_the_figure_colours_each_model_once_and_labels_log_axes_at_face_value():
    """Plotly's own log ticks label 2 and 5 with bare digits ("9, 1, 2, 3" up an axis);
    every log panel must carry the shared theme's labels instead."""
    import pandas as pd

    from layerscope.analysis.model_comparison import PANELS, figure

    depth = pd.DataFrame([{"model": m, "placement": p, "layer": l, "relative_depth": (l + 1) / 4,
                           **{column: scale * (1.5 + l) ** 2 for column, _, _ in PANELS}}
                          for m, p, scale in (("a", "pre", 1.0), ("b", "peri", 3.0)) for l in range(4)])
    fig = figure(depth)
    layout = fig.layout
    colours = {}
    for trace in fig.data:  # each model keeps one colour across the four panels
        colours.setdefault(trace.legendgroup, set()).add(trace.line.color)
    assert len(colours) == 2 and all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == 2
    logs = [layout[name] for name in layout if name.startswith("yaxis") and layout[name].type == "log"]
    assert logs and all(axis.tickmode == "array" or axis.exponentformat == "power" for axis in logs)
    for axis in logs:
        if axis.tickmode == "array":
            assert list(axis.ticktext) == [f"{t:.3g}" for t in axis.tickvals] and list(axis.tickvals) == sorted(axis.tickvals)
