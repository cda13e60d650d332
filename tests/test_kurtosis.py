import numpy as np
import pytest
import scipy.stats
import torch
from outlier_helpers import small_windows

from layerscope.analysis.kurtosis import METRIC, PROBE, kurtosis_by_layer
from layerscope.probes.capture import capture
from layerscope.probes.outlier_reducers import token_excess_kurtosis


def _scipy(x: torch.Tensor) -> np.ndarray:
    return np.maximum(scipy.stats.kurtosis(x.double().numpy(), axis=-1, fisher=True, bias=True), 0)


def test_token_kurtosis_matches_scipy():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=generator) ** 3  # heavy tails
    x[0, 1] = 0.0
    x[0, 1, 9] = 500.0  # one dim alone
    x[1, 2] = torch.linspace(-1, 1, 64)  # platykurtic: floored at 0
    ours = token_excess_kurtosis(x).numpy()
    np.testing.assert_allclose(ours, _scipy(x), rtol=1e-9)
    assert ours[1, 2] == 0.0
    # One nonzero dim among d: excess kurtosis (d^2 - 3d + 3)/(d - 1) - 3.
    assert ours[0, 1] == pytest.approx((64**2 - 3 * 64 + 3) / 63 - 3, rel=1e-12)


def test_kurtosis_per_layer_against_hidden_states(tiny_models):
    loaded = tiny_models["llama"]
    windows = small_windows(loaded)
    table = kurtosis_by_layer(capture(loaded, windows, PROBE, progress=False))
    with torch.no_grad():
        hidden = loaded.model(windows.input_ids, output_hidden_states=True).hidden_states
    rows = table[table.site == "resid_post"].set_index("layer")
    for layer in range(loaded.n_layers - 1):  # the last hidden state is after the final norm
        direct = _scipy(hidden[layer + 1])
        assert rows.loc[layer, "kurtosis"] == pytest.approx(direct.mean(), rel=1e-6)
        assert rows.loc[layer, "kurtosis_first"] == pytest.approx(direct[:, 0].mean(), rel=1e-6, abs=1e-12)
        assert rows.loc[layer, "kurtosis_rest"] == pytest.approx(direct[:, 1:].mean(), rel=1e-6)


def test_kurtosis_tables_and_summary(tiny_models):
    tables = METRIC(tiny_models["gpt-neox"], small_windows(tiny_models["gpt-neox"]), METRIC.options())
    assert set(tables["kurtosis"]["site"]) == {"resid_post", "attn_in", "mlp_in"}
    overall = tables["kurtosis_overall"].set_index("site")
    by_layer = tables["kurtosis"]
    assert overall.loc["mlp_in", "kurtosis"] == pytest.approx(by_layer[by_layer.site == "mlp_in"]["kurtosis"].mean())
    line = METRIC.summarize(tables)[0]
    peak = overall.loc["resid_post"]
    assert line.startswith(f"kurtosis: mean excess kurtosis over layers: resid_post {peak['kurtosis']:.4g} "
                           f"(peak {peak['peak_kurtosis']:.4g} at block {int(peak['peak_layer'])});")
    assert len(METRIC.figures(tables)[0].data) == 6
