import pytest
import torch

from layerscope.probes.backends import Point, get_backend, points
from layerscope.probes.zoo import TINY_FAMILIES

RESID_KINDS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
ALL_KINDS = RESID_KINDS + ["mlp_act", "attn_pattern"]


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _all_backends(loaded, ids, kinds):
    wanted = points(kinds, loaded.n_layers)
    return wanted, {name: get_backend(name).run(loaded, ids, wanted) for name in
                    ("hooks", "transformer_lens", "nnsight")}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_backends_agree_on_every_point(tiny_models, token_batch, family):
    loaded = tiny_models[family]
    wanted, runs = _all_backends(loaded, token_batch, ALL_KINDS)
    reference = runs["hooks"][1]
    for name in ("transformer_lens", "nnsight"):
        for p in wanted:
            assert _rel_err(runs[name][1][p], reference[p]) < 1e-4, (family, name, str(p))
    if loaded.adapter.causal:
        assert _rel_err(runs["nnsight"][0], runs["hooks"][0]) < 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_residuals_match_hf_hidden_states(tiny_models, token_batch, family):
    loaded = tiny_models[family]
    with torch.no_grad():
        hidden = loaded.model(token_batch, output_hidden_states=True).hidden_states
    _, acts = get_backend("hooks").run(loaded, token_batch, points(["resid_pre", "resid_post"], loaded.n_layers))
    for layer in range(loaded.n_layers):
        assert _rel_err(acts[Point("resid_pre", layer)], hidden[layer]) < 1e-4
    # HF's last hidden state is after the final norm in Pre-LN families; block outputs
    # before it must equal the next block's input.
    for layer in range(loaded.n_layers - 1):
        assert _rel_err(acts[Point("resid_post", layer)], hidden[layer + 1]) < 1e-4


# Post-LN blocks (BERT) normalise after the residual add, so there the sum is not the next state.
@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "bert"])
def test_sublayers_add_up_to_the_residual(tiny_models, token_batch, family):
    loaded = tiny_models[family]
    assert loaded.adapter.placement == "pre"
    _, acts = get_backend("hooks").run(loaded, token_batch, points(RESID_KINDS, loaded.n_layers))
    for layer in range(loaded.n_layers):
        pre, mid, post = (acts[Point(k, layer)] for k in ("resid_pre", "resid_mid", "resid_post"))
        assert _rel_err(pre + acts[Point("attn_out", layer)], mid) < 1e-5
        assert _rel_err(mid + acts[Point("mlp_out", layer)], post) < 1e-5


def test_attention_patterns_are_distributions(tiny_models, token_batch):
    loaded = tiny_models["llama"]
    _, acts = get_backend("hooks").run(loaded, token_batch, [Point("attn_pattern", 0)])
    pattern = acts[Point("attn_pattern", 0)]
    assert pattern.shape == (2, loaded.n_heads, 16, 16)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, loaded.n_heads, 16))
    assert torch.triu(pattern, diagonal=1).abs().max() == 0


@pytest.mark.real
def test_backends_agree_on_smollm2(smollm2):
    ids = smollm2.tokenizer("The capital of France is Paris, and the", return_tensors="pt").input_ids
    ids = torch.cat([torch.tensor([[smollm2.bos_token_id]]), ids], dim=1)
    wanted, runs = _all_backends(smollm2, ids, RESID_KINDS)
    for name in ("transformer_lens", "nnsight"):
        for p in wanted:
            assert _rel_err(runs[name][1][p], runs["hooks"][1][p]) < 1e-4, (name, str(p))
    with torch.no_grad():
        hidden = smollm2.model(ids, output_hidden_states=True).hidden_states
    for layer in range(smollm2.n_layers):
        assert _rel_err(runs["hooks"][1][Point("resid_pre", layer)], hidden[layer]) < 1e-4
    assert _rel_err(runs["transformer_lens"][1][Point("resid_post", 11)], hidden[12]) < 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_site_table_names_a_module_for_every_point(tiny_models, family):
    from layerscope.probes.families import get_module

    loaded = tiny_models[family]
    adapter = loaded.adapter
    block = adapter.layer_modules(loaded.model)[0]
    for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_pattern", "mlp_act"):
        site = adapter.site(kind)
        if site is None:
            assert kind == "resid_mid" and adapter.resid_mid_from == "derived"
            continue
        assert isinstance(get_module(block, site.module), torch.nn.Module), (family, kind)
    if adapter.causal:
        assert get_module(loaded.model, adapter.site("final_norm").module) is not loaded.model


def test_a_backend_lives_with_its_model(tiny_models, token_batch, monkeypatch):
    from transformer_lens.model_bridge import TransformerBridge

    loaded = tiny_models["llama"]
    built = []
    boot = TransformerBridge.boot_transformers
    monkeypatch.setattr(TransformerBridge, "boot_transformers",
                        staticmethod(lambda *a, **k: built.append(1) or boot(*a, **k)))
    wanted = points(["resid_post"], loaded.n_layers)
    for _ in range(2):
        get_backend("transformer_lens", loaded).run(loaded, token_batch, wanted)
    assert len(built) == 1
    assert get_backend("hooks", loaded) is get_backend("hooks", loaded)
