import pytest
import torch
from outlier_helpers import next_token_loss, small_windows

from layerscope.analysis.super_weights import METRIC, SuperWeightOptions
from layerscope.app.cli import main
from layerscope.probes.backends import Point
from layerscope.probes.errors import UserError
from layerscope.probes.interventions import set_activations
from layerscope.probes.weight_edits import down_proj_matrix, zeroed_down_proj_weights

LAYER, ROW, COL = 1, 9, 17


@pytest.fixture
def planted_weight(tiny_models):
    """tiny-llama with down_proj.weight[9, 17] of block 1 set to 50, restored afterwards."""
    loaded = tiny_models["llama"]
    matrix = down_proj_matrix(loaded, LAYER)
    original = matrix[ROW, COL].item()
    with torch.no_grad():
        matrix[ROW, COL] = 50.0
    yield loaded
    with torch.no_grad():
        matrix[ROW, COL] = original


def test_a_planted_super_weight_is_found_and_ablated(planted_weight):
    loaded = planted_weight
    windows = small_windows(loaded, max_tokens=64)
    # A spike on input dim 17 of block 1 at position 5 meets the planted weight.
    with set_activations(loaded, Point("mlp_act", LAYER), positions=[5], dims=[COL], values=40.0):
        tables = METRIC(loaded, windows, SuperWeightOptions(ablate=True))
        with zeroed_down_proj_weights(loaded, [(LAYER, ROW, COL)]):
            expected = next_token_loss(loaded, windows)
        clean = next_token_loss(loaded, windows)
    weight = tables["super_weight"].iloc[0]
    assert (weight["layer"], weight["row"], weight["col"], weight["value"]) == (LAYER, ROW, COL, 50.0)
    assert weight["position"] == 5 and weight["spike"] and weight["weight_rank"] == 1
    scan = tables["super_weight_scan"].set_index("layer")
    assert scan.loc[LAYER, "max_in"] == pytest.approx(40.0)
    assert scan.loc[LAYER, "max_out"] == pytest.approx(40.0 * 50.0, rel=0.01)
    effect = tables["super_weight_ablation"].set_index("intervention")
    assert effect.loc["none", "loss"] == pytest.approx(clean, rel=1e-5)
    assert effect.loc["zero", "loss"] == pytest.approx(expected, rel=1e-5)
    assert down_proj_matrix(loaded, LAYER)[ROW, COL].item() == 50.0  # restored
    assert "down_proj.weight[9, 17] = 50" in METRIC.summarize(tables)[0]
    (figure,) = METRIC.figures(tables)
    assert [trace.name for trace in figure.data] == ["down_proj input", "down_proj output"]


def test_conv1d_weights_are_read_as_output_by_input(tiny_models):
    loaded = tiny_models["gpt2"]
    conv = loaded.adapter.layer_part(loaded.model, 0, loaded.adapter.down_proj)
    matrix = down_proj_matrix(loaded, 0)
    assert matrix.shape == (loaded.d_model, conv.weight.shape[0])
    before = conv.weight[17, 9].item()
    with zeroed_down_proj_weights(loaded, [(0, 9, 17)]):
        assert conv.weight[17, 9].item() == 0.0
    assert conv.weight[17, 9].item() == before


def test_a_chosen_layer_and_bad_layers(tiny_models):
    loaded = tiny_models["llama"]
    tables = METRIC(loaded, small_windows(loaded, max_tokens=64), SuperWeightOptions(layer=2))
    assert tables["super_weight"]["layer"].iloc[0] == 2
    with pytest.raises(UserError, match="out of range"):
        METRIC(loaded, small_windows(loaded, max_tokens=64), SuperWeightOptions(layer=4))
    with pytest.raises(UserError, match="layer must be >= 0"):
        SuperWeightOptions(layer=-1)
    with pytest.raises(UserError, match="encoder"):
        METRIC(tiny_models["bert"], small_windows(tiny_models["bert"], max_tokens=64), SuperWeightOptions(ablate=True))


def test_bad_layer_on_the_cli_is_one_line(capsys):
    assert main(["analyze", "super-weights", "--model", "tiny-llama", "--layer", "-2", "--no-save"]) == 2
    assert capsys.readouterr().err == "layerscope: error: layer must be >= 0, got -2\n"


@pytest.mark.real
def test_smollm2_super_weight_sits_in_block_11(smollm2, one_thread):
    windows = small_windows(smollm2, max_tokens=32)
    tables = METRIC(smollm2, windows, SuperWeightOptions(ablate=True))
    weight = tables["super_weight"].iloc[0]
    assert (weight["layer"], weight["row"], weight["col"]) == (11, 507, 1229)
    assert weight["position"] == 0 and weight["max_out"] > 15_000
    assert tables["super_weight_ablation"].set_index("intervention").loc["zero", "delta_loss"] > 0
