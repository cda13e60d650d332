import math

import numpy as np
import pytest
import torch
from outlier_helpers import hand_capture, small_windows

from layerscope.analysis.sinks import (
    METRIC,
    SinkOptions,
    probe,
    reading_norm_weights,
    residual_sinks,
    sink_alpha,
    sink_heads,
    sink_summary,
    uniform_entropy,
)
from layerscope.app.cli import main
from layerscope.probes.backends import Point
from layerscope.probes.capture import capture
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module
from layerscope.probes.outlier_reducers import AttentionSinks, ResidualSinks
from layerscope.probes.zoo import load_model

T = 16


def _uniform_causal(batch: int, heads: int) -> torch.Tensor:
    mask = torch.tril(torch.ones(T, T))
    return (mask / mask.sum(-1, keepdim=True)).expand(batch, heads, T, T).clone()


def _sink_pattern(batch: int, heads: int, mass: float) -> torch.Tensor:
    """Every query t >= 1 puts `mass` on key 0 and spreads the rest evenly over keys 1..t."""
    pattern = torch.zeros(batch, heads, T, T)
    pattern[..., 0, 0] = 1.0
    for t in range(1, T):
        pattern[..., t, 0] = mass
        pattern[..., t, 1:t + 1] = (1 - mass) / t
    return pattern


def test_a_planted_sink_pattern_gives_the_expected_alpha_and_sink_rate(tiny_models):
    loaded = tiny_models["llama"]  # 4 layers, 4 query heads on 2 KV heads
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        acts = {}
        for layer in range(4):
            pattern = _uniform_causal(3, 4)
            if layer == 0:
                pattern[:, :2] = _sink_pattern(3, 2, 0.6)
            acts[Point("attn_pattern", layer)] = pattern
            acts[Point("resid_pre", layer)] = torch.randn(3, T, 64, generator=generator)
        batches.append((torch.zeros(3, T, dtype=torch.long), acts))
    captured = hand_capture(loaded, AttentionSinks(eps=0.3), batches)
    heads = sink_heads(captured, loaded.n_kv_heads).set_index(["layer", "head"])

    # Direct from the definition: alpha_k = sum_{t>=k} A[t,k] / (T-k).
    sink = _sink_pattern(1, 1, 0.6)[0, 0]
    uniform = _uniform_causal(1, 1)[0, 0]
    alpha_sink = [sink[k:, k].sum().item() / (T - k) for k in range(T)]
    alpha_uniform = [uniform[k:, k].sum().item() / (T - k) for k in range(T)]
    assert alpha_sink[0] == pytest.approx((1 + 0.6 * (T - 1)) / T)
    assert heads.loc[(0, 0), "alpha_0"] == pytest.approx(alpha_sink[0])
    assert heads.loc[(0, 3), "alpha_0"] == pytest.approx(alpha_uniform[0])
    alpha = sink_alpha(captured, keys=3).set_index(["layer", "head", "key"])["alpha"]
    for k in range(3):
        assert alpha[(0, 1, k)] == pytest.approx(alpha_sink[k])
        assert alpha[(2, 2, k)] == pytest.approx(alpha_uniform[k])
    # Two of the 16 heads sink: 12.5%.
    assert heads["sinking"].sum() == 2 and heads.loc[(0, 0), "sink_fraction"] == 1.0
    summary = sink_summary(sink_heads(captured, loaded.n_kv_heads), 0.3, 6, T, causal=True).iloc[0]
    assert summary["sink_rate"] == pytest.approx(12.5) and summary["sink_rate_of_mean_alpha"] == pytest.approx(12.5)
    # Uniform causal attention has entropy log(t+1) at query t.
    assert heads.loc[(1, 0), "entropy"] == pytest.approx(np.mean([math.log(t + 1) for t in range(1, T)]))
    assert uniform_entropy(T, causal=True) == pytest.approx(heads.loc[(1, 0), "entropy"])


def test_value_norm_ratio_maps_query_heads_to_kv_heads(tiny_models):
    loaded = tiny_models["llama"]
    windows = small_windows(loaded, max_tokens=64)
    heads = METRIC(loaded, windows, SinkOptions())["sink_heads"].set_index(["layer", "head"])
    assert heads["kv_head"].tolist()[:4] == [0, 0, 1, 1]
    # Independently: the v projection's output, read with a hook.
    seen = {}
    v_proj = get_module(loaded.adapter.layer_modules(loaded.model)[2], "self_attn.v_proj")
    handle = v_proj.register_forward_hook(lambda m, a, out: seen.setdefault("v", []).append(out.detach()))
    try:
        with torch.no_grad():
            for ids in windows:
                loaded.model(ids)
    finally:
        handle.remove()
    v = torch.cat(seen["v"]).unflatten(-1, (loaded.n_kv_heads, -1)).norm(dim=-1)  # [window pos kv_head]
    ratio = v[:, 0].mean(0) / v[:, 1:].mean((0, 1))
    for head, kv in enumerate([0, 0, 1, 1]):
        assert heads.loc[(2, head), "value_norm_ratio"] == pytest.approx(ratio[kv].item(), rel=1e-5)


