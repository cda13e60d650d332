import dataclasses

import numpy as np
import torch

from layerscope.analysis.block_influence import BlockInfluenceOptions, block_influence
from layerscope.analysis.block_influence import probe as block_influence_probe
from layerscope.analysis.residual_stats import PROBE, residual_stats
from layerscope.probes.backends import Point, get_backend, points
from layerscope.probes.capture import Batch, ProbeSpec, capture
from layerscope.probes.corpus import CorpusSpec, token_windows
from layerscope.probes.reducers import Moments, ResidualMoments


def test_moments_match_torch_var_and_norm(tiny_models):
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 5, 8, generator=generator) * s + s for s in (1.0, 4.0)]
    state = ResidualMoments(kinds=("resid_post",)).start(tiny_models["llama"])  # layer 0 alone is fed
    for i, x in enumerate(batches):
        state.update({Point("resid_post", 0): x}, Batch(torch.zeros(3, 5, dtype=torch.long), None, 3 * i))
    everything = torch.cat(batches)
    stats = state.result()["resid_post"]
    torch.testing.assert_close(stats.rest.variance[0].float(), torch.var(everything[:, 1:]), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.first.std[0].float(), torch.std(everything[:, 0]), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.rest.mean_norm[0].float(), everything[:, 1:].norm(dim=-1).mean(), rtol=1e-5,
                               atol=0)
    window, position, dim = torch.unravel_index(everything.abs().argmax(), everything.shape)
    assert stats.max_at.at(0)[:3] == (window.item(), position.item(), dim.item())
    assert stats.max_abs[0].item() == everything.abs().max().item()


def test_the_largest_abs_value_reached_twice_is_located_at_its_first_place(tiny_models):
    # -5 at (row 1, position 0, dim 2) comes after +5 at (row 0, position 3, dim 6) in
    # (window, position, dim) order, and a later batch reaching 5 again does not replace it.
    x = torch.zeros(2, 4, 8)
    x[1, 0, 2], x[0, 3, 6], x[1, 3, 1] = -5.0, 5.0, 5.0
    state = ResidualMoments(kinds=("resid_post",)).start(tiny_models["llama"])
    state.update({Point("resid_post", 0): x}, Batch(torch.arange(8).reshape(2, 4), None, 4))
    state.update({Point("resid_post", 0): x.flip(0)}, Batch(torch.zeros(2, 4, dtype=torch.long), None, 6))
    stats = state.result()["resid_post"]
    assert stats.max_abs[0].item() == 5.0
    assert stats.max_at.at(0) == (4, 3, 6, 3)


def assert_same(a, b, where) -> None:
    """Equal tensors inside equal nested result dataclasses."""
    if dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            assert_same(getattr(a, field.name), getattr(b, field.name), (*where, field.name))
    else:
        assert torch.equal(a, b), where


def _windows(loaded, max_tokens):
    spec = CorpusSpec("stdlib", seq_len=128, max_tokens=max_tokens, batch_size=4)
    return token_windows(spec, loaded.tokenizer, loaded.bos_token_id, loaded.max_context)


def test_residual_stats_against_a_direct_computation(tiny_models):
    loaded = tiny_models["llama"]
    windows = _windows(loaded, 1024)
    table = residual_stats(capture(loaded, windows, PROBE, progress=False))
    with torch.no_grad():
        hidden = loaded.model(windows.input_ids, output_hidden_states=True).hidden_states
    row = table[(table.point == "resid_pre") & (table.layer == 2)].iloc[0]
    h = hidden[2]
    assert abs(row["variance"] - torch.var(h[:, 1:]).item()) < 1e-4 * torch.var(h[:, 1:]).item()
    assert abs(row["mean_norm_first"] - h[:, 0].norm(dim=-1).mean().item()) < 1e-4
    flat = h.abs().flatten().argmax()
    window, pos, dim = torch.unravel_index(flat, h.shape)
    assert (row["max_window"], row["max_position"], row["max_dim"]) == (window.item(), pos.item(), dim.item())
    assert row["max_abs"] == h.abs().max().item()


def test_reducer_memory_does_not_grow_with_corpus_length(tiny_models):
    loaded = tiny_models["gpt2"]
    short = capture(loaded, _windows(loaded, 2048), PROBE, progress=False)
    long = capture(loaded, _windows(loaded, 8192), PROBE, progress=False)
    assert long.n_tokens == 4 * short.n_tokens
    assert short.peak_state_bytes > 0
    assert long.peak_state_bytes == short.peak_state_bytes


class _KeptMoments(ResidualMoments):
    """The same statistic, read after the pass instead of streamed."""

    pointwise = False


def test_streamed_moments_equal_moments_read_after_the_pass(tiny_models):
    for family in ("llama", "gpt2", "bert"):
        loaded = tiny_models[family]
        windows = _windows(loaded, 1024)
        streamed = capture(loaded, windows, PROBE, progress=False)["moments"]
        kept = capture(loaded, windows, ProbeSpec(reducers=(_KeptMoments(),)), progress=False)["moments"]
        for kind in PROBE.reducers[0].kinds:
            a, b = streamed[kind], kept[kind]
            for field in ("first", "rest", "max_abs", "max_at"):
                assert_same(getattr(a, field), getattr(b, field), (family, kind, field))


def test_hooks_backend_hands_streamed_points_over_in_execution_order(tiny_models, token_batch):
    loaded = tiny_models["llama"]
    wanted = points(["resid_pre", "resid_mid", "resid_post", "mlp_out"], loaded.n_layers)
    _, reference = get_backend("hooks").run(loaded, token_batch, wanted)
    received = []
    stream = {p: (lambda x, p=p: received.append((p, x))) for p in wanted if p.kind != "mlp_out"}
    _, kept = get_backend("hooks").run(loaded, token_batch, wanted, stream=stream)
    assert set(kept) == {p for p in wanted if p.kind == "mlp_out"}
    order = [(p.layer, ("resid_pre", "resid_mid", "resid_post").index(p.kind)) for p, _ in received]
    assert order == sorted(order) and len(order) == len(stream)
    for p, x in received:
        assert torch.equal(x, reference[p]), p


def test_streaming_with_a_derived_resid_mid_matches_the_kept_path(tiny_models):
    # Parallel-residual GPT-NeoX (Pythia) derives resid_mid after the pass, so its capture
    # mixes streamed points with points returned at the end.
    loaded = tiny_models["gpt-neox"]
    derived = dataclasses.replace(loaded, adapter=dataclasses.replace(loaded.adapter, resid_mid_from="derived"))
    windows = _windows(derived, 512)
    options = BlockInfluenceOptions(angular=2)
    streamed = block_influence(capture(derived, windows, block_influence_probe(options, derived), progress=False))
    kept = block_influence(capture(derived, windows, block_influence_probe(options, derived), backend="nnsight",
                                   progress=False))
    np.testing.assert_allclose(streamed.drop(columns="removal_rank").to_numpy(),
                               kept.drop(columns="removal_rank").to_numpy(), rtol=1e-9, equal_nan=True)
    moments = capture(derived, windows, PROBE, progress=False)["moments"]
    reference = capture(derived, windows, PROBE, backend="nnsight", progress=False)["moments"]
    for kind in PROBE.reducers[0].kinds:
        for slot in ("first", "rest"):
            for field in dataclasses.fields(Moments):
                torch.testing.assert_close(getattr(getattr(moments[kind], slot), field.name),
                                           getattr(getattr(reference[kind], slot), field.name), rtol=1e-6, atol=1e-9)
