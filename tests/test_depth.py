"""Depth measurements checked against independent computations on tiny models."""

import copy
import math

import numpy as np
import pytest
import torch

from layerscope.analysis.block_influence import BlockInfluenceOptions
from layerscope.analysis.block_influence import METRIC as BLOCK_INFLUENCE
from layerscope.analysis.layer_skip import METRIC as LAYER_SKIP
from layerscope.analysis.layer_skip import LayerSkipOptions, skip_tables
from layerscope.analysis.logit_lens import METRIC as LOGIT_LENS
from layerscope.analysis.prune_curve import METRIC as PRUNE_CURVE
from layerscope.analysis.prune_curve import PruneCurveOptions
from layerscope.analysis.variance import METRIC as VARIANCE
from layerscope.analysis.variance import VarianceOptions, growth_fit
from layerscope.probes.backends import Point, get_backend, points
from layerscope.probes.corpus import CorpusSpec, token_windows
from layerscope.probes.errors import UserError
from layerscope.probes.replay import skip_sweep
from layerscope.probes.zoo import load_model


def windows_for(loaded, max_tokens=256, seq_len=32, batch_size=4):
    spec = CorpusSpec("stdlib", seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)
    return token_windows(spec, loaded.tokenizer, loaded.bos_token_id, loaded.max_context)


