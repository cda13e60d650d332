"""Direct logit attribution: exact on norm-free models, approximate with a real final norm."""

import pytest
import torch

from layerscope.analysis.dla import METRIC, DLAOptions, dla_figure, dla_tokens_figure
from layerscope.analysis.registry import METRICS
from layerscope.probes.corpus import CorpusSpec, token_windows
from layerscope.probes.direct_logit import attribute
from layerscope.probes.errors import UserError
from layerscope.probes.interventions import FrozenNorm
from layerscope.probes.ln_removal import RemovalConfig, RemovalData, fine_tune
from layerscope.probes.zoo import load_model

CAUSAL = ["gpt2", "llama", "gemma", "gpt-neox"]


def _windows(loaded, tokens=256):
    return token_windows(CorpusSpec("stdlib", seq_len=32, max_tokens=tokens, batch_size=4),
                         loaded.tokenizer, loaded.bos_token_id, loaded.max_context)


@pytest.fixture(scope="module")
def norm_free():
    """Each causal tiny family with every norm removed by a short fine-tune."""
    models = {}
    for family in CAUSAL:
        loaded = load_model(f"tiny-{family}")
        train, evaluation = RemovalData(seq_len=32, batch_size=4, train_tokens=1024, eval_tokens=256).windows(loaded)
        fine_tune(loaded, train, evaluation, RemovalConfig(steps=16, start=1, gap_mlp=1, gap_attn=1, gap_v=1, gap_final=1,
                                                           lr=1e-3, lr_warmup=2))
        models[family] = loaded
    return models


def test_dla_is_registered():
    assert METRICS["dla"] is METRIC


@pytest.mark.parametrize("family", CAUSAL)
@pytest.mark.parametrize("token", ["next", "top", "e"])
def test_dla_sums_to_the_logit_and_equals_the_direct_effect_on_a_norm_free_model(norm_free, family, token):
    loaded = norm_free[family]
    tables = METRIC(loaded, _windows(loaded), DLAOptions(token=token))
    check = tables["dla_check"].iloc[0]
    assert check["norm_free"] and check["tokens"] > 0
    assert check["max_abs_gap"] < 1e-4
    assert check["max_residual_gap"] < 1e-4
    assert check["direct_sum_gap"] < 1e-4
    components = tables["dla"]
    assert len(components) == 2 * loaded.n_layers + 2
    assert components["mean_abs_dla_minus_direct"].max() < 1e-4
    assert components["value"].sum() == pytest.approx(check["mean_logit"], abs=1e-4)


@pytest.mark.parametrize("family", CAUSAL)
def test_with_a_real_final_norm_terms_sum_to_the_logit_but_are_not_direct_effects(family):
    loaded = load_model(f"tiny-{family}")
    tables = METRIC(loaded, _windows(loaded), DLAOptions())
    check = tables["dla_check"].iloc[0]
    assert not check["norm_free"]
    # The scale frozen per token makes the split exact by construction ...
    assert check["max_abs_gap"] < 1e-4
    # ... but removing a component moves a real norm's scale, so the terms are not direct effects.
    assert check["direct_sum_gap"] > 1e-3
    assert tables["dla"]["mean_abs_dla_minus_direct"].max() > 1e-3


def test_attribute_on_hand_computed_tensors():
    """LayerNorm with bias, frozen scale 2 (position 0: 4), two components in d_model 3."""
    norm = torch.nn.LayerNorm(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        norm.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    frozen = FrozenNorm(norm, "layernorm", 2.0, first_scale=4.0)
    a = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]]])
    b = torch.tensor([[[0.0, 1.0, -1.0], [2.0, 2.0, 2.0]]])
    direction = torch.tensor([1.0, 1.0, 1.0]).expand(1, 2, 3).double()
    dla, direct, constant, total = attribute([a, b], a + b, frozen, direction, 0.0)
    # a at position 0: centred (-1, 0, 1) / 4 * (1, 2, 3) -> -0.25 + 0 + 0.75 = 0.5
    # a at position 1: centred (-1, -1, 2) / 2 * (1, 2, 3) -> (-1 - 2 + 6) / 2 = 1.5
    # b at position 0: centred (0, 1, -1) / 4 * (1, 2, 3) -> (2 - 3) / 4 = -0.25; at position 1: 0
    expected = torch.tensor([[[0.5, 1.5]], [[-0.25, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(dla, expected)
    torch.testing.assert_close(direct, expected)
    torch.testing.assert_close(constant, torch.full((1, 2), -0.5, dtype=torch.float64))
    logit = (frozen(a + b).double() * direction).sum(-1)
    torch.testing.assert_close(dla.sum(0) + constant, logit)
    torch.testing.assert_close(total, (a + b).double())


def test_a_multi_token_target_and_an_encoder_are_refused():
    loaded = load_model("tiny-llama")
    with pytest.raises(UserError, match="'ab' is 2 tokens"):
        METRIC(loaded, _windows(loaded), DLAOptions(token="ab"))
    with pytest.raises(UserError, match="outside the vocabulary"):
        METRIC(loaded, _windows(loaded), DLAOptions(token="id:100000"))
    with pytest.raises(UserError, match="needs a causal language model"):
        METRIC(load_model("tiny-bert"), _windows(loaded), DLAOptions())


def test_figures_and_summary(norm_free):
    loaded = norm_free["llama"]
    tables = METRIC(loaded, _windows(loaded), DLAOptions())
    bars = dla_figure(tables["dla"], tables["dla_check"])
    labels = ["embed", *(f"{part} {layer}" for layer in range(loaded.n_layers) for part in ("attn", "mlp")), "bias"]
    # Every component is labelled on the axis, in residual order, and each kind is one
    # legend entry with its colour.
    assert list(bars.layout.xaxis.tickvals) == labels and "norm-free" in bars.layout.title.text
    assert [trace.name for trace in bars.data if trace.type == "bar"] == ["embed", "attn", "mlp", "bias"]
    assert sorted(x for trace in bars.data if trace.type == "bar" for x in trace.x) == sorted(labels)
    # At one position the terms are that position's row of the per-token table, and they
    # add up to the model's logit there (the per-token table itself is checked above).
    (view,) = METRIC.views_for(tables)
    position = view.defaults(tables)["position"]
    rows = tables["dla_tokens"].query("position == @position")
    at = view.figure(tables, position=position)
    drawn = {x: y for trace in at.data for x, y in zip(trace.x, trace.y)}
    assert drawn == pytest.approx(dict(zip(labels, rows["value"])))
    assert sum(drawn.values()) == pytest.approx(rows["logit"].iloc[0], abs=1e-3)
    heat = dla_tokens_figure(tables["dla_tokens"])
    assert heat.data[0].z.shape == (2 * loaded.n_layers + 2, 31)
    summary = METRIC.summarize(tables)
    assert summary[0].startswith("dla (norm-free, token next): components sum to the logit within")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_reported_logit_is_the_models_own(family):
    """The pass stops before the unembedding; the target's logit DLA reports must still be
    the one a plain HF forward gives (to its float32 rounding)."""
    loaded = load_model(f"tiny-{family}")
    windows = _windows(loaded, tokens=64)
    tokens = METRIC(loaded, windows, DLAOptions())["dla_tokens"]
    ids = windows.input_ids[:1]
    with torch.no_grad():
        logits = loaded.model(ids).logits[0]
    per_position = tokens.groupby("position")["logit"].first()
    expected = [logits[pos, ids[0, pos + 1]].item() for pos in per_position.index]
    assert len(per_position) == ids.shape[1] - 1
    assert per_position.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
