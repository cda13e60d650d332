"""Adapters derived from TransformerLens' mapping, checked on a tiny model of every architecture.

For each architecture: the three backends agree with each other and with HF
`output_hidden_states`; the sublayer contributions add up to the residual in the way the
placement says (checked with plain tensor sums and the model's own norm modules); skipping
nothing leaves the logits bit-identical; skipping block l makes its output its input.
"""

import json

import pytest
import torch

from layerscope.probes.backends import Point, get_backend, points
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module
from layerscope.probes.interventions import skip_blocks
from layerscope.probes.zoo import TINY_MODELS, load_model

RESID_KINDS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
BACKENDS = ("hooks", "transformer_lens", "nnsight")

# The placement each architecture's structure implies, written down from its HF modelling
# code, so a derivation that guesses wrong fails here.
EXPECTED_PLACEMENT = {
    "gemma2": "peri", "gemma3": "peri", "olmo2": "sublayer-post", "bert": "post", "roberta": "post",
    "phi": "parallel", "gpt-neox-parallel": "parallel", "gptj": "parallel", "falcon": "parallel",
    "cohere": "parallel",
}
EXPECTED_OFFSET = {"gemma": 1.0, "gemma2": 1.0, "gemma3": 1.0, "nemotron": 1.0}
MIXTURE_OF_EXPERTS = {"mixtral", "qwen2-moe", "qwen3-moe", "olmoe"}


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(f"tiny-{name}", attn_implementation="eager")
        return cache[name]
    return get


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_derived_adapter_reads_the_architecture(models, name):
    adapter = models(name).adapter
    assert adapter.placement == EXPECTED_PLACEMENT.get(name, "pre")
    assert adapter.norm_weight_offset == EXPECTED_OFFSET.get(name, 0.0)
    assert (adapter.down_proj is None) == (name in MIXTURE_OF_EXPERTS)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_backends_agree_with_hf_hidden_states(models, token_batch, name):
    loaded = models(name)
    adapter, n = loaded.adapter, loaded.n_layers
    with torch.no_grad():
        hidden = loaded.model(token_batch, output_hidden_states=True).hidden_states
    wanted = points(RESID_KINDS, n)
    runs = {backend: get_backend(backend).run(loaded, token_batch, wanted)[1] for backend in BACKENDS}
    acts = runs["hooks"]
    for backend in BACKENDS[1:]:
        for p in wanted:
            assert _rel_err(runs[backend][p], acts[p]) < 1e-4, (backend, str(p))
    for layer in range(n):
        assert _rel_err(acts[Point("resid_pre", layer)], hidden[layer]) < 1e-5
    for layer in range(n - 1):
        assert _rel_err(acts[Point("resid_post", layer)], hidden[layer + 1]) < 1e-5
    last = acts[Point("resid_post", n - 1)]
    if adapter.final_norm:  # HF's last hidden state is after the final norm
        last = get_module(loaded.model, adapter.final_norm)(last)
    assert _rel_err(last, hidden[n]) < 1e-5

    for layer in range(n):
        pre, mid, post, attn, mlp = (acts[Point(k, layer)] for k in RESID_KINDS)
        block = adapter.layer_modules(loaded.model)[layer]
        if adapter.placement == "post":
            with torch.no_grad():
                assert _rel_err(get_module(block, adapter.ln1)(pre + attn), mid) < 1e-5
                assert _rel_err(get_module(block, adapter.ln2)(mid + mlp), post) < 1e-5
        elif adapter.placement == "parallel":
            assert _rel_err(pre + attn + mlp, post) < 1e-5
            assert _rel_err(pre + attn, mid) < 1e-6
        else:
            assert _rel_err(pre + attn, mid) < 1e-5
            assert _rel_err(mid + mlp, post) < 1e-5


@pytest.mark.parametrize("name", TINY_MODELS)
def test_skipping_a_block_makes_its_output_its_input(models, token_batch, name):
    loaded = models(name)
    hooks = get_backend("hooks")
    with torch.no_grad():
        clean = loaded.model(token_batch).logits
        with skip_blocks(loaded, []):
            unskipped = loaded.model(token_batch).logits
    assert torch.equal(clean, unskipped)
    layer = loaded.n_layers - 1
    with skip_blocks(loaded, [layer]):
        _, acts = hooks.run(loaded, token_batch, [Point("resid_pre", layer), Point("resid_post", layer)])
    assert torch.equal(acts[Point("resid_pre", layer)], acts[Point("resid_post", layer)])


