"""The one runner: one capture pass for every streaming measurement, shared reducers,
named results, and the public API."""

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

import layerscope as ls
from layerscope.analysis.registry import METRICS
from layerscope.analysis.runner import measure
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import load_model
from outlier_helpers import small_windows
from test_golden import GOLDEN, assert_same_table, stored_metrics

STREAMING = [m.name for m in METRICS.values() if m.kind == "streaming"]


def count_forward_passes(loaded):
    """Counts calls of the embedding: one per forward pass over a batch."""
    calls = []
    embed = loaded.model.get_input_embeddings()
    return calls, embed.register_forward_hook(lambda *args: calls.append(1))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_every_streaming_measurement_costs_one_pass_per_batch(tiny_models, family):
    loaded = tiny_models[family]
    windows = small_windows(loaded, max_tokens=256)
    applicable = [n for n in STREAMING if METRICS[n].applies_to(loaded)]
    assert len(applicable) >= 8
    calls, handle = count_forward_passes(loaded)
    try:
        result = measure(loaded, windows, applicable)
    finally:
        handle.remove()
    assert len(calls) == len(windows) == 4
    assert result.manifest["capture_passes"] == 1
    assert set(result.manifest["tables_by_metric"]) == set(applicable)


def test_replay_measurements_start_from_the_shared_pass(tiny_models):
    loaded = tiny_models["llama"]
    windows = small_windows(loaded, max_tokens=128)
    calls, handle = count_forward_passes(loaded)
    try:
        measure(loaded, windows, ["block-influence", "prune-curve"], options={"prune-curve": {"greedy": False}})
    finally:
        handle.remove()
    alone, handle = count_forward_passes(loaded)
    try:
        measure(loaded, windows, ["prune-curve"], greedy=False)
    finally:
        handle.remove()
    # Block Influence adds nothing: prune-curve's BI order is read from the same pass.
    assert len(calls) == len(alone)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-gpt-neox", "tiny-bert"])
def test_all_measurements_in_one_call_match_the_stored_tables(model):
    loaded = load_model(model)
    windows = small_windows(loaded, max_tokens=128, seq_len=32, batch_size=8)
    names = stored_metrics(model)
    result = measure(loaded, windows, names, options={"prune-curve": {"max_removed": 2, "heldout": 0.0}} if "prune-curve" in names
                     else None)
    for name in names:
        for path in sorted((GOLDEN / model / name).glob("*.parquet")):
            expected = pd.read_parquet(path)  # columns added since the stored commit are not compared
            assert_same_table(expected, result[path.stem][list(expected.columns)], f"{model} {name} {path.stem}")


def test_equal_reducers_are_shared_and_conflicting_ones_refused(tiny_models, monkeypatch):
    from layerscope.analysis import runner

    loaded = tiny_models["llama"]
    seen = []
    monkeypatch.setattr(runner, "capture", lambda model, windows, spec, **kw: seen.append(spec) or
                        runner_capture(model, windows, spec, **kw))
    measure(loaded, small_windows(loaded), ["residual-stats", "variance"])
    names = [r.name for r in seen[0].reducers]
    assert names.count("moments") == 1 and "sublayer_ratios" in names
    with pytest.raises(UserError, match="other settings"):
        runner._union({"a": ls.ProbeSpec((METRICS["massive"].probe(METRICS["massive"].options(top_k=2), loaded).reducers)),
                       "b": ls.ProbeSpec((METRICS["massive"].probe(METRICS["massive"].options(top_k=3), loaded).reducers))})


def runner_capture(*args, **kwargs):
    from layerscope.probes.capture import capture

    return capture(*args, **kwargs)


def test_survey_of_a_four_layer_model_adapts_its_defaults(tiny_models):
    loaded = tiny_models["llama"]
    result = measure(loaded, small_windows(loaded))
    curve = result["prune_curve"]
    assert curve["n_removed"].max() == loaded.n_layers - 1
    assert set(result.metrics) == set(METRICS)


