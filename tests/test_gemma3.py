"""Gemma 3 270M (Peri-LN, dequantised Q4_K_M, from its PyPI chunk wheels) against raw HF outputs.

One window of 48 tokens keeps the 262k-vocabulary replays within seconds.  Every figure is
checked against a computation from HF `hidden_states`, `attentions` and `logits`.
"""

import pytest
import torch
import torch.nn.functional as F

import layerscope as ls
from layerscope.probes.families import get_module

pytestmark = pytest.mark.real

LAYERS = 18


@pytest.fixture(scope="module")
def gemma3():
    return ls.load_model("gemma3-270m", attn_implementation="eager")


@pytest.fixture(scope="module")
def corpus(gemma3):
    return ls.windows(gemma3, "stdlib", seq_len=48, max_tokens=48, batch_size=1)


@pytest.fixture(scope="module")
def hf(gemma3, corpus):
    with torch.no_grad():
        return gemma3.model(corpus.input_ids, output_hidden_states=True, output_attentions=True)


@pytest.fixture(scope="module")
def result(gemma3, corpus):
    return ls.measure(gemma3, corpus, ["residual-stats", "block-influence", "massive", "sinks", "logit-lens", "dla"])


def test_gemma3_is_listed_and_read_as_peri_ln(gemma3):
    from layerscope.probes.zoo import list_models

    assert "gemma3-270m" in [row["model"] for row in list_models()]
    card = gemma3.card()
    assert (card["layers"], card["d_model"], card["heads"], card["kv_heads"]) == (LAYERS, 640, 4, 1)
    assert card["norm_placement"] == "peri" and "Q4_K_M" in card["source"]
    assert gemma3.adapter.norm_weight_offset == 1.0
    roles = [role for role, _ in gemma3.adapter.norm_paths(LAYERS)]
    assert len(roles) == 4 * LAYERS + 1


def test_residual_norms_and_maxima_match_hidden_states(result, hf):
    table = result["residual_stats"]
    post = table[table.point == "resid_post"].set_index("layer")
    for layer in range(LAYERS - 1):  # HF's last hidden state is after the final norm
        h = hf.hidden_states[layer + 1][0].double()
        assert post.loc[layer, "mean_norm"] == pytest.approx(h[1:].norm(dim=-1).mean().item(), rel=1e-4)
        assert post.loc[layer, "max_abs"] == pytest.approx(h.abs().max().item(), rel=1e-5)
        assert post.loc[layer, "max_dim"] == h.abs().max(dim=0).values.argmax().item()


def test_block_influence_matches_hidden_state_cosines(result, hf):
    bi = result["block_influence"].set_index("layer")["block_influence"]
    for layer in range(LAYERS - 1):
        before, after = hf.hidden_states[layer][0].double(), hf.hidden_states[layer + 1][0].double()
        expected = 1 - F.cosine_similarity(before, after, dim=-1).mean().item()
        assert bi.loc[layer] == pytest.approx(expected, abs=1e-5)


def test_the_massive_activation_is_where_a_direct_argmax_puts_it(result, hf):
    top = result["massive_top"]
    top = top[top["rank"] == top["rank"].min()].set_index("layer")
    for layer in range(LAYERS - 1):
        h = hf.hidden_states[layer + 1][0]
        position, dim = divmod(h.abs().argmax().item(), h.shape[-1])
        assert (top.loc[layer, "dim"], top.loc[layer, "position"]) == (dim, position)
    first = result["massive_persistence"].sort_values("first_layer").iloc[0]
    flagged = [l for l in range(LAYERS - 1)
               if (h := hf.hidden_states[l + 1][0].abs()).max() > 100 and h.max() >= 1000 * h.median()]
    assert first["first_layer"] == min(flagged)


def test_sink_mass_matches_hf_attention_weights(result, hf):
    heads = result["sink_heads"].set_index(["layer", "head"])
    for layer in (0, 5, 17):
        pattern = hf.attentions[layer][0].double()  # [head, query, key]
        tokens = pattern.shape[-1]
        for head in range(pattern.shape[0]):
            alpha_0 = pattern[head, :, 0].sum().item() / tokens
            assert heads.loc[(layer, head), "alpha_0"] == pytest.approx(alpha_0, abs=1e-5)


def test_logit_lens_last_layer_is_the_model_and_a_middle_layer_matches_a_manual_unembedding(result, hf, gemma3, corpus):
    lens = result["logit_lens"].set_index("layer")
    ids = corpus.input_ids
    full_ce = F.cross_entropy(hf.logits[0, :-1].double(), ids[0, 1:]).item()
    assert lens.loc[LAYERS - 1, "ce"] == pytest.approx(full_ce, rel=1e-4)
    norm = get_module(gemma3.model, gemma3.adapter.final_norm)
    unembed = get_module(gemma3.model, gemma3.adapter.unembed)
    with torch.no_grad():
        logits = unembed(norm(hf.hidden_states[9]))[0, :-1].double()
    assert lens.loc[8, "ce"] == pytest.approx(F.cross_entropy(logits, ids[0, 1:]).item(), rel=1e-4)


def test_dla_terms_sum_to_the_logit(result):
    check = result["dla_check"].iloc[0]
    assert check["max_abs_gap"] < 1e-3 * max(1.0, abs(check["mean_logit"]))


def test_skipping_a_block_costs_what_a_forward_without_it_costs(gemma3, corpus):
    skip = ls.measure(gemma3, corpus, ["layer-skip"], layers="3")["layer_skip"].set_index("layer")
    ids = corpus.input_ids
    block = gemma3.adapter.layer_modules(gemma3.model)[3]
    handle = block.register_forward_hook(
        lambda module, args, kwargs, output: (args[0] if args else kwargs["hidden_states"],) + tuple(output[1:])
        if isinstance(output, tuple) else (args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            skipped = gemma3.model(ids).logits[0, :-1].double()
    finally:
        handle.remove()
    with torch.no_grad():
        full = gemma3.model(ids).logits[0, :-1].double()
    expected = F.cross_entropy(skipped, ids[0, 1:]).item() - F.cross_entropy(full, ids[0, 1:]).item()
    # Gemma 3's residual reaches |x| ~ 1e4, so two float32 forwards that differ only in
    # which hooks are attached agree on the CE to about 1e-4 relative, not 1e-6.
    assert skip.loc[3, "delta_ce"] == pytest.approx(expected, abs=1e-3)


@pytest.mark.heavy
def test_the_survey_finishes_on_gemma3(tmp_path):
    from layerscope.app.cli import main

    assert main(["survey", "--model", "gemma3-270m", "--max-tokens", "128", "--seq-len", "64",
                 "--runs-dir", str(tmp_path)]) == 0
