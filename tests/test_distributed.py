"""Data-parallel runs under torchrun with 2 gloo ranks on the CPU give the tables of one
process, and a rank that dies leaves no run that looks complete."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layerscope.analysis.registry import METRICS
from layerscope.analysis.result import Result
from layerscope.analysis.runner import measure
from layerscope.analysis.store import list_runs
from layerscope.probes.inputs import windows
from layerscope.probes.zoo import load_model

TORCHRUN = Path(sys.executable).with_name("torchrun")
STREAMING = [m.name for m in METRICS.values() if m.kind == "streaming"]


def torchrun(args: list[str], port: int, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(port), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def assert_same_tables(parallel: dict, single: dict) -> None:
    """Equal to 1e-6 relative; values near zero that are differences of O(1) sums summed in
    another order (delta_ce = ce_skipped - ce_full, about 5.6 each) to 1e-6 absolute."""
    assert sorted(parallel) == sorted(single)
    for name, table in single.items():
        other = parallel[name]
        assert list(other.columns) == list(table.columns), name
        for column in table.columns:
            if pd.api.types.is_numeric_dtype(table[column]) and not pd.api.types.is_bool_dtype(table[column]):
                np.testing.assert_allclose(other[column].to_numpy(float), table[column].to_numpy(float),
                                           rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=f"{name}.{column}")
            else:
                assert other[column].astype(str).tolist() == table[column].astype(str).tolist(), f"{name}.{column}"


def check_against_one_process(model: str, max_tokens: int, seq_len: int, command: list[str], metrics: list[str],
                               options: dict | None, tmp_path, port: int) -> None:
    runs = tmp_path / "runs"
    done = torchrun(["-m", "layerscope.app.cli", *command, "--model", model, "--max-tokens", str(max_tokens),
                     "--seq-len", str(seq_len), "--runs-dir", str(runs), "--format", "json"], port)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = list_runs(runs)
    parallel = Result.load(runs / run["run_id"])
    assert parallel.manifest["distributed"]["world_size"] == 2
    assert set(parallel.manifest["distributed"]["shards"]) == {"0", "1"}
    loaded = load_model(model)
    single = measure(loaded, windows(loaded, "stdlib", seq_len=seq_len, max_tokens=max_tokens), metrics,
                     options=options)
    assert_same_tables(parallel.tables, single.tables)


def test_two_gloo_ranks_give_the_tables_of_one_process(tmp_path):
    metrics = STREAMING + ["layer-skip"]
    check_against_one_process("tiny-llama", 1024, 32, ["survey", "--metrics", ",".join(metrics)], metrics, None,
                              tmp_path, 29611)


@pytest.mark.real
@pytest.mark.heavy
def test_two_gloo_ranks_on_smollm2_give_the_tables_of_one_process(tmp_path):
    check_against_one_process("smollm2-135m", 2048, 128, ["survey", "--metrics", ",".join(STREAMING)], STREAMING,
                              None, tmp_path / "streaming", 29612)
    check_against_one_process("smollm2-135m", 2048, 128, ["analyze", "layer-skip", "--layers", "0,11,29"],
                              ["layer-skip"], {"layer-skip": {"layers": "0,11,29"}}, tmp_path / "skip", 29614)


DYING_RANK = textwrap.dedent('''
    import os, sys
    from layerscope.analysis.runner import measure
    from layerscope.probes import reducers
    from layerscope.probes.inputs import windows
    from layerscope.probes.zoo import load_model

    if os.environ["RANK"] == "1":
        def die(self, acts, batch):
            os._exit(9)
        reducers._MomentsState.update = die
    model = load_model("tiny-llama")
    result = measure(model, windows(model, "stdlib", seq_len=32, max_tokens=512), ["residual-stats"])
    if result is not None:
        result.save(sys.argv[1])
''')


def test_a_rank_that_dies_leaves_no_complete_run(tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(DYING_RANK)
    runs = tmp_path / "runs"
    done = torchrun([str(script), str(runs)], 29613, timeout=300)
    assert done.returncode != 0
    complete = [r for r in list_runs(runs) if r["status"] == "complete"] if runs.exists() else []
    assert complete == []