def test_residual_sinks_on_a_planted_dim(tiny_models):
    loaded = tiny_models["llama"]
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(4, T, 64, generator=generator)
    h[:3, :, 5] = 40.0  # three of four windows: dim 5 is every token's argmax
    acts = {Point("resid_post", l): h for l in range(4)}
    captured = hand_capture(loaded, ResidualSinks(), [(torch.zeros(4, T, dtype=torch.long), acts)])
    weights = reading_norm_weights(loaded)
    table = residual_sinks(captured, weights, top_dims=2).set_index(["layer", "rank"])
    assert table.loc[(1, 1), "dim"] == 5
    assert table.loc[(1, 1), "argmax_share"] == pytest.approx(0.75)
    expected = (h.abs().max(-1).values / h.norm(dim=-1)).mean().item()
    assert table.loc[(1, 1), "mean_max_share"] == pytest.approx(expected, rel=1e-6)
    assert table.loc[(1, 1), "norm"] == "model.layers.2.input_layernorm"
    assert table.loc[(3, 1), "norm"] == "model.norm"


def test_norm_weights_include_the_family_offset(tiny_models):
    gemma = tiny_models["gemma"]
    path, weight = reading_norm_weights(gemma)[0]
    raw = get_module(gemma.model, path).weight
    torch.testing.assert_close(weight, raw + 1.0)
    bert = tiny_models["bert"]
    assert reading_norm_weights(bert)[0][0] == "bert.encoder.layer.0.output.LayerNorm"


def test_sinks_switch_a_model_to_eager_attention_and_back():
    loaded = load_model("tiny-llama")
    assert loaded.config._attn_implementation == "sdpa"
    tables = METRIC(loaded, small_windows(loaded, max_tokens=64), SinkOptions())
    assert len(tables["sink_heads"]) == 16 and tables["sink_heads"]["alpha_0"].between(0, 1).all()
    assert loaded.config._attn_implementation == "sdpa"


def test_sinks_on_an_encoder_divide_by_every_query(tiny_models):
    loaded = tiny_models["bert"]
    tables = METRIC(loaded, small_windows(loaded, max_tokens=64), SinkOptions(keys=2))
    alpha = tables["sink_alpha"]
    assert len(alpha) == 4 * 4 * 2 and alpha["alpha"].between(0, 1).all()
    assert tables["sink_summary"]["entropy_uniform"].iloc[0] == pytest.approx(math.log(32))


def test_state_size_does_not_grow_with_the_corpus(tiny_models):
    loaded = tiny_models["qwen2"]
    spec = probe(SinkOptions(), loaded)
    short = capture(loaded, small_windows(loaded, max_tokens=64), spec, progress=False)
    long = capture(loaded, small_windows(loaded, max_tokens=256), spec, progress=False)
    assert long.peak_state_bytes == short.peak_state_bytes > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": 0.0}, r"eps must be in \(0, 1\)"),
    ({"eps": 1.0}, r"eps must be in \(0, 1\)"),
    ({"keys": 0}, "keys must be at least 1"),
    ({"top_dims": 0}, "top_dims must be at least 1"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(UserError, match=message):
        SinkOptions(**kwargs)


def test_bad_eps_on_the_cli_is_one_line(capsys):
    assert main(["analyze", "sinks", "--model", "tiny-llama", "--eps", "1.5", "--no-save"]) == 2
    assert capsys.readouterr().err == "layerscope: error: eps must be in (0, 1), got 1.5\n"


def test_summary_names_the_sink_rate_and_the_top_residual_dim(tiny_models):
    loaded = tiny_models["mistral"]
    tables = METRIC(loaded, small_windows(loaded, max_tokens=64), SinkOptions())
    lines = METRIC.summarize(tables)
    assert lines[0].startswith("sinks: sink rate ") and " of 4x4 heads " in lines[0]
    assert lines[1].startswith("sinks: top residual-sink dim ")
    heads_figure, residual_figure = METRIC.figures(tables)
    assert heads_figure.data[0].z.shape == (4, 4) and len(residual_figure.data) == 2
