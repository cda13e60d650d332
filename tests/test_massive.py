import pytest
import torch
from outlier_helpers import hand_capture, next_token_loss, small_windows

from layerscope.analysis.massive import (
    METRIC,
    MassiveOptions,
    massive_activations,
    massive_dims,
    massive_persistence,
    probe,
)
from layerscope.app.cli import main
from layerscope.probes.backends import Point
from layerscope.probes.capture import capture
from layerscope.probes.errors import UserError
from layerscope.probes.interventions import set_activations
from layerscope.probes.outlier_reducers import MassiveActivations


def test_planted_massive_values_are_found_at_their_position_and_dim(tiny_models):
    loaded = tiny_models["llama"]
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 256, (3, 16), generator=generator)
        acts = {Point("resid_post", l): torch.randn(3, 16, 64, generator=generator) for l in range(4)}
        acts[Point("resid_post", 2)][:, 0, 5] = -3000.0  # every window's first token
        batches.append((ids, acts))
    batches[1][1][Point("resid_post", 2)][1, 7, 11] = 5000.0  # window 4 of the corpus
    everything = {l: torch.cat([acts[Point("resid_post", l)] for _, acts in batches]) for l in range(4)}
    captured = hand_capture(loaded, MassiveActivations(k=3), batches)

    top = massive_activations(captured).query("layer == 2").set_index("rank")
    assert (top.loc[1, "value"], top.loc[1, "window"], top.loc[1, "position"], top.loc[1, "dim"]) == (5000.0, 4, 7, 11)
    assert top.loc[1, "token_id"] == batches[1][0][1, 7].item()
    # The first token's -3000 appears in all six windows but is one (position, dim) pair.
    assert (top.loc[2, "value"], top.loc[2, "position"], top.loc[2, "dim"]) == (-3000.0, 0, 5)
    rest = everything[2].clone()
    rest[:, 0, 5] = 0
    rest[4, 7, 11] = 0
    assert top.loc[3, "abs_value"] == pytest.approx(rest.abs().max().item())
    assert list(top["massive"]) == [True, True, False]
    exact_median = everything[2].abs().median().item()
    assert top.loc[1, "median_abs"] == pytest.approx(exact_median, rel=0.012)
    assert not massive_activations(captured).query("layer != 2")["massive"].any()

    dims = massive_dims(captured)
    hit = dims.query("massive").set_index("dim")
    assert sorted(hit.index) == [5, 11] and set(hit["layer"]) == {2}
    assert (hit.loc[5, "over_first"], hit.loc[5, "over_rest"]) == (6, 0)
    assert (hit.loc[11, "over_first"], hit.loc[11, "over_rest"], hit.loc[11, "window"]) == (0, 1, 4)
    persistence = massive_persistence(dims)
    assert persistence[["dim", "first_layer", "last_layer", "layers"]].values.tolist() == [[5, 2, 2, "2"], [11, 2, 2, "2"]]


