"""A pass whose reducers read no logits stops after the last point any reads: the blocks
after it, the final norm and the unembedding never run, in every backend, and what the
reducers see is bit for bit what a full pass gives them.  The chunked next-token scores
are checked against float64 computations from the model's own logits."""

import contextlib

import pytest
import torch

from layerscope.probes.backends import Point, get_backend, points
from layerscope.probes.capture import ProbeSpec, capture
from layerscope.probes.direct_logit import DirectLogitAttribution
from layerscope.probes.corpus import CorpusSpec, token_windows
from layerscope.probes.outlier_reducers import NextTokenLoss, mean_loss
from layerscope.probes.reducers import LayerCosines, LogitLens, ResidualMoments
from layerscope.probes.interventions import skip_blocks
from layerscope.probes.replay import final_normed, greedy_removal, score_tokens

BACKENDS = ("hooks", "transformer_lens", "nnsight")


def windows_for(loaded, max_tokens, seq_len=16, batch_size=2):
    spec = CorpusSpec("stdlib", seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)
    return token_windows(spec, loaded.tokenizer, loaded.bos_token_id, loaded.max_context)


@contextlib.contextmanager
def counting(**modules):
    """Count the completed forward calls of each named module while open."""
    calls = dict.fromkeys(modules, 0)
    handles = [m.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
               for k, m in modules.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _watched(loaded, backend):
    """The modules that run after the last block: TransformerLens runs its own copy."""
    if backend == "transformer_lens":
        bridge = get_backend(backend, loaded).bridge(loaded)
        return {"last_block": bridge.blocks[loaded.n_layers - 1], "final_norm": bridge.ln_final,
                "unembed": bridge.unembed}
    return {"last_block": loaded.adapter.layer_modules(loaded.model)[-1],
            "final_norm": loaded.model.model.norm, "unembed": loaded.model.lm_head}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_without_logits_stops_after_its_last_point(tiny_models, token_batch, backend):
    loaded = tiny_models["llama"]
    runner = get_backend(backend, loaded)
    cases = {  # points read -> modules that must not run
        "early": ([Point("resid_pre", 0), Point("resid_post", 1)], ("last_block", "final_norm", "unembed")),
        "every block": (points(["resid_post", "resid_mid"], loaded.n_layers), ("final_norm", "unembed")),
        "final norm": ([Point("final_norm")], ("unembed",)),
    }
    for name, (wanted, idle) in cases.items():
        full_logits, full = runner.run(loaded, token_batch, wanted)
        assert full_logits is not None
        with counting(**_watched(loaded, backend)) as calls:
            logits, acts = runner.run(loaded, token_batch, wanted, logits=False)
        assert logits is None
        for module in idle:
            assert calls[module] == 0, (backend, name, module)
        for p in wanted:
            assert torch.equal(acts[p], full[p]), (backend, name, str(p))


def test_capture_runs_the_unembedding_only_for_a_reducer_that_reads_logits(tiny_models):
    loaded = tiny_models["llama"]
    windows = windows_for(loaded, max_tokens=64)
    streaming = (ResidualMoments(), LayerCosines())
    with counting(unembed=loaded.model.lm_head, final_norm=loaded.model.model.norm) as calls:
        alone = capture(loaded, windows, ProbeSpec(streaming), progress=False)
    assert calls == {"unembed": 0, "final_norm": 0}
    # DLA of the next token reads its target's logit off the final residual; of the model's
    # top-1 token, it needs every logit.
    with counting(unembed=loaded.model.lm_head) as calls:
        capture(loaded, windows, ProbeSpec((*streaming, DirectLogitAttribution())), progress=False)
    assert calls["unembed"] == 0
    with counting(unembed=loaded.model.lm_head) as calls:
        with_logits = capture(loaded, windows, ProbeSpec((*streaming, DirectLogitAttribution(token="top"))),
                              progress=False)
    assert calls["unembed"] == len(windows)
    # The early stop changes nothing the reducers see: their results are bit-identical.
    for kind, got in alone["moments"].kinds.items():
        expected = with_logits["moments"].kinds[kind]
        for field in ("tokens", "sum_norm", "elements", "sum_x", "sum_x_sq"):
            assert torch.equal(getattr(got.rest, field), getattr(expected.rest, field))
            assert torch.equal(getattr(got.first, field), getattr(expected.first, field))
        assert torch.equal(got.max_abs, expected.max_abs)
    for field in ("block", "attn", "mlp"):
        assert torch.equal(getattr(alone["cosines"], field), getattr(with_logits["cosines"], field))
    torch.testing.assert_close(alone["cosines"].angular, with_logits["cosines"].angular, rtol=0, atol=0,
                               equal_nan=True)


def test_loss_and_lens_read_no_logits_of_the_pass(tiny_models):
    """The loss and the logit lens unembed chunks themselves: the model's head runs only on
    their chunks, never on the pass (whose call would hold the whole batch's logits)."""
    loaded = tiny_models["llama"]
    windows = windows_for(loaded, max_tokens=64)
    shapes = []
    handle = loaded.model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(a[0].shape)))
    try:
        capture(loaded, windows, ProbeSpec((NextTokenLoss(), LogitLens())), progress=False)
    finally:
        handle.remove()
    # [variant, rows, d_model] chunks: one variant for the loss, every layer for the lens.
    assert windows.spec.batch_size not in (1, loaded.n_layers)
    assert shapes and all(s[0] in (1, loaded.n_layers) for s in shapes)