def hidden_states(loaded, windows):
    with torch.no_grad():
        return loaded.model(windows.input_ids, output_hidden_states=True).hidden_states


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt-neox", "bert"])
def test_block_influence_matches_cosines_of_hf_hidden_states(tiny_models, family):
    loaded = tiny_models[family]
    windows = windows_for(loaded)
    table = BLOCK_INFLUENCE(loaded, windows, BlockInfluenceOptions(angular=2))["block_influence"]
    hidden = hidden_states(loaded, windows)
    # HF's last hidden state is after the final norm in Pre-LN families: compare the others.
    for layer in range(loaded.n_layers - 1):
        expected = 1 - cos(hidden[layer], hidden[layer + 1]).mean().item()
        assert table.loc[layer, "block_influence"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    for layer in range(loaded.n_layers - 2):
        expected = (torch.arccos(cos(hidden[layer], hidden[layer + 2]).clamp(-1, 1)) / math.pi).mean().item()
        assert table.loc[layer, "angular_distance"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert np.isnan(table.loc[loaded.n_layers - 1, "angular_distance"])
    assert sorted(table["removal_rank"]) == list(range(loaded.n_layers))
    assert table.loc[table["block_influence"].idxmin(), "removal_rank"] == 0


def test_block_influence_exclude_first_and_sublayers(tiny_models):
    loaded = tiny_models["llama"]
    windows = windows_for(loaded)
    table = BLOCK_INFLUENCE(loaded, windows, BlockInfluenceOptions(exclude_first=True))["block_influence"]
    _, acts = get_backend("nnsight").run(loaded, windows.input_ids, points(["resid_pre", "resid_mid", "resid_post"], 4))
    for layer in range(4):
        pre, mid, post = (acts[Point(k, layer)][:, 1:] for k in ("resid_pre", "resid_mid", "resid_post"))
        assert table.loc[layer, "block_influence"] == pytest.approx(1 - cos(pre, post).mean().item(), rel=1e-6)
        assert table.loc[layer, "attn_influence"] == pytest.approx(1 - cos(pre, mid).mean().item(), rel=1e-6)
        assert table.loc[layer, "mlp_influence"] == pytest.approx(1 - cos(mid, post).mean().item(), rel=1e-6)


def _without_layer(loaded, layer):
    """A hand-built copy of the model with one block deleted from its layer list."""
    model = copy.deepcopy(loaded.model)
    blocks = loaded.adapter.layer_modules(model)
    parent_path = loaded.adapter.layers
    container = model
    for part in parent_path.split("."):
        container = getattr(container, part)
    del container[layer]
    assert len(container) == len(blocks) - 1
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_skip_deltas_match_a_model_with_the_layer_deleted(tiny_models, family):
    loaded = tiny_models[family]
    windows = windows_for(loaded, max_tokens=128)
    table = LAYER_SKIP(loaded, windows, LayerSkipOptions())["layer_skip"].set_index("layer")
    ids = windows.input_ids
    with torch.no_grad():
        full = loaded.model(ids, use_cache=False).logits
    full_ce = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()).item()
    for layer in (0, 2):
        pruned = _without_layer(loaded, layer)
        with torch.no_grad():
            logits = pruned(ids, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()).item()
        assert table.loc[layer, "delta_ce"] == pytest.approx(ce - full_ce, abs=1e-5)
        agree = (logits[:, :-1].argmax(-1) == full[:, :-1].argmax(-1)).double().mean().item()
        assert table.loc[layer, "top1_agreement"] == pytest.approx(agree, abs=1e-9)
        p = torch.log_softmax(full[:, :-1].double(), -1)
        q = torch.log_softmax(logits[:, :-1].double(), -1)
        kl = (p.exp() * (p - q)).sum(-1).mean().item()
        # The sweep's log-softmax runs in float32, this reference in float64.
        assert table.loc[layer, "kl"] == pytest.approx(kl, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("family, part", [("llama", "block"), ("gpt2", "attn"), ("gpt-neox", "mlp"),
                                          ("gemma", "block"), ("bert", "block")])
def test_prefix_reuse_sweep_equals_naive_sweep(tiny_models, family, part):
    loaded = tiny_models[family]
    windows = windows_for(loaded, max_tokens=128)
    layers = list(range(loaded.n_layers))
    fast = skip_tables(skip_sweep(loaded, windows, layers, part, reuse_prefix=True))
    naive = skip_tables(skip_sweep(loaded, windows, layers, part, reuse_prefix=False))
    for name in ("layer_skip", "skip_future"):
        numeric = fast[name].select_dtypes("number").columns
        np.testing.assert_allclose(fast[name][numeric].to_numpy(), naive[name][numeric].to_numpy(),
                                   rtol=1e-5, atol=1e-7)
    assert (fast["skip_future"]["effect"] > 0).all()


def test_variance_matches_torch_var_and_sublayer_norms(tiny_models):
    loaded = tiny_models["llama"]
    windows = windows_for(loaded)
    tables = VARIANCE(loaded, windows, VarianceOptions())
    hidden = hidden_states(loaded, windows)
    variance = tables["variance"]
    for layer in range(loaded.n_layers):
        row = variance[(variance.point == "resid_pre") & (variance.layer == layer)].iloc[0]
        expected = torch.var(hidden[layer][:, 1:].double()).item()
        assert row["variance"] == pytest.approx(expected, rel=1e-6)
        assert row["std_first"] == pytest.approx(torch.std(hidden[layer][:, 0].double()).item(), rel=1e-6)
    _, acts = get_backend("hooks").run(loaded, windows.input_ids, points(["resid_pre", "attn_out"], 4))
    ratio = (acts[Point("attn_out", 1)][:, 1:].norm(dim=-1) / acts[Point("resid_pre", 1)][:, 1:].norm(dim=-1)).mean()
    assert tables["sublayer_ratio"].loc[1, "attn_ratio"] == pytest.approx(ratio.item(), rel=1e-5)


def test_growth_fit_recovers_a_known_rate():
    layers = np.arange(10.0)
    slope, r2 = growth_fit(layers, 3.0 * 1.2 ** layers)
    assert slope == pytest.approx(math.log(1.2))
    assert r2 == pytest.approx(1.0)
    _, noisy_r2 = growth_fit(layers, 3.0 * 1.2 ** layers * np.array([1, 2, 1, 2, 1, 2, 1, 2, 1, 2.0]))
    assert noisy_r2 < 0.99


def test_logit_lens_against_a_direct_computation(tiny_models):
    loaded = tiny_models["llama"]
    windows = windows_for(loaded)
    tables = LOGIT_LENS(loaded, windows)
    table = tables["logit_lens"]
    hidden = hidden_states(loaded, windows)
    ids = windows.input_ids
    with torch.no_grad():
        logits = loaded.model.lm_head(loaded.model.model.norm(hidden[2]))
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()).item()
    assert table.loc[1, "ce"] == pytest.approx(ce, rel=1e-6)
    assert table.loc[loaded.n_layers - 1, "kl_to_final"] == pytest.approx(0, abs=1e-9)
    grid = tables["lens_grid"]
    assert set(grid["layer"]) == set(range(loaded.n_layers))
    assert grid["top_prob"].between(0, 1).all()


def test_prune_curve_is_consistent_with_single_skips(tiny_models):
    loaded = tiny_models["gpt2"]
    windows = windows_for(loaded, max_tokens=128)
    curve = PRUNE_CURVE(loaded, windows, PruneCurveOptions(max_removed=2, heldout=0.0))["prune_curve"]
    skips = LAYER_SKIP(loaded, windows, LayerSkipOptions())["layer_skip"]
    greedy_first = curve[(curve.method == "greedy") & (curve.n_removed == 1)].iloc[0]
    assert greedy_first["layer_removed"] == skips["delta_ce"].idxmin()
    assert greedy_first["delta_ce"] == pytest.approx(skips["delta_ce"].min(), abs=1e-6)
    assert curve[curve.n_removed == 0]["delta_ce"].abs().max() == 0
    bi_curve = curve[curve.method == "bi_order"]
    assert list(bi_curve["n_removed"]) == [0, 1, 2]


def _without_layers(loaded, layers):
    """A hand-built copy of the model with the given blocks deleted from its layer list."""
    model = copy.deepcopy(loaded.model)
    container = model
    for part in loaded.adapter.layers.split("."):
        container = getattr(container, part)
    for layer in sorted(layers, reverse=True):
        del container[layer]
    return model


def _hand_ce(model, ids):
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    logprobs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return -logprobs.gather(-1, ids[:, 1:, None]).mean().item()


def _hand_block_influence(loaded, ids):
    """1 - mean cos(block input, raw block output), read by plain forward hooks."""
    seen = {}
    blocks = loaded.adapter.layer_modules(loaded.model)
    hooks = [b.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(
        i, (args[0], out[0] if isinstance(out, tuple) else out))) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            loaded.model(ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [1 - cos(*seen[i]).mean().item() for i in range(len(blocks))]


def test_prune_curve_chooses_on_some_windows_and_scores_on_the_held_out_rest(tiny_models):
    loaded = tiny_models["llama"]
    windows = windows_for(loaded, max_tokens=256)  # 8 windows; the last quarter, 2, is held out
    with pytest.warns(UserWarning, match="62 next-token positions, fewer than 256"):
        curve = PRUNE_CURVE(loaded, windows, PruneCurveOptions(max_removed=2))["prune_curve"]
    chosen_on, heldout = windows.input_ids[:6], windows.input_ids[6:]
    assert set(curve["chosen_tokens"]) == {6 * 31} and set(curve["heldout_tokens"]) == {2 * 31}

    removed, greedy_rows = [], curve[curve.method == "greedy"].set_index("n_removed")
    for step in (1, 2):
        costs = {c: _hand_ce(_without_layers(loaded, removed + [c]), chosen_on)
                 for c in range(loaded.n_layers) if c not in removed}
        removed.append(min(costs, key=costs.get))
        row = greedy_rows.loc[step]
        assert row["layer_removed"] == removed[-1]
        assert row["ce"] == pytest.approx(costs[removed[-1]], abs=1e-5)
        assert row["heldout_ce"] == pytest.approx(_hand_ce(_without_layers(loaded, removed), heldout), abs=1e-5)

    influence = _hand_block_influence(loaded, windows.input_ids)
    order = sorted(range(loaded.n_layers), key=influence.__getitem__)
    bi_rows = curve[curve.method == "bi_order"].set_index("n_removed")
    full_held = _hand_ce(loaded.model, heldout)
    for k in (0, 1, 2):
        row = bi_rows.loc[k]
        assert row["removed"] == ",".join(map(str, sorted(order[:k])))
        assert row["ce"] == pytest.approx(_hand_ce(_without_layers(loaded, order[:k]), chosen_on), abs=1e-5)
        held = _hand_ce(_without_layers(loaded, order[:k]), heldout)
        assert row["heldout_ce"] == pytest.approx(held, abs=1e-5)
        assert row["heldout_delta_ce"] == pytest.approx(held - full_held, abs=1e-5)
    summary = PRUNE_CURVE.summarize({"prune_curve": curve})
    assert "held out" in summary[0] and "fewer than 256" in summary[1]
    dashed = [t.name for t in PRUNE_CURVE.draw({"prune_curve": curve})[0].data if t.line.dash == "dash"]
    assert dashed == ["bi_order, held out", "greedy, held out"]


def test_prune_curve_without_a_held_out_part_says_so(tiny_models):
    loaded = tiny_models["gpt2"]
    one_window = windows_for(loaded, max_tokens=32)
    with pytest.warns(UserWarning, match="no held-out windows"):
        curve = PRUNE_CURVE(loaded, one_window, PruneCurveOptions(max_removed=1, greedy=False))["prune_curve"]
    assert curve["heldout_ce"].isna().all() and set(curve["heldout_tokens"]) == {0}
    assert "held out" not in PRUNE_CURVE.summarize({"prune_curve": curve})[0]
    assert len(PRUNE_CURVE.draw({"prune_curve": curve})[0].data) == 1
    with pytest.raises(UserError, match="heldout must be between 0.0 and 0.5, got 0.9"):
        PRUNE_CURVE(loaded, one_window, PruneCurveOptions(heldout=0.9))


def test_the_cli_warns_in_one_line_when_the_held_out_part_is_small(tmp_path, capsys):
    from layerscope.app.cli import main

    assert main(["analyze", "prune-curve", "--model", "tiny-llama", "--max-tokens", "128", "--seq-len", "32",
                 "--max-removed", "1", "--no-greedy", "--no-save"]) == 0
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "held-out" in line]
    assert line.startswith("layerscope: warning: the held-out part has 31 next-token positions, fewer than 256")


def test_norm_placements_rewire_the_blocks():
    ids = torch.randint(0, 256, (2, 12))
    kinds = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
    post = load_model("tiny-llama@post")
    _, acts = get_backend("hooks").run(post, ids, points(kinds, 4))
    rms = acts[Point("resid_post", 2)].square().mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
    peri = load_model("tiny-llama@peri")
    _, acts = get_backend("hooks").run(peri, ids, points(kinds, 4))
    rms = acts[Point("attn_out", 1)].square().mean(-1).sqrt()
    # The norm's eps is not negligible against the small outputs of a random attention.
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-2, atol=1e-2)
    pre, lns = load_model("tiny-llama"), load_model("tiny-llama@lns")
    x = torch.randn(1, 3, pre.d_model)
    torch.testing.assert_close(lns.model.model.layers[3].input_layernorm(x),
                               pre.model.model.layers[3].input_layernorm(x) / 2)
    mix = load_model("tiny-llama@mix")
    assert type(mix.model.model.layers[0].self_attn).__name__ == "PostNormed"
    assert type(mix.model.model.layers[1].self_attn).__name__ == "LlamaAttention"
    assert (post.adapter.placement, peri.adapter.placement, mix.adapter.placement) == ("post", "peri", "mix")


