import json
import sysconfig
from pathlib import Path

import pytest
import torch

from layerscope.probes import corpus
from layerscope.probes.corpus import (CorpusSpec, _parse_stdlib_docstrings, documents, stdlib_docstrings,
                                      token_windows)
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_stdlib_docstrings_are_long_and_deterministic():
    docs = stdlib_docstrings()
    assert len(docs) > 500
    assert all(len(d) > 200 for d in docs)
    assert docs == stdlib_docstrings()
    assert sum(len(d) for d in docs) > 300_000


def test_windows_have_bos_fixed_length_and_budget(tokenizer):
    windows = token_windows(CorpusSpec("stdlib", seq_len=32, max_tokens=320), tokenizer, 256, 256)
    assert windows.input_ids.shape == (10, 32)
    assert torch.all(windows.input_ids[:, 0] == 256)
    # Byte tokens of the first docstring follow the BOS in order.
    first_doc = stdlib_docstrings()[0].encode("utf-8")[:31]
    assert bytes(windows.input_ids[0, 1:].tolist()) == first_doc
    again = token_windows(CorpusSpec("stdlib", seq_len=32, max_tokens=320), tokenizer, 256, 256)
    assert torch.equal(windows.input_ids, again.input_ids)
    assert windows.corpus_sha256 == again.corpus_sha256


def test_skip_windows_gives_disjoint_splits(tokenizer):
    spec = CorpusSpec("stdlib", seq_len=16, max_tokens=64)
    train = token_windows(spec, tokenizer, 256, 256)
    held_out = token_windows(spec, tokenizer, 256, 256, skip_windows=4)
    assert not torch.equal(train.input_ids, held_out.input_ids)
    both = token_windows(CorpusSpec("stdlib", seq_len=16, max_tokens=128), tokenizer, 256, 256)
    assert torch.equal(both.input_ids[4:], held_out.input_ids)


def test_txt_jsonl_and_literal(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "b.jsonl").write_text('{"text": "one two three"}\n{"text": "four five six"}\n')
    assert documents(str(tmp_path / "a.txt")) == ["hello world " * 20]
    assert documents(str(tmp_path / "b.jsonl")) == ["one two three", "four five six"]
    assert documents("text:abc") == ["abc"]


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".txt", "does not exist"),
    ("", ".txt", "is empty"),
    (b"\xff\xfe\x00bad", ".txt", "not UTF-8"),
    ('{"content": "x"}\n', ".jsonl", "no string field 'text'"),
    ("plain", ".csv", "must end in .txt or .jsonl"),
])
def test_bad_corpus_files(tmp_path, content, suffix, message):
    path = tmp_path / f"corpus{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        documents(str(path))


@pytest.mark.parametrize("spec, message", [
    (CorpusSpec("stdlib", seq_len=64, max_tokens=0), "max_tokens must be positive"),
    (CorpusSpec("stdlib", seq_len=512, max_tokens=1024), "above the model's context"),
    (CorpusSpec("text:short", seq_len=64, max_tokens=1024), "fewer than one window"),
    (CorpusSpec("stdlib", seq_len=128, max_tokens=1), "max_tokens 1 is less than one window of seq_len 128"),
])
def test_bad_window_settings(tokenizer, spec, message):
    with pytest.raises(UserError, match=message):
        token_windows(spec, tokenizer, 256, 256)


def test_stdlib_docstrings_cache_equals_a_fresh_parse_and_survives_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSCOPE_CACHE", str(tmp_path))
    root = Path(sysconfig.get_paths()["stdlib"])
    parsed = _parse_stdlib_docstrings(root)
    # The stdlib is parsed once here; stdlib_docstrings gets that parse, counted, so the
    # test also sees when it parses and when it reads its file.
    parses = []
    monkeypatch.setattr(corpus, "_parse_stdlib_docstrings", lambda where: parses.append(where) or parsed)
    stdlib_docstrings.cache_clear()
    try:
        assert stdlib_docstrings() == parsed and parses == [root]
        (cached,) = (tmp_path / "corpus").iterdir()
        assert json.loads(cached.read_text()) == list(parsed)
        stdlib_docstrings.cache_clear()
        assert stdlib_docstrings() == parsed and parses == [root]  # read back from the file
        cached.write_text("{not json")
        stdlib_docstrings.cache_clear()
        assert stdlib_docstrings() == parsed and parses == [root, root]
        assert json.loads(cached.read_text()) == list(parsed)
    finally:
        stdlib_docstrings.cache_clear()
