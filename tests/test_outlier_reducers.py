import dataclasses

import pytest
import torch
from outlier_helpers import small_windows

from layerscope.probes.backends import get_backend, points
from layerscope.probes.capture import ProbeSpec, capture
from layerscope.probes.families import get_module
from layerscope.probes.outlier_reducers import (
    AttentionSinks,
    MassiveActivations,
    ProjectionOutliers,
    TokenKurtosis,
    attention_entropy,
    log_bins,
    log_histogram_quantile,
    projection_inputs,
    value_vectors,
)
from layerscope.probes.zoo import TINY_FAMILIES

# Where each family's attention output projection sits: its input is sum_k A[h,t,k] v_k per head.
OUT_PROJ = {"llama": "self_attn.o_proj", "qwen2": "self_attn.o_proj", "mistral": "self_attn.o_proj",
            "gemma": "self_attn.o_proj", "gpt2": "attn.c_proj", "gpt-neox": "attention.dense",
            "bert": "attention.output.dense"}


def _module_inputs(loaded, ids, paths):
    """The first positional input of each (layer, path) module, read with plain forward pre-hooks."""
    seen, handles = {}, []
    blocks = loaded.adapter.layer_modules(loaded.model)
    for layer in range(loaded.n_layers):
        for path in paths:
            module = get_module(blocks[layer], path)
            handles.append(module.register_forward_pre_hook(
                lambda m, args, key=(layer, path): seen.__setitem__(key, args[0].detach())))
    try:
        with torch.no_grad():
            loaded.model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_log_histogram_median_is_within_half_a_bin():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5000, generator=generator).mul(2).exp() * torch.tensor([[0.01], [1.0], [300.0]])
    counts = torch.stack([torch.bincount(log_bins(row), minlength=1600) for row in x])
    approx = log_histogram_quantile(counts)
    exact = x.abs().median(dim=-1).values.double()
    assert torch.all((approx / exact - 1).abs() < 0.0116)
    # Zeros land in the lowest bin instead of breaking the log.
    assert log_bins(torch.zeros(2)).tolist() == [0, 0]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_projection_inputs_equal_what_the_projections_read(tiny_models, token_batch, family):
    loaded = tiny_models[family]
    kinds, attn_in, mlp_in = projection_inputs(loaded)
    _, acts = get_backend("hooks").run(loaded, token_batch, points(list(kinds), loaded.n_layers))
    adapter = loaded.adapter
    direct = _module_inputs(loaded, token_batch, [adapter.attn_projections[0], adapter.up_projections[0]])
    for layer in range(loaded.n_layers):
        with torch.no_grad():
            torch.testing.assert_close(attn_in(acts, layer), direct[layer, adapter.attn_projections[0]])
            torch.testing.assert_close(mlp_in(acts, layer), direct[layer, adapter.up_projections[0]])


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_value_vectors_rebuild_the_attention_output(tiny_models, token_batch, family):
    loaded = tiny_models[family]
    _, attn_in, _ = projection_inputs(loaded)
    values = value_vectors(loaded)
    _, acts = get_backend("hooks").run(loaded, token_batch, points(["resid_pre", "attn_pattern"], loaded.n_layers))
    mixed = _module_inputs(loaded, token_batch, [OUT_PROJ[family]])
    n_rep = loaded.n_heads // loaded.n_kv_heads
    for layer in range(loaded.n_layers):
        with torch.no_grad():
            v = values(attn_in(acts, layer), layer)  # [batch pos kv_head d_head]
        assert v.shape[2] == loaded.n_kv_heads
        pattern = acts[points(["attn_pattern"], loaded.n_layers)[layer]]
        per_head = v.repeat_interleave(n_rep, dim=2).transpose(1, 2)  # query head h reads KV head h // n_rep
        expected = (pattern @ per_head).transpose(1, 2).flatten(2)
        torch.testing.assert_close(expected, mixed[layer, OUT_PROJ[family]], rtol=1e-4, atol=1e-5)


def test_folded_statistics_hold_no_autograd_graph(tiny_models):
    """Norm and projection calls inside reducers must not chain every batch into one graph."""
    loaded = tiny_models["llama"]
    windows = small_windows(loaded, max_tokens=64, seq_len=16)
    spec = ProbeSpec((ProjectionOutliers(threshold=1.0), TokenKurtosis(), AttentionSinks(), MassiveActivations()))
    results = capture(loaded, windows, spec, progress=False).results
    tensors = [v for result in results.values() for v in _tensors(result)]
    assert tensors and not any(t.requires_grad for t in tensors)


def _tensors(result):
    if isinstance(result, torch.Tensor):
        yield result
    elif dataclasses.is_dataclass(result):
        for field in dataclasses.fields(result):
            yield from _tensors(getattr(result, field.name))


@pytest.mark.parametrize("length", [1, 2, 7, 16])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_entropy_matches_float64_xlogy(length, causal):
    generator = torch.Generator().manual_seed(length)
    scores = torch.randn(2, 3, length, length, generator=generator) * 3
    if causal:
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    pattern = torch.softmax(scores, dim=-1)
    wide = pattern.double()
    expected = -torch.special.xlogy(wide, wide).sum(-1)
    torch.testing.assert_close(attention_entropy(pattern, causal), expected, rtol=0, atol=1e-6)