def test_placements_compare_side_by_side(tiny_models):
    loaded = tiny_models["gpt2"]
    windows = windows_for(loaded, max_tokens=128)
    tables = VARIANCE(loaded, windows, VarianceOptions(placements="pre,lns"))
    fits = tables["growth_fit"].set_index(["placement", "quantity"])
    # LayerNorm Scaling shrinks what each block writes, so the norm grows more slowly.
    assert fits.loc[("lns", "mean_norm"), "slope"] < fits.loc[("pre", "mean_norm"), "slope"]
    bi = BLOCK_INFLUENCE(loaded, windows, BlockInfluenceOptions(placements="pre,post,peri,mix,lns"))["block_influence"]
    assert list(bi["placement"].unique()) == ["pre", "post", "peri", "mix", "lns"]


def test_placements_refuse_trained_weights():
    with pytest.raises(UserError, match="built from a config"):
        load_model("minilm-l6@peri")


@pytest.mark.parametrize("argv, message", [
    (["layer-skip", "--model", "tiny-llama", "--layers", "7"], "layer 7 is out of range"),
    (["block-influence", "--model", "tiny-llama", "--angular", "9"], "larger than the depth"),
    (["logit-lens", "--model", "tiny-bert"], "is an encoder"),
    # Literal text is measured whole whatever --seq-len says; an empty one is refused.
    (["variance", "--model", "tiny-llama", "--corpus", "text: ", "--seq-len", "64"], "the text is empty"),
    (["block-influence", "--model", "tiny-llama", "--placements", "sideways"], "unknown norm placement"),
])
def test_depth_cli_bad_input(capsys, argv, message):
    from layerscope.app.cli import main

    code = main(["analyze", *argv, "--no-save", "--max-tokens", "256"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
