"""LN removal: the fake norm, the schedule, deterministic resume, the norm-free model on
disk, the payoff of fine-tuning, and the CLI's one-line errors."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch

from layerscope.app.cli import main
from layerscope.probes.errors import UserError
from layerscope.probes.families import get_module
from layerscope.probes.interventions import FrozenNorm
from layerscope.probes.ln_removal import (LossNotFinite, RemovableNorm, RemovalConfig, RemovalData, fine_tune,
                                          load_checkpoint, remove_without_finetuning, removal_schedule,
                                          save_norm_free)
from layerscope.probes.ln_schedule import learning_rate
from layerscope.probes.norms import is_real_norm, norm_forward, norm_sites, token_scale, value_split_roles
from layerscope.probes.zoo import FROZEN_NORMS_FILE, TINY_FAMILIES, load_model

FAST = RemovalConfig(steps=16, start=1, gap_mlp=1, gap_attn=1, gap_v=1, gap_final=1, lr=1e-3, lr_warmup=2)
SMALL_DATA = RemovalData(seq_len=32, batch_size=4, train_tokens=2048, eval_tokens=512)


def _removed(family: str, config: RemovalConfig = FAST, **kwargs):
    loaded = load_model(f"tiny-{family}")
    train, evaluation = SMALL_DATA.windows(loaded)
    return loaded, fine_tune(loaded, train, evaluation, config, **kwargs)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fake_norm_with_each_tokens_true_scale_reproduces_the_real_norm(family):
    loaded = load_model(f"tiny-{family}")
    sites = norm_sites(loaded)
    assert {s.group for s in sites} >= {"mlp", "attn"}
    generator = torch.Generator().manual_seed(3)
    # Tokens of very different norms, so one shared scale could not fit them all.
    x = torch.randn(1, 6, loaded.d_model, generator=generator) * torch.tensor([40.0, 1, 2, 5, 0.3, 9])[:, None] + 0.5
    for site in sites:
        real = get_module(loaded.model, site.path)
        expected = real(x)
        true = token_scale(x, site.kind, site.eps)[0]
        fake = RemovableNorm(real, site, momentum=None)
        assert torch.equal(fake(x), expected), "a live fake norm is the real norm, bit for bit"
        fake.frozen.fill_(True)
        fake.first_scale.fill_(true[0].item())
        for pos in range(1, x.shape[1]):
            fake.scale.fill_(true[pos].item())
            got = fake(x)
            torch.testing.assert_close(got[:, pos], expected[:, pos], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got[:, 0], expected[:, 0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(norm_forward(real, x.double(), site.weight_offset), expected.double(),
                                   rtol=1e-6, atol=1e-6)


def test_running_average_and_freeze_use_position_zero_apart():
    loaded = load_model("tiny-llama")
    site = norm_sites(loaded)[0]
    fake = RemovableNorm(get_module(loaded.model, site.path), site, momentum=None)
    fake.tracking = True
    batches = [torch.randn(2, 5, loaded.d_model) * torch.tensor([30.0, 1, 1, 1, 1])[:, None] for _ in range(3)]
    for x in batches:
        fake(x)
    scales = [token_scale(x, site.kind, site.eps) for x in batches]
    fake.freeze(shared_first_scale=False)
    assert fake.first_scale.item() == pytest.approx(sum(s[:, 0].mean().item() for s in scales) / 3, rel=1e-5)
    assert fake.scale.item() == pytest.approx(sum(s[:, 1:].mean().item() for s in scales) / 3, rel=1e-5)
    assert fake.first_scale.item() > 10 * fake.scale.item()
    fake.freeze(shared_first_scale=True)
    assert fake.first_scale.item() == fake.scale.item()


def test_two_sink_positions_stay_live_then_share_position_zeros_scale():
    """With `first_positions=2` the token after BOS is a sink too: left out of the other
    positions' average, real until "first" is frozen, then divided by position 0's scale."""
    loaded = load_model("tiny-llama")
    site = norm_sites(loaded)[0]
    real = get_module(loaded.model, site.path)
    fake = RemovableNorm(real, site, momentum=None, first_positions=2)
    fake.tracking = True
    # Position 1 is massive in one window only, as SmolLM2's sometimes is.
    x = torch.randn(2, 5, loaded.d_model, generator=torch.Generator().manual_seed(5))
    x = x * torch.tensor([[30.0, 1, 1, 1, 1], [30.0, 25, 1, 1, 1]])[..., None]
    fake(x)
    true = token_scale(x, site.kind, site.eps)
    fake.freeze(shared_first_scale=False, part="all")
    assert fake.scale.item() == pytest.approx(true[:, 2:].mean().item(), rel=1e-6)
    assert fake.first_scale.item() == pytest.approx(true[:, 0].mean().item(), rel=1e-6)
    fake.tracking = False
    got = fake(x)
    torch.testing.assert_close(got[:, :2], real(x)[:, :2], rtol=0, atol=0)
    fake.freeze(shared_first_scale=False, part="first")
    weight = real.weight + site.weight_offset
    expected = x / torch.tensor([fake.first_scale.item()] * 2 + [fake.scale.item()] * 3)[:, None] * weight
    torch.testing.assert_close(fake(x), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm_forward(fake, x.double(), site.weight_offset), expected.double(),
                               rtol=1e-6, atol=1e-6)


def test_the_scale_guard_penalises_only_tokens_past_the_sink_positions_far_above_the_average():
    from layerscope.probes.norms import guarding

    loaded = load_model("tiny-llama")
    site = norm_sites(loaded)[0]
    real = get_module(loaded.model, site.path)
    fake = RemovableNorm(real, site, momentum=None, first_positions=2)
    fake.average.copy_(torch.tensor([50.0, 2.0, 3.0], dtype=torch.float64))
    fake.updates.fill_(1)
    # Per-token scales (RMS, as eps is negligible): 40 and 30 at the sink positions, then 1, 2, 60, 8.
    rms = torch.tensor([40.0, 30.0, 1.0, 2.0, 60.0, 8.0])
    unit = torch.ones(1, 6, loaded.d_model)
    x = (unit * rms[:, None]).requires_grad_(True)
    with guarding({"n": fake}, ratio=3.0) as terms:
        fake(x)
    assert len(terms) == 1
    # The limit is 3 x 2 = 6: tokens 60 and 8 are past it, the sink positions are not counted.
    expected = (math.log(60 / 6) ** 2 + math.log(8 / 6) ** 2) / 4
    assert terms[0].item() == pytest.approx(expected, rel=1e-5)
    terms[0].backward()
    assert x.grad[0, :4].abs().max() == 0 and x.grad[0, 4].abs().max() > 0
    assert fake.guard is None, "the guard is off outside the block"


def test_sink_positions_are_saved_with_the_norm_free_model(tmp_path):
    config = replace(FAST, sink_positions=2)
    loaded, result = _removed("llama", config)
    frozen = [m for m in loaded.model.modules() if isinstance(m, FrozenNorm)]
    assert frozen and all(m.first_positions == 2 and not m.live for m in frozen)
    saved = save_norm_free(loaded, tmp_path / "norm-free", {})
    entries = json.loads((saved / FROZEN_NORMS_FILE).read_text())["norms"]
    assert {e["first_positions"] for e in entries} == {2}
    reloaded = load_model(str(saved))
    ids = torch.randint(0, loaded.tokenizer.vocab_size if hasattr(loaded.tokenizer, "vocab_size") else 100,
                        (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(ids).logits, loaded.model(ids).logits)
    # A file from before sink positions gave position 0 alone its own scale.
    for entry in entries:
        del entry["first_positions"]
    (saved / FROZEN_NORMS_FILE).write_text(json.dumps({"format": 1, "norms": entries}))
    assert {m.first_positions for m in load_model(str(saved)).model.modules() if isinstance(m, FrozenNorm)} == {1}


def test_schedule_removes_pre_mlp_then_query_key_then_value_paths_then_final_then_position_zero():
    loaded = load_model("tiny-llama")
    sites = norm_sites(loaded)
    split = value_split_roles(loaded, sites)
    assert split == {f"ln1[{l}]" for l in range(4)}
    config = RemovalConfig(steps=60, start=3, gap_mlp=2, gap_attn=3, gap_v=4, gap_final=5)
    events = removal_schedule(sites, config, split=split)
    assert [(e.role, e.part) for e in events] == [
        *((f"ln2[{l}]", "all") for l in range(4)), *((f"ln1[{l}]", "qk") for l in range(4)),
        *((f"ln1[{l}]", "v") for l in range(4)), ("final_norm", "all"), ("*", "first")]
    assert [e.step for e in events] == [3, 5, 7, 9, 12, 15, 18, 21, 25, 29, 33, 37, 42, 47]
    unsplit = removal_schedule(sites, config)
    assert [(e.role, e.part) for e in unsplit][4:9] == [*((f"ln1[{l}]", "all") for l in range(4)), ("final_norm", "all")]
    with pytest.raises(UserError, match="removes its last norm .* at step 42 and fixes position 0's scale at step 47, "
                                        "but the budget is 47 steps"):
        removal_schedule(sites, RemovalConfig(**{**config.__dict__, "steps": 47}), split=split)
    # The sensitivity order: block norms least sensitive first, each value path right after its q/k path.
    order = ["ln1[2]", "ln2[3]", "ln2[0]", "ln1[0]", "ln2[1]", "ln1[1]", "ln2[2]", "ln1[3]"]
    ordered = removal_schedule(sites, config, order, split)
    assert [(e.role, e.part) for e in ordered][:5] == [("ln1[2]", "qk"), ("ln1[2]", "v"), ("ln2[3]", "all"),
                                                      ("ln2[0]", "all"), ("ln1[0]", "qk")]
    assert [e.step for e in ordered][:3] == [3, 7, 9]


def test_bert_post_ln_norms_include_embedding_and_head_norms():
    loaded = load_model("tiny-bert")
    roles = [s.role for s in norm_sites(loaded)]
    assert roles[:4] == [f"ln2[{l}]" for l in range(4)] and roles[4:8] == [f"ln1[{l}]" for l in range(4)]
    assert set(roles[8:]) == {"other:bert.embeddings.LayerNorm", "other:cls.predictions.transform.LayerNorm"}


def _scales_with_its_input(module, x) -> bool:
    """Tripling the input triples the output (less any bias): no division by the input's own scale."""
    bias = module.bias if getattr(module, "bias", None) is not None else torch.zeros(())
    with torch.no_grad():
        return torch.allclose(module(3 * x) - bias, 3 * (module(x) - bias), rtol=1e-5, atol=1e-5)


