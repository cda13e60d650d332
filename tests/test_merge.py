"""Reducer states merge: folding two disjoint sets of windows apart and merging the states
gives what folding them all gives, for every reducer in the package, whatever the split."""

import dataclasses
import math
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from outlier_helpers import small_windows

from layerscope.analysis.registry import METRICS
from layerscope.analysis.runner import resolve_options
from layerscope.probes.backends import Point
from layerscope.probes.capture import Fold, ProbeSpec, capture, finish, fold, merge_states
from layerscope.probes.direct_logit import DirectLogitAttribution
from layerscope.probes.outlier_reducers import (
    AttentionSinks,
    MassiveActivations,
    NextTokenLoss,
    ProjectionOutliers,
    ResidualSinks,
    ThresholdedMean,
    TokenKurtosis,
)
from layerscope.probes.reducers import LayerCosines, LogitLens, ResidualMoments, SublayerRatios

N_WINDOWS, SEQ_LEN = 6, 8
# Thresholds low enough that a tiny random model's activations reach them.
EVERY_REDUCER = (
    ResidualMoments(),
    ResidualMoments(kinds=("mlp_act", "mlp_out"), name="mlp_extremes"),
    LayerCosines(span=2),
    LayerCosines(exclude_first=True, name="cosines_rest"),
    SublayerRatios(),
    LogitLens(),
    NextTokenLoss(),
    MassiveActivations(k=4, min_value=1.0),
    ThresholdedMean(Point("resid_post", 1), (0, 3, 5), threshold=0.5),
    ProjectionOutliers(threshold=1.0),
    TokenKurtosis(),
    AttentionSinks(),
    ResidualSinks(),
    DirectLogitAttribution(),
)
SPEC = ProbeSpec(EVERY_REDUCER)
_whole: dict = {}


def _part(windows, index: list[int]):
    return dataclasses.replace(windows, input_ids=windows.input_ids[index])


def _windows(loaded, batch_size: int):
    return small_windows(loaded, max_tokens=N_WINDOWS * SEQ_LEN, seq_len=SEQ_LEN, batch_size=batch_size)


def _whole_results(tiny_models, family: str, batch_size: int) -> dict:
    key = family, batch_size
    if key not in _whole:
        loaded = tiny_models[family]
        _whole[key] = capture(loaded, _windows(loaded, batch_size), SPEC, progress=False).results
    return _whole[key]


def assert_same_result(merged, whole, where: str = "") -> None:
    """Float64 sums to 1e-9 relative (the order of additions differs); everything else exact."""
    if dataclasses.is_dataclass(merged):
        assert type(merged) is type(whole), where
        for field in dataclasses.fields(merged):
            assert_same_result(getattr(merged, field.name), getattr(whole, field.name), f"{where}.{field.name}")
    elif isinstance(merged, dict):
        assert merged.keys() == whole.keys(), where
        for key in merged:
            assert_same_result(merged[key], whole[key], f"{where}[{key}]")
    elif isinstance(merged, torch.Tensor):
        assert merged.dtype == whole.dtype and merged.shape == whole.shape, where
        if merged.dtype == torch.float64:
            torch.testing.assert_close(merged, whole, rtol=1e-9, atol=1e-12, equal_nan=True, msg=where)
        else:
            assert torch.equal(merged, whole), where
    elif isinstance(merged, float):
        assert math.isclose(merged, whole, rel_tol=1e-9, abs_tol=1e-12), (where, merged, whole)
    else:
        assert merged == whole, where


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@settings(max_examples=10, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_folding_two_parts_and_merging_equals_folding_the_whole(tiny_models, family, data):
    batch_size = data.draw(st.sampled_from([1, 2, 4]), label="batch_size")
    groups = -(-N_WINDOWS // batch_size)
    # Windows go to a part a whole batch at a time, so that each part's batches are the
    # whole fold's (a float32 sum over a batch depends on which windows share it).
    in_first = data.draw(st.lists(st.booleans(), min_size=groups, max_size=groups), label="in_first")
    through_pickle = data.draw(st.booleans(), label="through_pickle")
    first_into_second = data.draw(st.booleans(), label="first_into_second")
    loaded = tiny_models[family]
    windows = _windows(loaded, batch_size)
    parts = []
    for wanted in (True, False):
        index = [w for w in range(N_WINDOWS) if in_first[w // batch_size] == wanted]
        parts.append(fold(loaded, _part(windows, index), SPEC, progress=False, window_index=torch.tensor(index, dtype=torch.long)))
    into, other = parts[::-1] if first_into_second else parts
    if through_pickle:  # as torch.distributed's gather_object sends it to rank 0
        other = pickle.loads(pickle.dumps(other))
    merged = finish(loaded, windows, into.merge(other))
    whole = _whole_results(tiny_models, family, batch_size)
    assert merged.results.keys() == whole.keys()
    for name in whole:
        assert_same_result(merged[name], whole[name], name)


def test_merged_states_give_every_measurement_s_tables(tiny_models):
    """Three ranks' folds of interleaved windows, merged on rank 0, give the tables of one capture."""
    loaded = tiny_models["llama"]
    windows = _windows(loaded, 1)
    streaming = [m for m in METRICS.values() if m.kind == "streaming" and m.applies_to(loaded)]
    options = {m.name: resolve_options(m, None, {}) for m in streaming}
    reducers = {r.name: r for m in streaming for r in m.probe(options[m.name], loaded).reducers}
    spec = ProbeSpec(tuple(reducers.values()))
    ranks = [fold(loaded, _part(windows, list(range(r, N_WINDOWS, 3))), spec, progress=False,
                  window_index=torch.arange(r, N_WINDOWS, 3)) for r in range(3)]
    gathered = [pickle.loads(pickle.dumps(f)) for f in ranks[1:]]
    for part in gathered:
        ranks[0].merge(part)
    merged = finish(loaded, windows, ranks[0])
    whole = capture(loaded, windows, spec, progress=False)
    for metric in streaming:
        expected = metric.tables(whole, loaded, options[metric.name])
        got = metric.tables(merged, loaded, options[metric.name])
        assert expected.keys() == got.keys(), metric.name
        for name, table in expected.items():
            torch.testing.assert_close(torch.tensor(got[name].select_dtypes("number").to_numpy(float)),
                                       torch.tensor(table.select_dtypes("number").to_numpy(float)),
                                       rtol=1e-9, atol=1e-12, equal_nan=True, msg=f"{metric.name} {name}")
            other = table.select_dtypes(exclude="number").columns
            assert got[name][other].astype(str).equals(table[other].astype(str)), f"{metric.name} {name}"


def test_merging_refuses_overlapping_or_incomplete_folds(tiny_models):
    loaded = tiny_models["llama"]
    windows = _windows(loaded, 2)
    spec = ProbeSpec((ResidualMoments(), LogitLens()))
    first = fold(loaded, _part(windows, [0, 1]), spec, progress=False, window_index=torch.tensor([0, 1]))
    again = fold(loaded, _part(windows, [0, 1]), spec, progress=False, window_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="share windows"):
        first.merge(again)
    with pytest.raises(ValueError, match="cover"):
        finish(loaded, windows, first)
    with pytest.raises(ValueError, match="different reducers"):
        merge_states(first.states, {"moments": again.states["moments"]})
    other_kinds = fold(loaded, _part(windows, [2, 3]), ProbeSpec((ResidualMoments(kinds=("resid_post",)), LogitLens())),
                       progress=False, window_index=torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="kinds"):
        first.merge(other_kinds)
    assert isinstance(first, Fold)
