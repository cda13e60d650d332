"""norm-sensitivity: a norm whose input has one scale at every token does no non-linear
work, so freezing it changes nothing; one whose input scale varies must change the
output; the numbers match a hand-made frozen norm and raw hidden states."""

import copy

import pytest
import torch

from layerscope.analysis.norm_sensitivity import figures, summarize
from layerscope.analysis.runner import measure
from layerscope.probes.corpus import CorpusSpec, token_windows
from layerscope.probes.families import get_module
from layerscope.probes.interventions import swap_module
from layerscope.probes.zoo import load_model


def _with_embedding_norms(row_norms) -> object:
    """tiny-llama whose embedding rows have the given norms (a function of the token id):
    the first pre-attention norm's input is the embedding, so its per-token scale is
    exactly the row's norm / sqrt(d_model)."""
    loaded = load_model("tiny-llama")
    loaded = copy.copy(loaded)
    loaded.model = copy.deepcopy(loaded.model)
    embed = loaded.model.get_input_embeddings().weight
    with torch.no_grad():
        ids = torch.arange(embed.shape[0], dtype=torch.float64)
        embed.mul_((row_norms(ids) / embed.double().norm(dim=1)).float()[:, None])
        # Sharper logits than a random model's near-uniform ones, so a change shows in the KL.
        get_module(loaded.model, loaded.adapter.final_norm).weight.mul_(30)
    return loaded


def _windows(loaded):
    return token_windows(CorpusSpec("stdlib", 32, 256, 4), loaded.tokenizer, loaded.bos_token_id,
                         loaded.max_context)


def _table(loaded):
    tables = measure(loaded, _windows(loaded), ["norm-sensitivity"]).tables
    return tables["norm_sensitivity"].set_index("role"), tables


class _HandFrozen(torch.nn.Module):
    """x / s * w: the frozen RMSNorm written out, for an independent check."""

    def __init__(self, weight, scale):
        super().__init__()
        self.weight, self.scale = weight, scale

    def forward(self, x):
        return x / self.scale * self.weight


def test_freezing_a_norm_whose_input_scale_is_constant_changes_nothing():
    loaded = _with_embedding_norms(lambda ids: torch.full_like(ids, 3.0))
    table, tables = _table(loaded)
    row = table.loc["ln1[0]"]
    expected_scale = (3.0 ** 2 / loaded.d_model + loaded.model.config.rms_norm_eps) ** 0.5
    assert row["scale"] == pytest.approx(expected_scale, rel=1e-6)
    assert row["scale_first"] == pytest.approx(expected_scale, rel=1e-6)
    assert row["spread_p99_p1"] == pytest.approx(1.0, abs=0.02)
    for suffix in ("", "_own_first"):
        assert abs(row[f"delta_ce{suffix}"]) < 1e-5 and abs(row[f"kl{suffix}"]) < 1e-6
        assert row[f"top1_agreement{suffix}"] == 1.0
    assert len(figures(tables)) == 2 and summarize(tables)


def test_freezing_a_norm_whose_input_scale_varies_matches_a_hand_made_frozen_norm():
    # Row norms from 1 to 30: the scale spread is wide, and one constant cannot fit.
    loaded = _with_embedding_norms(lambda ids: 1 + 29 * ((ids * 37) % 101) / 100)
    table, _ = _table(loaded)
    row = table.loc["ln1[0]"]
    windows = _windows(loaded)
    ids = windows.input_ids
    with torch.no_grad():
        out = loaded.model(input_ids=ids, output_hidden_states=True)
    # The scale the first norm divides by, from the raw embedding output.
    eps = loaded.model.config.rms_norm_eps
    scales = (out.hidden_states[0].double().square().mean(-1) + eps).sqrt()
    rest = scales[:, 1:].flatten()
    assert row["scale"] == pytest.approx(rest.mean().item(), rel=1e-6)
    assert row["scale_first"] == pytest.approx(scales[:, 0].mean().item(), rel=1e-6)
    spread = (torch.quantile(rest, 0.99) / torch.quantile(rest, 0.01)).item()
    assert spread > 5 and row["spread_p99_p1"] == pytest.approx(spread, rel=0.03)
    path = loaded.adapter.norm_paths(loaded.n_layers)[loaded.n_layers][1]
    assert path.endswith("layers.0.input_layernorm")
    norm = get_module(loaded.model, path)
    swap_module(loaded.model, path, _HandFrozen(norm.weight, rest.mean().float()))
    try:
        with torch.no_grad():
            frozen = loaded.model(input_ids=ids).logits
    finally:
        swap_module(loaded.model, path, norm)
    full_lp = torch.log_softmax(out.logits[:, :-1].double(), -1)
    frozen_lp = torch.log_softmax(frozen[:, :-1].double(), -1)
    kl = (full_lp.exp() * (full_lp - frozen_lp)).sum(-1).mean().item()
    target = ids[:, 1:, None]
    delta_ce = (-frozen_lp.gather(-1, target) + full_lp.gather(-1, target)).mean().item()
    assert kl > 1e-3
    assert row["kl"] == pytest.approx(kl, rel=1e-3)
    assert row["delta_ce"] == pytest.approx(delta_ce, rel=1e-3, abs=1e-5)


def test_encoder_reports_the_final_residual_change_and_groups():
    loaded = load_model("tiny-bert")
    tables = measure(loaded, _windows(loaded), ["norm-sensitivity"]).tables
    table, groups = tables["norm_sensitivity"], tables["norm_sensitivity_groups"]
    blocks = table[table["layer"].notna()]
    assert "kl" not in table and len(blocks) == 8 and (blocks["final_change_own_first"] > 0).all()
    assert set(groups["kind"]) == {"ln1", "ln2"}
