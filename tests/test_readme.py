"""The README's notebook section runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def notebook_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Notebook\n"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.real
def test_the_notebook_section_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = notebook_blocks()
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    # webbrowser honours $BROWSER: the page is written, and opening it does nothing here.
    monkeypatch.setenv("BROWSER", "true")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["result"].metrics == ["block-influence", "massive", "variance"]
    assert len(namespace["bi"]) == 30
    assert (tmp_path / "runs" / namespace["path"].name / "manifest.json").is_file()
    assert sorted(namespace["again"].tables) == sorted(namespace["result"].tables)
    assert namespace["outliers"]["massive_top"]["rank"].max() == 5
    assert namespace["acts"]["attn_pattern[3]"].shape[1] == 9
    assert not (namespace["acts"]["resid_post[11]"] == namespace["skipped"]["resid_post[11]"]).all()
    page = re.search(r"figures: (\S+)", capsys.readouterr().out).group(1)
    assert Path(page).read_text().count("plotly-graph-div") == len(namespace["result"].figures())
