"""The Compare page's difference of two runs' tables, on hand-built tables."""

import numpy as np
import pandas as pd
import pytest

from layerscope.analysis.overlay import difference, difference_figure, partner_run, row_keys
from layerscope.probes.errors import UserError


def curve(ce, removed):
    return pd.DataFrame({"method": ["bi_order"] * 3 + ["greedy"] * 3, "n_removed": [0, 1, 2] * 2,
                         "removed": removed, "layer_removed": [-1, 3, 1, -1, 2, 0], "ce": ce,
                         "sinking": [True] * 6})


def test_rows_are_named_by_the_shortest_leading_run_of_non_float_columns():
    assert row_keys(curve([0.0] * 6, [""] * 6)) == ("method", "n_removed")
    assert row_keys(pd.DataFrame({"layer": [0, 1], "bi": [0.5, 0.1]})) == ("layer",)
    assert row_keys(pd.DataFrame({"eps": [0.3], "rate": [0.5]})) == ()


def test_numeric_columns_are_subtracted_row_against_matching_row():
    first = curve([5.0, 5.5, 6.0, 5.0, 5.2, 5.4], ["", "3", "1,3", "", "2", "0,2"])
    # The second run lists its rows in another order and lacks greedy's last step.
    second = curve([4.0, 4.1, 4.7, 4.0, 4.05, 9.9], ["", "1", "1,2", "", "2", "2,3"]).iloc[[4, 0, 2, 1, 3]]
    diff = difference(first, second)
    assert diff.keys == ("method", "n_removed")
    assert diff.columns == ["layer_removed", "ce"]  # neither the text nor the bool column
    got = diff.table.set_index(["method", "n_removed"])
    assert len(got) == 5 and ("greedy", 2) not in got.index
    assert got.loc[("bi_order", 2), "ce"] == pytest.approx(4.7 - 6.0)
    assert got.loc[("greedy", 1), "ce"] == pytest.approx(4.05 - 5.2)
    assert got.loc[("bi_order", 1), "layer_removed"] == 0  # 3 against 3


def test_a_one_row_summary_is_matched_row_by_row_and_unmatched_tables_are_refused():
    diff = difference(pd.DataFrame({"eps": [0.3], "rate": [0.5]}), pd.DataFrame({"eps": [0.3], "rate": [0.25]}))
    assert diff.keys == ("row",) and diff.table["rate"].tolist() == [-0.25]
    with pytest.raises(UserError, match="differ in length"):
        difference(pd.DataFrame({"rate": [0.5]}), pd.DataFrame({"rate": [0.5, 0.1]}))
    with pytest.raises(UserError, match="no row in common on layer"):
        difference(pd.DataFrame({"layer": [1], "v": [1.0]}), pd.DataFrame({"layer": [2], "v": [1.0]}))
    with pytest.raises(UserError, match="no numeric column"):
        difference(pd.DataFrame({"layer": [1], "token": ["a"]}), pd.DataFrame({"layer": [1], "token": ["b"]}))


def test_the_difference_figure_draws_one_line_per_method_against_the_count():
    first = curve([5.0, 5.5, 6.0, 5.0, 5.2, 5.4], [""] * 6)
    second = curve([5.0, 5.0, 5.0, 5.0, 5.0, 5.0], [""] * 6)
    fig = difference_figure(difference(first, second), "ce", "ce, b minus a")
    assert [t.name for t in fig.data] == ["bi_order", "greedy"]
    np.testing.assert_allclose(fig.data[0].y, [0.0, -0.5, -1.0])
    np.testing.assert_allclose(fig.data[1].y, [0.0, -0.2, -0.4])
    assert fig.layout.xaxis.title.text == "n removed" and fig.layout.yaxis.title.text == "difference in ce"
    assert fig.layout.xaxis.dtick == 1
    bars = difference_figure(difference(pd.DataFrame({"site": ["attn", "mlp"], "k": [3.0, 4.0]}),
                                        pd.DataFrame({"site": ["attn", "mlp"], "k": [1.0, 1.0]})), "k", "k")
    assert bars.data[0].type == "bar" and list(bars.data[0].x) == ["attn", "mlp"]
    np.testing.assert_allclose(bars.data[0].y, [-2.0, -3.0])


def test_the_default_partner_is_the_first_other_run_sharing_a_measurement():
    runs = [{"run_id": "c", "metric": "residual-stats"}, {"run_id": "b", "metric": "block-influence"},
            {"run_id": "s", "metric": "survey", "metrics": ["massive", "block-influence"]},
            {"run_id": "a", "metric": "residual-stats"}]
    assert partner_run(runs, "c") == "a"
    assert partner_run(runs, "b") == "s"
    assert partner_run(runs, "s") == "b"
    assert partner_run([{"run_id": "x", "metric": "massive"}, {"run_id": "y", "metric": "sinks"}], "x") is None
