import pytest
import torch
from outlier_helpers import small_windows

from layerscope.analysis.int8_outliers import (
    METRIC,
    Int8Options,
    outlier_cells,
    outlier_features,
    outlier_layers,
    probe,
)
from layerscope.app.cli import main
from layerscope.probes.capture import Capture, capture
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module
from layerscope.probes.outlier_reducers import OutlierCounts, ProjectionOutliersResult


def _hand_capture(counts: torch.Tensor, tokens: int) -> Capture:
    max_abs = counts.double() * 0.1 + 6.0 * (counts > 0)
    sites = (OutlierCounts(counts[:, s], max_abs[:, s]) for s in range(2))  # attn_in, mlp_in
    result = ProjectionOutliersResult(6.0, tokens, *sites)
    return Capture({"projection_outliers": result}, "hand", counts.shape[0], tokens, "hand", 0.0, 0)


def test_thresholds_on_a_hand_built_case():
    counts = torch.zeros(8, 2, 10, dtype=torch.long)  # 8 layers, 2 sites, 10 dims; 100 tokens
    counts[:2, 0, 3] = 10    # dim 3: 10% of tokens in 2 of 8 layers (25%) -> outlier
    counts[:, 1, 5] = 5      # dim 5: 5% of tokens in every layer -> below the 6% token threshold
    counts[4:7, 1, 6] = 6    # dim 6: exactly 6% in 3 layers -> outlier
    counts[0, 0, 7] = 90     # dim 7: 90% of tokens but in one layer (12.5%) -> not
    counts[0, 0, 8] = 7      # dim 8: qualifies at attn_in in layer 0 ...
    counts[1, 1, 8] = 7      # ... and at mlp_in in layer 1: two layers -> outlier
    cells = outlier_cells(_hand_capture(counts, 100))
    features = outlier_features(cells, 8).set_index("dim")
    assert sorted(features.index) == [3, 6, 8]
    assert features.loc[3, "layers_affected"] == 2 and features.loc[3, "layer_frac"] == 0.25
    assert features.loc[6, "max_token_frac"] == pytest.approx(0.06)
    assert features.loc[8, "sites"] == "attn_in,mlp_in"
    stricter = outlier_features(cells, 8, min_layer_frac=0.3, min_token_frac=0.06)
    assert stricter["dim"].tolist() == [6]
    looser = outlier_features(cells, 8, min_layer_frac=0.1, min_token_frac=0.05)
    assert sorted(looser["dim"]) == [3, 5, 6, 7, 8]
    layers = outlier_layers(cells, 8).set_index(["layer", "site"])
    assert layers.loc[(0, "attn_in"), "dims_over"] == 3 and layers.loc[(0, "attn_in"), "dims_affected"] == 3
    assert layers.loc[(0, "mlp_in"), "dims_affected"] == 0


def test_counts_match_the_projection_inputs_read_directly(tiny_models):
    loaded = tiny_models["qwen2"]
    windows = small_windows(loaded)
    threshold = 2.0  # random weights give no |x| >= 6
    cells = outlier_cells(capture(loaded, windows, probe(Int8Options(threshold=threshold), loaded), progress=False))
    inputs = []
    q_proj = get_module(loaded.adapter.layer_modules(loaded.model)[1], "self_attn.q_proj")
    handle = q_proj.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    try:
        with torch.no_grad():
            for ids in windows:
                loaded.model(ids)
    finally:
        handle.remove()
    x = torch.cat(inputs).abs().flatten(0, 1)
    direct = (x >= threshold).sum(0)
    ours = cells[(cells.layer == 1) & (cells.site == "attn_in")].set_index("dim")
    assert direct.sum() > 0
    assert sorted(ours.index) == torch.nonzero(direct).flatten().tolist()
    for dim in ours.index:
        assert ours.loc[dim, "token_frac"] == pytest.approx(direct[dim].item() / x.shape[0])
        assert ours.loc[dim, "max_abs"] == pytest.approx(x[:, dim].max().item())


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 0}, "threshold must be positive"),
    ({"min_layer_frac": 0}, r"min_layer_frac must be in \(0, 1\]"),
    ({"min_token_frac": 1.5}, r"min_token_frac must be in \(0, 1\]"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(UserError, match=message):
        Int8Options(**kwargs)


def test_bad_option_on_the_cli_is_one_line(capsys):
    assert main(["analyze", "int8-outliers", "--model", "tiny-llama", "--min-layer-frac", "2", "--no-save"]) == 2
    assert capsys.readouterr().err == "layerscope: error: min_layer_frac must be in (0, 1], got 2.0\n"


def test_summary_with_no_outliers(tiny_models):
    loaded = tiny_models["gpt2"]
    windows = small_windows(loaded, max_tokens=64)
    tables = METRIC(loaded, windows)
    assert tables["int8_features"].empty
    assert METRIC.summarize(tables)[0].startswith("int8-outliers: 0 outlier feature dims; the largest")
    assert METRIC.figures(tables)[0].data == ()