def _assert_norm_free(loaded):
    assert not any(is_real_norm(m) for m in loaded.model.modules()), "a norm still divides by a data-dependent scale"
    frozen = [m for m in loaded.model.modules() if isinstance(m, FrozenNorm)]
    assert frozen and all(not getattr(m, "live", False) for m in frozen)
    x = torch.randn(2, 7, loaded.d_model)
    for module in frozen:
        assert _scales_with_its_input(module, x)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_after_the_schedule_no_norm_divides_by_a_data_dependent_scale(family, tmp_path):
    original = load_model(f"tiny-{family}")
    x = torch.randn(2, 7, original.d_model)
    # The check can fail: a real norm's output does not follow its input's scale.
    assert not any(_scales_with_its_input(get_module(original.model, s.path), x) for s in norm_sites(original))
    loaded, result = _removed(family)
    roles = [s.role for s in norm_sites(original)]
    assert sorted(s["role"] for s in result.scales) == sorted(roles)
    assert {e.role for e in result.events} == {*roles, "*"} and result.events[-1].part == "first"
    assert result.history["removed"][-1] == len(roles)
    _assert_norm_free(loaded)
    # The saved directory loads through the zoo with the same frozen norms and outputs.
    saved = save_norm_free(loaded, tmp_path / "norm-free", {"base_model": f"tiny-{family}"})
    assert (saved / FROZEN_NORMS_FILE).exists()
    reloaded = load_model(str(saved))
    _assert_norm_free(reloaded)
    ids = torch.randint(0, 256, (2, 16))
    ids[:, 0] = 256
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(input_ids=ids).logits, loaded.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert str(saved / FROZEN_NORMS_FILE) in map(str, reloaded.weights_files)


