"""Device and dtype: bf16 on the CPU agrees with float32, statistics are summed in float32
or wider whatever the model's dtype, and the GPU paths run where CUDA is present."""

import pytest
import torch

from layerscope.analysis.runner import measure
from layerscope.app.cli import main
from layerscope.probes.capture import ProbeSpec, capture
from layerscope.probes.errors import UserError
from layerscope.probes.reducers import LayerCosines, ResidualMoments
from layerscope.probes.zoo import load_model, resolve_device, resolve_dtype
from outlier_helpers import small_windows

def gpu(test, devices: int = 1):
    """Marked `gpu`; skipped with the reason where fewer CUDA devices are visible."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.gpu(pytest.mark.skipif(visible < devices, reason=f"needs {devices} CUDA device(s), "
                                              f"{visible} visible")(test))


def two_gpus(test):
    return gpu(test, devices=2)


def test_auto_is_float32_on_the_cpu_and_bad_choices_are_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu"), None) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu"), None) == torch.bfloat16
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"), None)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is visible"):
            resolve_device("cuda:0")


def test_bfloat16_statistics_are_summed_wide(tiny_models):
    loaded = load_model("tiny-llama", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.card()["dtype"] == "bfloat16"
    captured = capture(loaded, small_windows(loaded), ProbeSpec((ResidualMoments(), LayerCosines())), progress=False)
    tensors = [v for r in captured.results.values()
               for v in (vars(r).values() if not isinstance(r, dict) else r.values()) if isinstance(v, torch.Tensor)]
    floating = [t for t in tensors if t.is_floating_point()]
    assert floating and all(t.dtype in (torch.float32, torch.float64) for t in floating)


def test_bfloat16_agrees_with_float32_within_its_precision(tiny_models):
    """bf16 keeps 8 bits of mantissa (about 3 significant digits, relative step 2^-8 =
    0.4%); over 4 blocks the errors compound, so norms must agree to 3% and Block Influence
    (1 - cos, differences of nearby numbers) to 0.05 absolute."""
    names = ["residual-stats", "block-influence", "massive", "sinks"]
    wide = measure(load_model("tiny-llama"), small_windows(tiny_models["llama"], max_tokens=256), names)
    narrow = measure(load_model("tiny-llama", dtype="bfloat16"), small_windows(tiny_models["llama"], max_tokens=256),
                     names)
    for name, tol in (("mean_norm", 0.03), ("variance", 0.06)):
        a, b = wide["residual_stats"][name].to_numpy(), narrow["residual_stats"][name].to_numpy()
        assert abs(b / a - 1).max() < tol, name
    bi = abs(wide["block_influence"]["block_influence"] - narrow["block_influence"]["block_influence"]).max()
    assert bi < 0.05
    assert (wide["sink_summary"]["sink_rate"] - narrow["sink_summary"]["sink_rate"]).abs().max() <= 10


def test_the_cli_takes_device_dtype_and_threads(capsys):
    assert main(["analyze", "residual-stats", "--model", "tiny-llama", "--dtype", "bfloat16", "--device", "cpu",
                 "--threads", "1", "--max-tokens", "64", "--seq-len", "32", "--no-save", "--format", "json"]) == 0
    assert main(["analyze", "residual-stats", "--model", "tiny-llama", "--threads", "0", "--no-save"]) == 2
    assert "--threads must be between 1" in capsys.readouterr().err


@gpu
def test_cuda_placement_bf16_and_agreement_with_the_cpu(tiny_models):
    cpu = measure(load_model("tiny-llama"), small_windows(tiny_models["llama"]), ["residual-stats", "block-influence"])
    loaded = load_model("tiny-llama", device="cuda", dtype="float32")
    assert loaded.input_device.type == "cuda"
    on_gpu = measure(loaded, small_windows(loaded), ["residual-stats", "block-influence"])
    for table, column in (("residual_stats", "mean_norm"), ("block_influence", "block_influence")):
        torch.testing.assert_close(torch.tensor(on_gpu[table][column].to_numpy()),
                                   torch.tensor(cpu[table][column].to_numpy()), rtol=1e-4, atol=1e-5)
    narrow = load_model("tiny-llama", device="cuda", dtype="bfloat16")
    assert measure(narrow, small_windows(narrow), ["massive", "layer-skip"])["layer_skip"].shape[0] == 4


@two_gpus
def test_device_map_spreads_blocks_over_two_gpus(tiny_models):
    loaded = load_model("tiny-llama", device_map="auto")
    result = measure(loaded, small_windows(loaded), ["residual-stats", "block-influence", "layer-skip"])
    cpu = measure(load_model("tiny-llama"), small_windows(loaded), ["residual-stats"])
    torch.testing.assert_close(torch.tensor(result["residual_stats"]["mean_norm"].to_numpy()),
                               torch.tensor(cpu["residual_stats"]["mean_norm"].to_numpy()), rtol=1e-4, atol=1e-5)



def test_the_app_measures_in_the_chosen_dtype(tmp_path, monkeypatch):
    from test_app import open_app

    from layerscope.analysis.store import list_runs, load_run

    monkeypatch.setenv("LAYERSCOPE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LAYERSCOPE_ALLOWED_DIRS", str(tmp_path))
    at = open_app("residual-stats", dtype="bfloat16")
    assert at.sidebar.selectbox(key="device").options[:2] == ["auto", "cpu"]
    at.button(key="residual-stats.run").click().run()
    assert not at.exception
    [run] = list_runs(tmp_path / "runs")
    manifest, _ = load_run(run["run_id"], tmp_path / "runs")
    assert manifest["model"]["dtype"] == "bfloat16"


@pytest.mark.real
def test_smollm2_in_bfloat16_agrees_with_float32():
    """On real weights: Block Influence to 0.02 absolute (bf16 residuals of |x| up to 2e4
    carry about 3 significant digits, and 1 - cos of nearby vectors loses more), mean
    norms to 2% relative, the same massive dim and first massive layer, and the sink rate
    to 5 percentage points."""
    from layerscope.probes.inputs import windows

    wide_model = load_model("smollm2-135m")
    corpus = windows(wide_model, "stdlib", seq_len=64, max_tokens=128)
    names = ["residual-stats", "block-influence", "massive", "sinks"]
    wide = measure(wide_model, corpus, names)
    del wide_model
    narrow = measure(load_model("smollm2-135m", dtype="bfloat16"), corpus, names)
    bi = (wide["block_influence"]["block_influence"] - narrow["block_influence"]["block_influence"]).abs().max()
    assert bi < 0.02, bi
    post = lambda r: r["residual_stats"].query("point == 'resid_post'")["mean_norm"].to_numpy()
    assert abs(post(narrow) / post(wide) - 1).max() < 0.02
    first_massive = lambda r: r["massive_dims"].query("massive").sort_values(["layer", "max_abs"]).iloc[[0, -1]]
    assert first_massive(wide)["layer"].iloc[0] == first_massive(narrow)["layer"].iloc[0]
    top = lambda r: r["massive_top"].query("rank == 1 and massive")["dim"].mode().iloc[0]
    assert top(wide) == top(narrow)
    assert abs(wide["sink_summary"]["sink_rate"].iloc[0] - narrow["sink_summary"]["sink_rate"].iloc[0]) < 5


@pytest.mark.heavy
def test_every_measurement_runs_on_smollm2_in_bfloat16(tmp_path):
    """`survey --dtype bfloat16` on real weights: every measurement gives its tables, and
    the run records the dtype."""
    from layerscope.analysis.registry import METRICS
    from layerscope.analysis.store import list_runs, load_run

    assert main(["survey", "--model", "smollm2-135m", "--dtype", "bfloat16", "--device", "cpu", "--seq-len", "64",
                 "--max-tokens", "128", "--runs-dir", str(tmp_path), "--format", "json"]) == 0
    [run] = list_runs(tmp_path)
    manifest, tables = load_run(run["run_id"], tmp_path)
    assert manifest["model"]["dtype"] == "bfloat16"
    causal = {name for name, metric in METRICS.items() if metric.applies_to(load_model("smollm2-135m"))}
    assert set(manifest["tables_by_metric"]) == causal
    assert all(manifest["tables_by_metric"][name] for name in causal)
    assert all(len(table) for table in tables.values())