def test_an_encoder_survey_notes_what_does_not_apply(tiny_models):
    result = measure(tiny_models["bert"], small_windows(tiny_models["bert"]))
    skipped = {m.name for m in METRICS.values() if m.causal_only}
    assert skipped and all(any(line.startswith(f"{name}: not applicable") for line in result.summary)
                           for name in skipped)
    with pytest.raises(UserError, match="needs a causal language model"):
        measure(tiny_models["bert"], small_windows(tiny_models["bert"]), ["logit-lens"])


def test_options_by_dict_dataclass_and_keyword(tiny_models):
    loaded = tiny_models["gpt2"]
    windows = small_windows(loaded)
    by_keyword = measure(loaded, windows, ["massive"], top_k=5)["massive_top"]
    by_dict = measure(loaded, windows, ["massive"], options={"massive": {"top_k": 5}})["massive_top"]
    assert by_keyword["rank"].max() == 5
    pd.testing.assert_frame_equal(by_keyword, by_dict)
    with pytest.raises(UserError, match="no chosen measurement has the option"):
        measure(loaded, windows, ["massive"], angular=2)
    with pytest.raises(UserError, match="not measured here"):
        measure(loaded, windows, ["massive"], options={"sinks": {}})
    with pytest.raises(UserError, match="unknown metric"):
        measure(loaded, windows, ["massif"])


def test_result_saves_and_loads_back(tiny_models, tmp_path):
    loaded = tiny_models["llama"]
    result = measure(loaded, small_windows(loaded), ["block-influence", "massive"])
    path = result.save(tmp_path)
    again = ls.Result.load(path)
    assert again.metrics == ["block-influence", "massive"]
    assert sorted(again.tables) == sorted(result.tables)
    for name, table in result.tables.items():
        pd.testing.assert_frame_equal(again[name], table)
    assert len(again.figures()) == len(result.figures()) >= 3
    assert again.summary == result.summary and len(result.summary) == 2
    assert ls.Result.load("latest", runs_dir=tmp_path).path == path
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["capture_passes"] == 1 and manifest["model"]["model"] == "tiny-llama"


def test_a_string_corpus_is_measured_whole_and_a_wrong_type_is_refused(tiny_models):
    loaded = tiny_models["llama"]
    text = "Residual streams grow with depth."
    result = measure(loaded, text, ["residual-stats"])
    assert result.manifest["corpus"]["tokens"] == len(text.encode()) + 1  # byte tokens plus BOS
    with pytest.raises(UserError, match="a corpus is token windows"):
        measure(loaded, ["a", "list"], ["residual-stats"])
    with pytest.raises(UserError, match="does not exist"):
        measure(loaded, "missing-file.txt", ["residual-stats"])


def test_activations_equal_hf_hidden_states(tiny_models):
    loaded = tiny_models["llama"]
    windows = small_windows(loaded, max_tokens=64)
    acts = ls.activations(loaded, windows, ["resid_post[2]", "attn_pattern[1]"])
    with torch.no_grad():
        hidden = loaded.model(windows.input_ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["resid_post[2]"], hidden[3], rtol=0, atol=0)
    assert acts["attn_pattern[1]"].shape == (2, loaded.n_heads, 32, 32)
    with pytest.raises(UserError, match="over the cap"):
        ls.activations(loaded, windows, ["resid_post[2]"], max_bytes=1000)
    with pytest.raises(UserError, match="has layers 0..3"):
        ls.activations(loaded, windows, ["resid_post[9]"])


def test_a_measurement_leaves_the_model_as_it_was():
    loaded = load_model("tiny-qwen2")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    measure(loaded, small_windows(loaded), ["sinks", "block-influence"], options={"block-influence": {"placements": "pre,peri"}})
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.adapter.placement == "pre"
    after = loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_placement_comparison_stacks_every_table(tiny_models):
    loaded = tiny_models["llama"]
    result = measure(loaded, small_windows(loaded), ["variance"], placements="pre,post")
    for table in result.tables.values():
        assert set(table["placement"]) == {"pre", "post"}