def test_peri_norm_listing_covers_all_four_block_norms_and_the_final_norm(models):
    loaded = models("gemma3")
    roles = [role for role, _ in loaded.adapter.norm_paths(loaded.n_layers)]
    for layer in range(loaded.n_layers):
        for kind in ("ln1", "ln1_post", "ln2", "ln2_post"):
            assert f"{kind}[{layer}]" in roles
    assert roles[-1] == "final_norm" and len(roles) == 4 * loaded.n_layers + 1


def test_a_mixture_of_experts_mlp_refuses_the_down_projection_point(models, token_batch):
    loaded = models("mixtral")
    with pytest.raises(UserError, match="down-projection"):
        get_backend("hooks").run(loaded, token_batch, [Point("mlp_act", 0)])


def _tiny_config_file(tmp_path, model_type, **extra):
    from layerscope.probes.tiny_architectures import TINY_ARCH_SIZES

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": model_type, **TINY_ARCH_SIZES, **extra}))
    return path


@pytest.mark.parametrize("model_type", ["exaone4", "glm4", "arcee"])
def test_an_architecture_no_test_names_runs_from_its_config(tmp_path, model_type):
    """Architectures TransformerLens maps that no other test names: residual-stats runs on them."""
    from layerscope.app.cli import main

    path = _tiny_config_file(tmp_path, model_type, head_dim=16)
    assert main(["analyze", "residual-stats", "--model", f"config:{path}", "--max-tokens", "64",
                 "--seq-len", "32", "--no-save"]) == 0


def test_an_architecture_transformer_lens_does_not_map_fails_in_one_line(tmp_path, capsys):
    from layerscope.app.cli import main

    path = _tiny_config_file(tmp_path, "persimmon")
    assert main(["analyze", "residual-stats", "--model", f"config:{path}", "--max-tokens", "64",
                 "--seq-len", "32", "--no-save"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PersimmonForCausalLM" in err[0] and "declare_adapter" in err[0]


# One model of each placement layerscope derives, plus a mixture of experts.
EVERY_PLACEMENT = ["gemma3", "olmo2", "falcon", "gptj", "phi3", "mixtral", "roberta"]


@pytest.mark.parametrize("name", EVERY_PLACEMENT)
def test_every_measurement_runs(models, name):
    """Every measurement that applies runs in one `measure` call; the mixture of experts,
    which has no single down-projection, leaves super weights out with its reason."""
    from layerscope.analysis.registry import METRICS
    from layerscope.analysis.runner import measure
    from layerscope.probes.inputs import windows

    loaded = models(name)
    corpus = windows(loaded, "stdlib", seq_len=16, max_tokens=32, batch_size=2)
    chosen = [m for m, metric in METRICS.items() if metric.applies_to(loaded) and m != "prune-curve"]
    if name in MIXTURE_OF_EXPERTS:
        with pytest.raises(UserError, match="down-projection"):
            measure(loaded, corpus, ["super-weights"])
        chosen.remove("super-weights")
    result = measure(loaded, corpus, chosen)
    for metric, table_names in result.manifest["tables_by_metric"].items():
        tables = [result.tables[t] for t in table_names]
        assert any(len(t) for t in tables), metric
        for table_name, table in zip(table_names, tables):
            if len(table):
                assert table.select_dtypes("number").notna().any().any(), (metric, table_name)


def test_a_derived_adapter_is_kept_so_a_later_load_skips_transformer_lens(tmp_path):
    import subprocess
    import sys

    from layerscope.probes.architectures import _derive_adapter

    script = ("import sys; from layerscope.probes.zoo import load_model; m = load_model('tiny-falcon'); "
              "print(m.adapter.placement, 'transformer_lens' in sys.modules)")
    env = {**__import__("os").environ, "LAYERSCOPE_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            .stdout.split() for _ in range(2)]
    assert runs == [["parallel", "True"], ["parallel", "False"]]
    [kept] = (tmp_path / "adapters").glob("*.json")
    model = load_model("tiny-falcon").model
    assert json.loads(kept.read_text()) == json.loads(json.dumps(__import__("dataclasses").asdict(_derive_adapter(model))))