def test_planted_activation_in_a_model_and_zero_versus_mean(tiny_models):
    loaded = tiny_models["llama"]
    windows = small_windows(loaded)
    options = MassiveOptions(intervene="both")
    with set_activations(loaded, Point("resid_post", 1), positions=[3], dims=[7], values=10_000.0):
        tables = METRIC(loaded, windows, options)
        top = tables["massive_top"].query("layer == 1 and rank == 1").iloc[0]
        assert (top["position"], top["dim"], top["value"], top["massive"]) == (3, 7, 10_000.0, True)
        persistence = tables["massive_persistence"].set_index("dim")
        assert persistence.loc[7, "first_layer"] == 1
        # Independently: the loss with the planted value itself set to 0.
        with set_activations(loaded, Point("resid_post", 1), positions=[3], dims=[7], values=0.0):
            expected_zero = next_token_loss(loaded, windows)
    effect = tables["massive_intervention"].set_index("intervention")
    assert effect.loc["none", "layer"] == 1 and effect.loc["none", "dims"] == "7"
    assert effect.loc["none", "entries"] == windows.input_ids.shape[0]
    assert effect.loc["zero", "loss"] == pytest.approx(expected_zero, rel=1e-5)
    # Every planted entry is 10000, so their mean is 10000 and nothing changes.
    assert effect.loc["mean", "values"] == "10000"
    assert effect.loc["mean", "delta_loss"] == pytest.approx(0.0, abs=1e-6)
    assert METRIC.summarize(tables)[0].startswith("massive: dims 7 of the block output become massive at block 1")
    top_figure, persistence_figure = METRIC.figures(tables)
    assert len(top_figure.data) == 4 and list(persistence_figure.data[0].y) == ["dim 7"] * 3
    # The token x dim picture opens where the activation appears, and shows the planted
    # cell of the first window at 10,000 with every other dim's largest |x| beside it.
    (view,) = METRIC.views_for(tables)
    assert view.defaults(tables) == {"layer": 1}
    example = tables["massive_example"].query("layer == 1")
    planted = example.query("position == 3 and dim == 7")["abs_value"]
    assert planted.tolist() == [10_000.0]
    assert example.query("dim == -1")["abs_value"].max() < 10_000.0
    heatmap = view.figure(tables).data[0]
    assert "dim 7" in heatmap.x and heatmap.customdata.max() == 10_000.0


def test_state_size_does_not_grow_with_the_corpus(tiny_models):
    loaded = tiny_models["gpt2"]
    spec = probe(MassiveOptions(), loaded)
    short = capture(loaded, small_windows(loaded), spec, progress=False)
    long = capture(loaded, small_windows(loaded, max_tokens=512), spec, progress=False)
    assert long.n_tokens == 4 * short.n_tokens
    assert long.peak_state_bytes == short.peak_state_bytes > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k must be between 1 and 1000"),
    ({"top_k": 100_000_000}, "top_k must be between 1 and 1000"),
    ({"min_value": float("nan")}, "min_value must be a finite number"),
    ({"min_value": float("inf")}, "min_value must be a finite number"),
    ({"min_ratio": float("nan")}, "min_ratio must be positive"),
    ({"min_ratio": 0}, "min_ratio must be positive"),
    ({"intervene": "half"}, "intervene must be one of"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(UserError, match=message):
        MassiveOptions(**kwargs)


def test_bad_input_on_the_cli_is_one_line(capsys):
    assert main(["analyze", "massive", "--model", "tiny-llama", "--top-k", "0", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert err == "layerscope: error: top_k must be between 1 and 1000, got 0\n"


def test_intervening_on_an_encoder_is_a_user_error(tiny_models):
    loaded = tiny_models["bert"]
    with pytest.raises(UserError, match="encoder"):
        METRIC(loaded, small_windows(loaded), MassiveOptions(intervene="zero"))


def test_no_massive_activation_means_nothing_to_intervene_on(tiny_models):
    loaded = tiny_models["llama"]
    with pytest.raises(UserError, match="nothing to intervene on"):
        METRIC(loaded, small_windows(loaded), MassiveOptions(intervene="zero"))


@pytest.mark.real
def test_smollm2_massive_activation_appears_at_block_11_and_zeroing_it_breaks_the_model(smollm2, one_thread):
    windows = small_windows(smollm2, max_tokens=32)
    tables = METRIC(smollm2, windows, MassiveOptions(intervene="both"))
    dims = tables["massive_dims"].query("massive")
    assert dims["layer"].min() == 11
    first = dims.query("layer == 11").set_index("dim")
    assert 507 in first.index and first.loc[507, "position"] == 0 and first.loc[507, "max_abs"] > 15_000
    assert tables["massive_top"].query("layer == 10")["massive"].sum() == 0
    effect = tables["massive_intervention"].set_index("intervention")
    assert effect.loc["zero", "delta_loss"] > 3.0
    assert abs(effect.loc["mean", "delta_loss"]) < 0.05 * effect.loc["zero", "delta_loss"]
