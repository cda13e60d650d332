import pytest
import torch

from layerscope.probes.backends import Point, get_backend, points
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module
from layerscope.probes.interventions import ablate_sublayer, frozen_norms, set_activations, skip_blocks
from layerscope.probes.zoo import TINY_FAMILIES

CAUSAL = [f for f in TINY_FAMILIES if f != "bert"]


@pytest.mark.parametrize("family", CAUSAL)
def test_skipping_nothing_leaves_logits_bit_identical(tiny_models, token_batch, family):
    loaded = tiny_models[family]
    with torch.no_grad():
        before = loaded.model(token_batch).logits
        with skip_blocks(loaded, []):
            during = loaded.model(token_batch).logits
    assert torch.equal(before, during)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_skipping_a_block_makes_it_the_identity(tiny_models, token_batch, family):
    loaded = tiny_models[family]
    hooks = get_backend("hooks")
    wanted = points(["resid_pre", "resid_post"], loaded.n_layers)
    _, clean = hooks.run(loaded, token_batch, wanted)
    with skip_blocks(loaded, [1]):
        _, skipped = hooks.run(loaded, token_batch, wanted)
    assert torch.equal(skipped[Point("resid_post", 1)], skipped[Point("resid_pre", 1)])
    assert torch.equal(skipped[Point("resid_pre", 1)], clean[Point("resid_pre", 1)])
    assert not torch.allclose(skipped[Point("resid_post", 2)], clean[Point("resid_post", 2)])
    # The hooks are gone afterwards.
    _, after = hooks.run(loaded, token_batch, wanted)
    assert torch.equal(after[Point("resid_post", 1)], clean[Point("resid_post", 1)])


def test_zero_ablating_attention_leaves_resid_mid_equal_resid_pre(tiny_models, token_batch):
    loaded = tiny_models["llama"]
    with ablate_sublayer(loaded, [2], "attn", "zero"):
        _, acts = get_backend("hooks").run(loaded, token_batch, points(["resid_pre", "resid_mid"], 4))
    assert torch.equal(acts[Point("resid_mid", 2)], acts[Point("resid_pre", 2)])


def test_mean_ablation_writes_the_given_mean(tiny_models, token_batch):
    loaded = tiny_models["gpt2"]
    mean = torch.arange(loaded.d_model, dtype=torch.float32)
    with ablate_sublayer(loaded, [0], "mlp", "mean", means={0: mean}):
        _, acts = get_backend("hooks").run(loaded, token_batch, [Point("mlp_out", 0)])
    assert torch.equal(acts[Point("mlp_out", 0)], mean.expand(2, 16, -1))


def test_set_activations_writes_chosen_positions_and_dims(tiny_models, token_batch):
    loaded = tiny_models["llama"]
    with set_activations(loaded, Point("resid_post", 1), positions=[0, 3], dims=[5], values=7.0):
        _, acts = get_backend("hooks").run(loaded, token_batch, [Point("resid_pre", 2)])
    x = acts[Point("resid_pre", 2)]
    assert torch.all(x[:, [0, 3], 5] == 7.0)
    assert not torch.all(x[:, 1, 5] == 7.0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "gpt-neox"])
def test_frozen_norm_with_each_tokens_true_scale_is_exact(tiny_models, family):
    loaded = tiny_models[family]
    norm_path = f"{loaded.adapter.layers}.0.{loaded.adapter.ln1}"
    norm = get_module(loaded.model, norm_path)
    x = torch.randn(1, 2, loaded.d_model) * 3 + 1
    expected = norm(x)
    centred = x - x.mean(-1, keepdim=True) if loaded.adapter.norm_kind == "layernorm" else x
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    true_scale = (centred.square().mean(-1) + eps).sqrt()[0]
    with frozen_norms(loaded, {norm_path: (true_scale[1].item(), true_scale[0].item())}):
        got = get_module(loaded.model, norm_path)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert get_module(loaded.model, norm_path) is norm


def test_out_of_range_layer_is_a_user_error(tiny_models):
    with pytest.raises(UserError, match="out of range"):
        with skip_blocks(tiny_models["llama"], [4]):
            pass