# The sensitivity order as `remove_norms` would pass it, value paths and all.
ORDER = ["ln1[2]", "ln2[3]", "ln2[0]", "ln1[0]", "ln2[1]", "ln1[1]", "ln2[2]", "ln1[3]"]


@pytest.mark.parametrize("order", ["fixed", "sensitivity"])
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, order):
    # Distillation, the q/k then v split, position 0 fixed last and the per-removal curve all on.
    config = RemovalConfig(steps=18, start=1, gap_mlp=1, gap_attn=1, gap_v=1, gap_final=1, lr=1e-3, lr_warmup=3,
                           aux_weight=0.1, order=order, loss="distill", ce_weight=0.5, curve_tokens=64)
    ranked = ORDER if order == "sensitivity" else None
    whole, whole_result = _removed("llama", config, checkpoint=tmp_path / "a.pt", checkpoint_every=4, order=ranked)
    assert whole_result.loss == "distill" and {e.part for e in whole_result.events} == {"all", "qk", "v", "first"}
    assert [(e.role, e.part) for e in whole_result.events][:2] == (
        [("ln1[2]", "qk"), ("ln1[2]", "v")] if ranked else [("ln2[0]", "all"), ("ln2[1]", "all")])

    def interrupt(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _removed("llama", config, checkpoint=tmp_path / "b.pt", checkpoint_every=4, on_step=interrupt,
                 order=ranked)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 4
    with pytest.raises(UserError, match="already holds a checkpoint"):
        _removed("llama", config, checkpoint=tmp_path / "b.pt", order=ranked)
    resumed, resumed_result = _removed("llama", config, checkpoint=tmp_path / "b.pt", checkpoint_every=4,
                                       resume=True, order=ranked)
    assert resumed_result.resumed_from == 4
    # Steps 4 and 5 ran twice (before the interruption and after the resume); the history holds them once.
    assert resumed_result.history == whole_result.history
    assert resumed_result.curve == whole_result.curve and len(whole_result.curve) == len(
        {e.step for e in whole_result.events})
    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed_result.eval_after == whole_result.eval_after


def test_resume_with_other_settings_is_refused(tmp_path):
    _removed("llama", checkpoint=tmp_path / "c.pt", checkpoint_every=4)
    with pytest.raises(UserError, match=r"settings differ from the checkpoint's \(steps\)"):
        _removed("llama", RemovalConfig(**{**FAST.__dict__, "steps": FAST.steps + 4}), checkpoint=tmp_path / "c.pt",
                 resume=True)


def test_a_stopped_run_resumes_with_a_lower_learning_rate(tmp_path):
    """What the non-finite-loss message advises: lower --lr and --resume.  The new rate
    applies from the resumed step on."""
    def interrupt(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _removed("llama", checkpoint=tmp_path / "c.pt", checkpoint_every=4, on_step=interrupt)
    lower = replace(FAST, lr=FAST.lr / 2)
    _, result = _removed("llama", lower, checkpoint=tmp_path / "c.pt", resume=True)
    assert result.resumed_from == 4
    rates = dict(zip(result.history["step"], result.history["lr"]))
    assert rates[3] == pytest.approx(learning_rate(3, FAST))
    assert rates[5] == pytest.approx(learning_rate(5, lower)) and learning_rate(5, lower) < learning_rate(5, FAST)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def corrupt(step):
        if step == 4:
            with torch.no_grad():
                next(loaded.model.parameters()).fill_(float("nan"))

    loaded = load_model("tiny-llama")
    train, evaluation = SMALL_DATA.windows(loaded)
    with pytest.raises(LossNotFinite, match=r"loss is nan at step 5: stopped; the last good checkpoint, "
                                            r"with 5 steps done, is kept in"):
        fine_tune(loaded, train, evaluation, FAST, checkpoint=tmp_path / "n.pt", checkpoint_every=5,
                  on_step=corrupt)
    state = load_checkpoint(tmp_path / "n.pt")
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())


def test_a_non_finite_batch_is_skipped_without_a_step_and_leaves_the_scale_averages_alone(tmp_path):
    """With `max_skipped`, a batch whose forward overflows is dropped: no optimizer step, no
    history row, and the running scale averages it touched are put back, so the norms frozen
    after it get finite scales.  Without it the same batch stops the run."""
    poisoned, at = 3, {"step": 0}

    def overflow(module, args, output):
        return output * float("inf") if at["step"] == poisoned else None

    def advance(step):
        at["step"] = step + 1

    loaded = load_model("tiny-llama")
    loaded.model.get_input_embeddings().register_forward_hook(overflow)
    train, evaluation = SMALL_DATA.windows(loaded)
    with pytest.raises(LossNotFinite, match=r"loss is nan at step 3: stopped"):
        fine_tune(copy.deepcopy(loaded), train, evaluation, FAST, on_step=advance)
    at["step"] = 0
    result = fine_tune(loaded, train, evaluation, replace(FAST, max_skipped=1), on_step=advance,
                       checkpoint=tmp_path / "s.pt", checkpoint_every=4)
    assert result.skipped == [poisoned]
    assert result.history["step"] == [s for s in range(FAST.steps) if s != poisoned]
    later = {e.role for e in result.events if e.step > poisoned}
    assert later and all(math.isfinite(s["scale"]) and math.isfinite(s["first_scale"])
                         for s in result.scales if s["role"] in later)
    assert math.isfinite(result.eval_after)
    assert load_checkpoint(tmp_path / "s.pt")["skipped"] == [poisoned]


@pytest.fixture(scope="module")
def trained_llama():
    """tiny-llama made a language model of the default corpus by a short fine-tune, so its
    norms carry something; with its train and evaluation windows."""
    loaded = load_model("tiny-llama")
    data = RemovalData(seq_len=64, batch_size=8, train_tokens=32768, eval_tokens=4096)
    train, evaluation = data.windows(loaded)
    trained = fine_tune(loaded, train, evaluation, RemovalConfig(steps=150, lr=3e-3, lr_warmup=10), remove=False)
    assert trained.eval_after < trained.eval_before - 2
    return loaded, train, evaluation, trained.eval_after


def _copy(loaded):
    work = copy.copy(loaded)
    work.model = copy.deepcopy(loaded.model)
    return work


def test_fine_tuning_beats_removal_without_fine_tuning(trained_llama):
    loaded, train, evaluation, trained_ce = trained_llama
    loaded = _copy(loaded)
    config = RemovalConfig(steps=25, start=2, gap_mlp=1, gap_attn=1, gap_v=1, gap_final=1, lr=1e-3, lr_warmup=2)
    without, _ = remove_without_finetuning(loaded, train, evaluation, config)
    assert not any(isinstance(m, FrozenNorm) for m in loaded.model.modules()), "the control leaves the model as it was"
    removed = fine_tune(loaded, train, evaluation, config)
    assert removed.eval_before == pytest.approx(trained_ce, abs=1e-6)
    assert without > trained_ce + 0.05, "freezing every norm at once costs loss"
    assert removed.eval_after < without


def test_distillation_ends_lower_than_cross_entropy_at_the_same_budget(trained_llama):
    loaded, train, evaluation, trained_ce = trained_llama
    config = RemovalConfig(steps=25, start=2, gap_mlp=1, gap_attn=1, gap_v=1, gap_final=1, lr=3e-4, lr_warmup=2,
                           curve_tokens=0)
    ends = {}
    for loss in ("ce", "distill"):
        result = fine_tune(_copy(loaded), train, evaluation, replace(config, loss=loss), teacher=loaded.model)
        assert result.loss == loss and len(result.history["step"]) == config.steps
        ends[loss] = result.eval_after
    # Same steps, same batches: the same tokens.  The distilled run learns the original's
    # whole next-token distribution besides the sampled token (the default --ce-weight 1;
    # the tiny teacher is under-trained, so cross-entropy alone also keeps improving it).
    assert ends["distill"] < ends["ce"] - 0.01, ends
    # The vanilla control trains on cross-entropy whatever --loss says.
    control = fine_tune(_copy(loaded), train, evaluation, replace(config, loss="distill", steps=2), remove=False)
    assert control.loss == "ce"


# ---------------------------------------------------------------- CLI

def _cli(capsys, *argv):
    code = main(["ln-removal", *argv])
    out, err = capsys.readouterr()
    return code, out, err


TINY_ARGS = ["--seq-len", "32", "--batch-size", "4", "--train-tokens", "1024", "--eval-tokens", "256",
             "--start", "1", "--gap-mlp", "1", "--gap-attn", "1", "--gap-v", "1", "--gap-final", "1"]


def test_cli_run_saves_a_loadable_model_and_a_run(capsys, tmp_path):
    runs = tmp_path / "runs"
    code, out, err = _cli(capsys, "--model", "tiny-gpt2", *TINY_ARGS, "--steps", "16", "--runs-dir", str(runs),
                          "--checkpoint-every", "4", "--format", "json")
    assert code == 0, err
    payload = json.loads(out)
    models = [row["model"] for row in payload["eval"]]
    assert models == ["original", "removed, no fine-tune", "vanilla fine-tune", "norm-free"]
    _assert_norm_free(load_model(payload["norm_free_model"]))
    # The model and checkpoints go beside the run store, never inside it.
    assert payload["norm_free_model"] == str(tmp_path / "ln-removal" / "tiny-gpt2-norm-free")
    assert payload["checkpoint_dir"] == str(tmp_path / "ln-removal" / "tiny-gpt2")
    assert sorted(p.name for p in (tmp_path / "ln-removal" / "tiny-gpt2").iterdir()) == ["control.pt", "removal.pt"]
    from layerscope.analysis.store import list_runs, load_run

    assert [p.name for p in runs.iterdir()] == [payload["run"].split("/")[-1]]
    assert [(r["metric"], r["status"]) for r in list_runs(runs)] == [("ln-removal", "complete")]
    manifest, tables = load_run(payload["run"].split("/")[-1], runs)
    assert manifest["metric"] == "ln-removal" and manifest["status"] == "complete"
    assert manifest["norm_free_model"] == payload["norm_free_model"]
    assert set(tables) == {"ln_removal_eval", "ln_removal_loss", "ln_removal_schedule", "ln_removal_curve"}
    # One curve row per removal step, each measured before and after its freeze.
    assert tables["ln_removal_curve"]["step"].tolist() == sorted(set(tables["ln_removal_schedule"]["step"]))
    loss = tables["ln_removal_loss"]
    assert (loss.groupby("run").size() == 16).all()
    assert tables["ln_removal_schedule"]["role"].tolist()[-2:] == ["final_norm", "*"]
    # Without --resume an existing checkpoint is not overwritten.
    code, _, err = _cli(capsys, "--model", "tiny-gpt2", *TINY_ARGS, "--steps", "16", "--runs-dir", str(runs))
    assert code == 2 and "already holds checkpoints" in err


@pytest.mark.parametrize("extra, message", [
    (["--steps", "5"], "removes its last norm (final_norm) at step 13 and fixes position 0's scale at step 14, "
                       "but the budget is 5 steps"),
    (["--steps", "16", "--resume"], "--resume: no checkpoint in"),
    (["--steps", "16", "--lr", "1e38", "--grad-clip", "0", "--checkpoint-every", "1"], "at step 1: stopped; the last good checkpoint, with 1 steps done"),
])
def test_cli_bad_input_is_one_line(capsys, tmp_path, extra, message):
    code, _, err = _cli(capsys, "--model", "tiny-llama", *TINY_ARGS, "--runs-dir", str(tmp_path / "runs"), *extra)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_cli_refuses_a_model_without_norms_and_a_resume_for_another_model(capsys, tmp_path):
    runs = str(tmp_path / "runs")
    code, _, err = _cli(capsys, "--model", "tiny-llama", *TINY_ARGS, "--steps", "16", "--runs-dir", runs,
                        "--no-control", "--no-save")
    assert code == 0, err
    norm_free = tmp_path / "ln-removal" / "tiny-llama-norm-free"
    code, _, err = _cli(capsys, "--model", str(norm_free), *TINY_ARGS, "--runs-dir", runs)
    assert code == 2 and "has no norm that divides by a data-dependent scale" in err and err.count("\n") == 1
    code, _, err = _cli(capsys, "--model", "tiny-qwen2", *TINY_ARGS, "--steps", "16", "--runs-dir", runs,
                        "--checkpoint-dir", str(tmp_path / "ln-removal" / "tiny-llama"), "--resume")
    assert code == 2 and "is a run for model 'tiny-llama', not 'tiny-qwen2'" in err and err.count("\n") == 1


def test_tables_flag_a_non_finite_control_and_summarize_against_vanilla():
    from layerscope.analysis.ln_removal import ln_removal_tables, loss_curve_figure, summarize
    from layerscope.probes.ln_removal import FineTuneResult, RemovalEvent

    history = {"step": [0, 1], "loss": [3.0, 2.5], "ce": [3.0, 2.5], "aux": [0.0, 0.0], "guard": [0.0, 0.0], "lr": [1e-4, 1e-4], "grad_norm": [1.0, 1.0]}
    removal = FineTuneResult(True, {**history, "removed": [0, 1]}, [RemovalEvent(1, "final_norm", "model.norm")],
                             [{"role": "final_norm", "scale": 2.0, "first_scale": 9.0}], 3.3, 3.5, 1.0, None)
    control = FineTuneResult(False, {**history, "removed": [0, 0]}, [], [], 3.3, 3.0, 1.0, None)
    tables = ln_removal_tables(removal, control, float("nan"))
    evals = tables["ln_removal_eval"].set_index("model")
    assert evals.loc["norm-free", "delta_vs_vanilla"] == pytest.approx(0.5)
    assert evals.loc["removed, no fine-tune", "note"].startswith("loss not finite")
    assert evals.loc["norm-free", "note"] == ""
    assert tables["ln_removal_schedule"].iloc[0].to_dict() == {"step": 1, "role": "final_norm", "part": "all", "path": "model.norm",
                                                                "scale": 2.0, "first_scale": 9.0}
    assert "norm-free - vanilla +0.5000" in summarize(tables)[0]
    assert len(loss_curve_figure(tables["ln_removal_loss"], tables["ln_removal_schedule"]).data) == 4