def test_the_front_door_lists_its_names():
    assert {"load_model", "windows", "measure", "activations", "capture", "ProbeSpec", "Point",
            "skip_blocks", "Result"} <= set(dir(ls))
    assert set(ls.__all__) <= set(dir(ls))


def test_import_layerscope_does_not_import_torch():
    code = "import sys, layerscope; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# Folds the moments of every residual point and, when asked, keeps each batch's block
# outputs too: the defect a memory test must catch.
MEMORY_SCRIPT = textwrap.dedent('''
    import resource, sys
    from dataclasses import dataclass
    import torch
    from layerscope.analysis.residual_stats import PROBE
    from layerscope.probes.backends import Point
    from layerscope.probes.capture import ProbeSpec, capture
    from layerscope.probes.corpus import CorpusSpec, TokenWindows
    from layerscope.probes.zoo import load_model

    @dataclass(frozen=True)
    class KeepsBatches:
        name: str = "keeps_batches"
        def points(self, loaded):
            return [Point("resid_post", l) for l in range(loaded.n_layers)]
        def start(self, loaded):
            return Kept()

    class Kept:
        def __init__(self):
            self.kept = []
        def update(self, acts, batch):
            self.kept.append([x.clone() for x in acts.values()])
        def result(self):
            return {}

    @dataclass(frozen=True)
    class ResidentMemory:
        """Samples the process's resident memory after each batch is folded."""
        name: str = "resident"
        def points(self, loaded):
            return []
        def start(self, loaded):
            return Samples()

    class Samples:
        def __init__(self):
            self.kib = []
        def update(self, acts, batch):
            with open("/proc/self/statm") as f:
                self.kib.append(int(f.read().split()[1]) * resource.getpagesize() // 1024)
        def result(self):
            return {"kib": self.kib}

    loaded = load_model("tiny-llama")
    spec = ProbeSpec(PROBE.reducers + (ResidentMemory(),) + ((KeepsBatches(),) if sys.argv[1] == "leaky" else ()))
    ids = torch.randint(0, 256, (256, 256), generator=torch.Generator().manual_seed(0))
    windows = TokenWindows(CorpusSpec("ids", 256, ids.numel(), 16), ids, "", "")
    kib = capture(loaded, windows, spec, progress=False)["resident"]["kib"]
    # Growth from the second batch (allocator and kernels warm) to the highest sample.
    print(max(kib) - kib[1])
''')


def peak_growth_kib(variant: str) -> int:
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, variant], capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                                          "HOME": str(__import__("pathlib").Path.home())})
    return int(out.stdout.split()[-1])


def test_peak_memory_does_not_grow_with_the_corpus_and_a_leak_would_be_caught():
    """Resident memory (the kernel's count, not the reducers' own bytes) sampled after each
    of 16 batches of 16 x 256 tokens: flat for the real reducers; a reducer that keeps each
    batch's block outputs (4 x 16 x 256 x 64 floats, 4 MiB a batch) grows by about 56 MiB
    and is caught."""
    honest = peak_growth_kib("honest")
    leaky = peak_growth_kib("leaky")
    assert honest < 16 * 1024, honest
    assert leaky > 40 * 1024, leaky


def test_reducer_state_bytes_never_count_the_model(tiny_models):
    """The logit-lens state holds the model to unembed with; its byte count is its sums only."""
    from layerscope.probes.capture import capture
    from layerscope.probes.reducers import LogitLens

    loaded = tiny_models["llama"]
    captured = capture(loaded, small_windows(loaded), ls.ProbeSpec((LogitLens(),)), progress=False)
    model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    assert 0 < captured.peak_state_bytes < model_bytes / 10
