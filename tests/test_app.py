"""The Streamlit app under AppTest: every page on a tiny model, reopening stored runs,
the compare view, and bad input shown as a readable error."""

import base64
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest
from streamlit.util import calc_hash

import layerscope.analysis.store as store_module
import layerscope.app
import layerscope.app.ui
from layerscope.analysis.plots import shown_token
from layerscope.analysis.registry import METRICS
from layerscope.analysis.store import list_runs, load_run
from layerscope.app.cli import main
from layerscope.app.ui import OTHER_MODEL
from layerscope.app.workbench import MAX_TEXT_CHARS

APP = Path(layerscope.app.__file__).with_name("streamlit_app.py")
TEXT = "The residual stream carries each token through the blocks; some blocks barely change it."
TIMEOUT = 120


@pytest.fixture(autouse=True)
def store(tmp_path, monkeypatch):
    """Each test gets its own run store, and may read only its own temporary folder."""
    monkeypatch.setenv("LAYERSCOPE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("LAYERSCOPE_ALLOWED_DIRS", str(tmp_path))
    return tmp_path / "runs"


def open_app(page: str | None = None, **state) -> AppTest:
    """A fresh session on `page`: a measurement name, or a page file such as page_runs.py."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    for key, value in {"model_choice": "tiny-llama", "corpus_kind": "text", "corpus_text": TEXT, **state}.items():
        at.session_state[key] = value
    at.run()
    if page in METRICS:
        # AppTest.switch_page takes page files only; the measurement pages are callables
        # built from the registry, which Streamlit addresses by the hash of their url path.
        at._page_hash = calc_hash(page)
        at.run()
    elif page:
        at.switch_page(page).run()
    return at


def charts(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_overview_shows_the_model_card():
    at = open_app()
    assert_clean(at)
    shown = {m.label: m.value for m in at.metric}
    assert shown == {"family": "llama", "layers": "4", "d_model": "64", "heads (KV)": "4 (2)", "parameters": "181,312"}
    assert "random llama built from a config with seed 0" in at.markdown[0].value
    assert set(at.dataframe[1].value["measurement"]) == set(METRICS)


def _token_texts(tables) -> set[str]:
    return {value for table in tables.values() for column in table.columns if "token" in column
            for value in table[column] if isinstance(value, str) and value.strip()}


def _flat_strings(value) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, (list, tuple)):
        return set().union(*map(_flat_strings, value)) if value else set()
    return set()


def _shows_a_token(tokens: set[str], hover: set[str]) -> bool:
    # Byte-level tokens are often one character, so a bare substring proves nothing:
    # a token must be a whole label, or appear quoted (as its repr, or as the figures
    # quote it, with whitespace made visible).
    return any(token in hover or any(repr(token) in label or shown_token(token) in label for label in hover)
               for token in tokens)


def _hover_strings(chart: dict) -> set[str]:
    """The text a trace can show on hover: its custom data, texts, and category axes."""
    fields = ("customdata", "text", "hovertext", "x", "y")
    return set().union(*(_flat_strings(trace.get(field)) for trace in chart["data"] for field in fields))


# Measurements whose default settings do not apply to a 4-layer random model: their page
# must say so in one readable error.  If one of them starts to run here, this test fails
# so that it moves back to the strict case.
REFUSE_TINY_DEFAULTS: dict[str, str] = {}


# Measurements whose tables name tokens but whose figures do not show them on hover yet;
# asserted both ways, like REFUSE_TINY_DEFAULTS.
HOVER_WITHOUT_TOKENS = {"super-weights"}


@pytest.mark.parametrize("name", list(METRICS))
def test_every_measurement_page_runs_and_reopens_from_the_store(name, store):
    at = open_app(name)
    assert_clean(at)
    assert [b.label for b in at.button] == ["Run"] and not charts(at)
    at.button(key=f"{name}.run").click().run()
    if name in REFUSE_TINY_DEFAULTS:
        assert not at.exception and len(at.error) == 1, [e.value for e in (*at.exception, *at.error)]
        assert REFUSE_TINY_DEFAULTS[name] in at.error[0].value
        assert list_runs(store) == [], "a refused measurement leaves no run behind"
        return
    assert_clean(at)
    [run] = list_runs(store)
    manifest, tables = load_run(run["run_id"], store)
    drawn = charts(at)
    assert len(drawn) == len(METRICS[name].figures(tables)) + len(METRICS[name].views_for(tables)) >= 1
    assert len(at.dataframe) == len(METRICS[name].display(tables))
    # Hover: where a table names tokens, the figures carry that text for the hover labels.
    tokens = _token_texts(tables)
    if tokens:
        shows_tokens = any(_shows_a_token(tokens, _hover_strings(chart)) for chart in drawn)
        assert shows_tokens != (name in HOVER_WITHOUT_TOKENS), (
            "no figure shows the token text on hover" if not shows_tokens else
            f"{name} now shows token text on hover: remove it from HOVER_WITHOUT_TOKENS")

    reopened = open_app(name)
    assert_clean(reopened)
    assert [b.label for b in reopened.button] == ["Run again"]
    assert charts(reopened) == drawn
    assert run["run_id"] in reopened.caption[-1].value
    assert len(list_runs(store)) == 1, "reopening must not measure again"


def test_other_settings_are_a_different_run():
    at = open_app("residual-stats")
    at.button(key="residual-stats.run").click().run()
    at.sidebar.text_area(key="corpus_text").input(TEXT + " One more sentence.").run()
    assert_clean(at)
    assert [b.label for b in at.button] == ["Run"] and not charts(at)


def test_runs_page_lists_and_draws_a_stored_run(store):
    open_app("residual-stats").button(key="residual-stats.run").click().run()
    at = open_app("page_runs.py")
    assert_clean(at)
    assert list(at.dataframe[0].value["status"]) == ["complete"]
    assert len(charts(at)) == 1
    assert at.get("download_button")


def test_compare_overlays_two_models_and_draws_their_difference(store):
    for model in ("tiny-llama", "tiny-gpt2"):
        open_app("residual-stats", model_choice=model).button(key="residual-stats.run").click().run()
    at = open_app("page_compare.py")
    assert_clean(at)
    overlaid, diff = charts(at)
    names = [trace["name"] for trace in overlaid["data"]]
    assert any(n.endswith("· tiny-llama") for n in names) and any(n.endswith("· tiny-gpt2") for n in names)

    # The difference view: the second run's column minus the first's, layer by layer.
    first_id = at.selectbox(key="compare_first").value
    runs = (first_id, at.selectbox(key=f"compare_second.{first_id}").value)
    first, second = (load_run(run_id, store)[1]["residual_stats"] for run_id in runs)
    table = at.selectbox(key="compare.diff.residual-stats.table")
    column = at.selectbox(key="compare.diff.residual-stats.residual_stats.column")
    assert (table.value, column.value) == ("residual_stats", "mean_norm")

    def expected(col):
        joined = first.merge(second, on=["point", "layer"])
        return joined[joined["point"] == "resid_post"].set_index("layer")[f"{col}_y"] - \
            joined[joined["point"] == "resid_post"].set_index("layer")[f"{col}_x"]

    post = next(trace for trace in diff["data"] if trace["name"] == "resid_post")
    np.testing.assert_allclose(_array(post["y"]), expected("mean_norm").loc[_array(post["x"])].to_numpy(), rtol=1e-12)
    assert "minus" in diff["layout"]["title"]["text"]
    column.select("max_abs").run()
    assert_clean(at)
    post = next(trace for trace in charts(at)[1]["data"] if trace["name"] == "resid_post")
    np.testing.assert_allclose(_array(post["y"]), expected("max_abs").loc[_array(post["x"])].to_numpy(), rtol=1e-12)
    assert at.dataframe[-1].value.columns[:2].tolist() == ["point", "layer"]


def test_long_tables_show_their_first_rows_and_say_how_to_get_the_rest(store, monkeypatch):
    monkeypatch.setattr(layerscope.app.ui, "MAX_SHOWN_ROWS", 3)
    at = open_app("residual-stats")
    at.button(key="residual-stats.run").click().run()
    assert_clean(at)
    [run] = list_runs(store)
    _, tables = load_run(run["run_id"], store)
    shown = METRICS["residual-stats"].display(tables)
    assert [len(frame.value) for frame in at.dataframe] == [min(3, len(table)) for table in shown.values()]
    pd.testing.assert_frame_equal(at.dataframe[0].value.reset_index(drop=True),
                                  next(iter(shown.values())).head(3).reset_index(drop=True))
    long_tables = sum(len(table) > 3 for table in shown.values())
    assert long_tables >= 1
    exports = [c.value for c in at.caption if f"layerscope runs export {run['run_id']}" in c.value]
    assert len(exports) == long_tables


def test_compare_pairs_the_newest_run_with_one_that_shares_its_measurement(store, monkeypatch):
    # Newest first: residual-stats on tiny-gpt2, block-influence, residual-stats on tiny-llama.
    # All three ids carry one second's stamp, as on a fast machine, so that their names'
    # order (block-influence first) differs from their creation order.
    monkeypatch.setattr(store_module.time, "strftime", lambda pattern: "20260101-000000")
    for page, model in (("residual-stats", "tiny-llama"), ("block-influence", "tiny-llama"),
                        ("residual-stats", "tiny-gpt2")):
        open_app(page, model_choice=model).button(key=f"{page}.run").click().run()
    at = open_app("page_compare.py")
    assert_clean(at)
    first = at.selectbox(key="compare_first").value
    second = at.selectbox(key=f"compare_second.{first}").value
    assert [load_run(run_id, store)[0]["metric"] for run_id in (first, second)] == ["residual-stats"] * 2
    assert not at.warning
    assert len(charts(at)) == 2  # the overlay and the difference


def test_compare_asks_for_two_runs():
    at = open_app("page_compare.py")
    assert_clean(at)
    assert "needs two complete runs" in at.info[0].value


@pytest.mark.parametrize("state, message, pages", [
    ({"corpus_text": ""}, "the text is empty", ["block-influence"]),
    ({"corpus_text": "x" * (MAX_TEXT_CHARS + 1)}, f"over the cap of {MAX_TEXT_CHARS:,}", ["block-influence"]),
    ({"model_choice": OTHER_MODEL, "model_path": "/no/such/model"}, "outside the folders this app may read",
     ["block-influence", None]),
    ({"model_choice": OTHER_MODEL, "model_path": "no-such-model"}, "unknown model 'no-such-model'", [None]),
])
def test_bad_input_is_a_readable_error(state, message, pages):
    for page in pages:
        at = open_app(page, **state)
        assert not at.exception
        assert len(at.error) == 1 and message in at.error[0].value, [e.value for e in at.error]


def test_a_missing_model_folder_inside_the_allowed_ones_is_a_readable_error(tmp_path):
    at = open_app(model_choice=OTHER_MODEL, model_path=str(tmp_path / "missing-model"))
    assert not at.exception
    assert "does not exist" in at.error[0].value


def test_a_model_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path):
    folder = tmp_path / "custom-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.Custom"}}))
    marker = folder / "RAN"
    for module in ("configuration_custom.py", "modeling_custom.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    at = open_app(model_choice=OTHER_MODEL, model_path=str(folder))
    assert not at.exception
    assert "never runs code shipped with a model" in at.error[0].value
    assert not marker.exists()


def test_a_corrupted_run_folder_is_a_readable_error(store):
    open_app("residual-stats").button(key="residual-stats.run").click().run()
    [run] = list_runs(store)
    (Path(run["path"]) / "residual_stats.parquet").write_bytes(b"PAR1 damaged")
    at = open_app("residual-stats")
    assert not at.exception
    assert "is corrupt" in at.error[0].value and [b.label for b in at.button] == ["Run again"]
    (Path(run["path"]) / "manifest.json").write_text("{")
    at = open_app("page_runs.py")
    assert not at.exception
    assert list(at.dataframe[0].value["status"]) == ["corrupt"]
    assert "is corrupt" in at.error[0].value


def test_app_command_refuses_a_missing_allowed_folder(capsys):
    assert main(["app", "--allow-dir", "/no/such/folder"]) == 2
    assert "--allow-dir folder(s) not found: /no/such/folder" in capsys.readouterr().err


def test_options_survive_a_visit_to_another_page_and_find_their_run(store):
    flag = next(f.name for f in fields(METRICS["block-influence"].options) if f.default is False)
    at = open_app("block-influence")
    at.checkbox(key=f"block-influence.{flag}").check().run()
    at.button(key="block-influence.run").click().run()
    assert_clean(at)
    at.switch_page("page_runs.py").run()
    at._page_hash = calc_hash("block-influence")
    at.run()
    assert at.checkbox(key=f"block-influence.{flag}").value is True
    assert [b.label for b in at.button] == ["Run again"]


def test_an_emptied_number_option_is_a_readable_error():
    metric = next(m for m in METRICS.values() for f in fields(m.options) if f.type in ("int", int))
    name = next(f.name for f in fields(metric.options) if f.type in ("int", int))
    at = open_app(metric.name)
    at.number_input(key=f"{metric.name}.{name}").set_value(None).run()
    assert not at.exception
    assert f"option '{name.replace('_', ' ')}' needs a number" in at.error[0].value
    assert options_expander(at).proto.expanded, "the option at fault stays in view"


def options_expander(at: AppTest):
    [expander] = [e for e in at.expander if e.label == "options"]
    return expander


def test_options_fold_away_once_a_run_is_shown_and_the_figures_come_first(store):
    at = open_app("block-influence")
    assert options_expander(at).proto.expanded and not charts(at)
    at.button(key="block-influence.run").click().run()
    assert_clean(at)
    assert not options_expander(at).proto.expanded and charts(at)
    # Another setting has no run yet: the options open again, for the user to run it.
    flag = next(f.name for f in fields(METRICS["block-influence"].options) if f.default is False)
    at.checkbox(key=f"block-influence.{flag}").check().run()
    assert options_expander(at).proto.expanded and not charts(at)
    reopened = open_app("block-influence")
    assert not options_expander(reopened).proto.expanded and charts(reopened)


def _in_page_order(node) -> list:
    """Headings, charts and expanders of a page in the order they are drawn."""
    found = []
    for child in node.children.values():
        if child.type in ("subheader", "plotly_chart"):
            found.append((child.type, getattr(child, "value", None)))
        elif child.type == "expander":
            found.append(("expander", child.label))
        if getattr(child, "children", None) and child.type != "expander":
            found.extend(_in_page_order(child))
    return found


def test_a_surveys_tables_sit_under_their_own_measurements_figures(store):
    names = ["block-influence", "layer-skip", "logit-lens"]
    assert main(["survey", "--model", "tiny-llama", "--corpus", f"text:{TEXT}", "--metrics", ",".join(names),
                 "--runs-dir", str(store)]) == 0
    [run] = list_runs(store)
    manifest, _ = load_run(run["run_id"], store)
    at = open_app("page_runs.py")
    assert_clean(at)
    order = _in_page_order(at.main)
    headings = [i for i, (kind, value) in enumerate(order) if kind == "subheader" and value in names]
    assert [order[i][1] for i in headings] == names
    for number, name in enumerate(names):
        start, end = headings[number], headings[number + 1] if number + 1 < len(headings) else len(order)
        section = order[start:end]
        tables = [label.split()[1] for kind, label in section if kind == "expander" and label.startswith("table: ")]
        assert tables and set(tables) <= set(manifest["tables_by_metric"][name]), (name, tables)
        first_table = next(i for i, (kind, label) in enumerate(section) if kind == "expander")
        assert any(kind == "plotly_chart" for kind, _ in section[:first_table]), f"{name}'s figure comes first"


def test_typed_text_comes_back_after_choosing_another_corpus():
    at = open_app()
    at.sidebar.text_area(key="corpus_text").input("my own text about layers").run()
    at.sidebar.radio(key="corpus_kind").set_value("stdlib").run()
    assert not at.sidebar.text_area
    at.sidebar.radio(key="corpus_kind").set_value("text").run()
    assert at.sidebar.text_area(key="corpus_text").value == "my own text about layers"


def _run_page(name: str, store, **state) -> tuple[AppTest, dict]:
    at = open_app(name, **state)
    at.button(key=f"{name}.run").click().run()
    assert_clean(at)
    [run] = list_runs(store)
    return at, load_run(run["run_id"], store)[1]


def _view_select(at: AppTest, control: str):
    return next(box for box in at.selectbox if box.key.endswith(f".{control}"))


def _array(value) -> np.ndarray:
    """A chart's data array as plotly writes it: a list, or a typed array in base64."""
    if isinstance(value, dict) and "bdata" in value:
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        shape = [int(n) for n in str(value.get("shape", len(flat))).split(",")]
        return flat.reshape(shape)
    return np.asarray(value)


def _title(chart: dict) -> str:
    return chart["layout"]["title"]["text"]


def test_sinks_page_picks_the_heaviest_sink_head_and_draws_another_on_request(store):
    at, tables = _run_page("sinks", store)
    heads = tables["sink_heads"]
    heaviest = heads.loc[heads["alpha_0"].idxmax()]
    layer, head = _view_select(at, "layer"), _view_select(at, "head")
    assert (layer.value, head.value) == (heaviest["layer"], heaviest["head"])
    other = (int(heaviest["head"]) + 1) % 4
    head.select(other).run()
    assert_clean(at)
    pattern = next(c for c in charts(at) if _title(c).startswith("Attention pattern"))
    assert _title(pattern).startswith(f"Attention pattern of layer {int(heaviest['layer'])}, head {other}")
    # The drawn weights are that head's rows of the stored pattern.
    expected = tables["attention_pattern"].query("layer == @heaviest.layer and head == @other")
    z = _array(pattern["data"][0]["z"])
    assert np.allclose(z[expected["query"], expected["key"]], expected["weight"], atol=1e-6)
    # The sink column is marked, and the hover names the query and key tokens.
    assert pattern["layout"]["shapes"][0]["x0"] == -0.5 and "sink column" in pattern["layout"]["annotations"][0]["text"]
    tokens = tables["pattern_tokens"]["token"]
    assert _array(pattern["data"][0]["customdata"])[1][0] == f"1: {shown_token(tokens[1])} \u2192 0: {shown_token(tokens[0])}"


def test_massive_page_shows_token_by_dim_magnitudes_at_a_chosen_layer(store):
    at, tables = _run_page("massive", store)
    layer = _view_select(at, "layer")
    layer.select(2).run()
    assert_clean(at)
    heat = next(c for c in charts(at) if "per token and dim" in _title(c))
    assert "block 2" in _title(heat)
    top = tables["massive_example"].query("layer == 2 and dim >= 0")["abs_value"].max()
    assert _array(heat["data"][0]["customdata"]).max() == pytest.approx(top)


def test_dla_page_draws_the_chosen_position(store):
    at, tables = _run_page("dla", store)
    position = _view_select(at, "position")
    assert position.value == tables["dla_tokens"]["position"].max()
    position.select(3).run()
    assert_clean(at)
    chart = next(c for c in charts(at) if _title(c).startswith("Direct logit attribution at position 3"))
    target = tables["dla_tokens"].query("position == 3")["target"].iloc[0]
    assert shown_token(target) in _title(chart)


def test_logit_lens_page_moves_the_grid_and_measures_another_window(store):
    at, tables = _run_page("logit-lens", store)
    start = _view_select(at, "first_position")
    assert start.value == 0 and len(start.options) >= 2
    start.select(12).run()
    assert_clean(at)
    grid = next(c for c in charts(at) if _title(c).startswith("Logit lens: top token"))
    assert "positions 12-" in _title(grid)
    hover = grid["data"][0]["hovertemplate"]
    assert "target" in hover and "rank" in hover and "top-5" in hover
    # The window option is a measurement option: window 1 does not exist in one short text.
    at.number_input(key="logit-lens.window").set_value(1).run()
    at.button(key="logit-lens.run").click().run()
    assert not at.exception and "has no window 1" in at.error[0].value


def test_the_placements_view_joins_stored_runs_by_relative_depth(store):
    from layerscope.app.cli import main

    assert main(["compare", "--models", "tiny-llama,tiny-gemma3", "--max-tokens", "64", "--seq-len", "32",
                 "--runs-dir", str(store)]) == 0
    at = open_app("page_placements.py")
    assert_clean(at)
    [chart] = charts(at)
    names = {trace["name"] for trace in chart["data"]}
    assert names == {"tiny-llama (pre)", "tiny-gemma3 (peri)"}
    growth = at.dataframe[0].value.set_index("model")
    assert set(growth.index) == {"tiny-llama", "tiny-gemma3"}
    assert any("tiny-gemma3 (peri-LN, 2 blocks)" in m.value for m in at.markdown)


def test_the_placements_view_asks_for_runs_that_hold_its_measurements(store):
    open_app("residual-stats").button(key="residual-stats.run").click().run()
    at = open_app("page_placements.py")
    assert_clean(at)
    assert "needs two stored runs" in at.info[0].value