def _f64_loss(loaded, windows, removed=()):
    """Mean next-token cross-entropy from the model's own float32 logits, in float64."""
    total, count = 0.0, 0
    with torch.no_grad(), skip_blocks(loaded, removed):
        for ids in windows:
            logits = loaded.model(ids, use_cache=False).logits.double()
            total -= torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum().item()
            count += ids[:, 1:].numel()
    return total / count


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt-neox", "gemma"])
def test_chunked_loss_matches_a_float64_loss_from_the_logits(tiny_models, family, monkeypatch):
    loaded = tiny_models[family]
    windows = windows_for(loaded, max_tokens=128)
    # Chunks of three rows, so that every batch is split unevenly.
    monkeypatch.setattr("layerscope.probes.replay.CHUNK_BYTES", 3 * 4 * loaded.config.vocab_size)
    assert mean_loss(loaded, windows) == pytest.approx(_f64_loss(loaded, windows), rel=1e-6)


def test_score_tokens_matches_full_tensor_computations(tiny_models, monkeypatch):
    loaded = tiny_models["llama"]
    monkeypatch.setattr("layerscope.probes.replay.CHUNK_BYTES", 5 * 4 * loaded.config.vocab_size)
    generator = torch.Generator().manual_seed(3)
    normed = final_normed(loaded, torch.randn(3, 17, loaded.d_model, generator=generator))
    targets = torch.randint(0, loaded.config.vocab_size, (17,), generator=generator)
    targets[4] = -1
    scores = score_tokens(loaded, normed, targets, reference=1)
    with torch.no_grad():
        logprobs = torch.log_softmax(loaded.model.lm_head(normed).double(), -1)
    ce = -logprobs.gather(-1, targets.clamp_min(0).expand(3, -1)[..., None])[..., 0]
    ce[:, 4] = 0
    torch.testing.assert_close(scores.ce.double(), ce, rtol=1e-5, atol=1e-6)
    kl = (logprobs[1].exp() * (logprobs[1] - logprobs)).sum(-1)
    torch.testing.assert_close(scores.kl.double(), kl, rtol=1e-4, atol=1e-6)
    assert torch.equal(scores.top, logprobs.argmax(-1))
    torch.testing.assert_close(scores.top_logprob.double(), logprobs.max(-1).values, rtol=1e-5, atol=1e-6)


def test_greedy_removal_against_full_forwards(tiny_models):
    """Each greedy step's loss equals a full forward's with those blocks skipped, and no
    other block's removal would have cost less."""
    loaded = tiny_models["gpt2"]
    windows = windows_for(loaded, max_tokens=64)
    path = greedy_removal(loaded, windows, 2)
    removed = []
    for layer, ce in path:
        options = {c: _f64_loss(loaded, windows, [*removed, c]) for c in range(loaded.n_layers) if c not in removed}
        assert ce == pytest.approx(options[layer], rel=1e-6)
        assert options[layer] <= min(options.values()) + 1e-6
        removed.append(layer)


@pytest.mark.real
def test_smollm2_loss_matches_a_float64_loss_from_the_logits(smollm2):
    """With a 49k vocabulary, a float32 log-softmax is a few 1e-6 off float64."""
    windows = windows_for(smollm2, max_tokens=128, seq_len=64)
    assert mean_loss(smollm2, windows) == pytest.approx(_f64_loss(smollm2, windows), rel=1e-5)
