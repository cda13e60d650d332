"""Corpora: where the text comes from, and how it becomes fixed-length token windows.

The embedded default is the docstrings of the running Python's standard library (read
with `ast`, never imported), so a corpus is always present offline.
"""

from __future__ import annotations

import ast
import codecs
import functools
import hashlib
import io
import json
import os
import re
import stat
import sys
import sysconfig
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from jaxtyping import Int

from layerscope.probes.errors import UserError

STDLIB = "stdlib"
LITERAL_PREFIX = "text:"
MIN_DOCSTRING_CHARS = 200


@dataclass(frozen=True)
class CorpusSpec:
    """Which text, cut into windows of `seq_len` tokens, up to `max_tokens` tokens in all."""

    source: str = STDLIB
    seq_len: int = 128
    max_tokens: int = 4096
    batch_size: int = 8

    def describe(self) -> str:
        if self.source.startswith(LITERAL_PREFIX):
            return "literal text"
        return self.source


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Docstrings longer than 200 characters from the top-level stdlib modules, in file-name order.

    Parsing the stdlib takes seconds, so the list is kept in the cache folder, one file per
    Python build and stdlib location."""
    from layerscope.probes.zoo import cache_dir

    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(f"{sys.version}|{root}|{MIN_DOCSTRING_CHARS}".encode()).hexdigest()[:16]
    cached = cache_dir() / "corpus" / f"stdlib-docstrings-{key}.json"
    try:
        return tuple(json.loads(cached.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    docs = _parse_stdlib_docstrings(root)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}")
        staging.write_text(json.dumps(docs), encoding="utf-8")
        os.replace(staging, cached)
    except OSError:
        pass  # a read-only cache only costs the parse next time
    return docs


def _parse_stdlib_docstrings(root: Path) -> tuple[str, ...]:
    docs: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > MIN_DOCSTRING_CHARS:
                    docs.append(doc)
    # ast.walk yields the module node first as well; keep each docstring once, in order.
    return tuple(dict.fromkeys(docs))


# Corpus files are read in pieces and only as far as the token budget needs, so memory
# follows max_tokens and never the file's size (64 KiB of text for the usual budgets).  A
# document is tokenised whole when it fits the first read; a longer one is read, in pieces
# that end at line ends, until its tokens pass the budget by MARGIN_TOKENS, and only the
# first tokens are kept: cutting the text can change only the last tokens, which are dropped.
READ_BYTES = 64 * 1024
FIRST_READ_BYTES_PER_TOKEN = 4
MARGIN_TOKENS = 256
MAX_JSONL_LINE_BYTES = 16 * 2**20
_NON_BLANK = re.compile(r"\S")


def user_path(text: str, what: str) -> Path:
    """A path a user typed, with `~` expanded; a NUL byte, or `~someone` for a user this
    machine does not know, is a UserError naming `what` the path was for."""
    if "\x00" in text:
        raise UserError(f"{what} {text!r} contains a NUL byte")
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise UserError(f"{what} {text!r} does not exist (no home folder for {text.split('/')[0]!r})") from None


def corpus_path(source: str) -> Path:
    """The regular .txt or .jsonl file a corpus source names, or a UserError saying why not.

    Checked with `os.stat` before anything is opened: a pipe or device named `x.txt` would
    otherwise block the read forever."""
    if "\x00" in source:
        raise UserError(f"corpus path {source!r} contains a NUL byte")
    path = user_path(source, "corpus file")
    is_file_name = path.suffix in (".txt", ".jsonl")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if is_file_name:
            raise UserError(f"corpus file {path} does not exist") from None
        raise UserError(f"corpus {source!r} is neither 'stdlib', 'text:...', "
                        "nor an existing .txt/.jsonl file") from None
    except OSError as err:
        raise UserError(f"corpus file {path} cannot be read: {err.strerror or err}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"corpus {path} is a folder; give a .txt or .jsonl file")
    if not is_file_name:
        raise UserError(f"corpus file {path} must end in .txt or .jsonl")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"corpus file {path} is not a regular file (a pipe, socket or device cannot be a corpus)")
    return path


class _CorpusFile:
    """A regular file opened for reading, hashing every byte read, with its size and mtime."""

    def __init__(self, path: Path):
        self.path = path
        try:
            # O_NONBLOCK: should the path have become a pipe since it was checked, opening
            # it must not wait for a writer; fstat below then refuses it.
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as err:
            raise UserError(f"corpus file {path} cannot be read: {err.strerror or err}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UserError(f"corpus file {path} is not a regular file (a pipe, socket or device cannot be a corpus)")
        self.file = os.fdopen(fd, "rb")
        self.size, self.mtime_ns = st.st_size, st.st_mtime_ns
        self.digest = hashlib.sha256()
        self.bytes_read = 0

    def __enter__(self) -> "_CorpusFile":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def _read(self, read, size: int) -> bytes:
        try:
            data = read(size)
        except OSError as err:
            raise UserError(f"corpus file {self.path} cannot be read: {err.strerror or err}") from None
        self.digest.update(data)
        self.bytes_read += len(data)
        return data

    def read(self, size: int, whole_lines: bool = True) -> bytes:
        """About `size` bytes, then on to the end of that line (at most `size` bytes more)."""
        data = self._read(self.file.read, size)
        if whole_lines and data and not data.endswith(b"\n"):
            data += self._read(self.file.readline, size)
        return data

    def readline(self, limit: int) -> bytes:
        return self._read(self.file.readline, limit)

    def at_end(self) -> bool:
        return not self.file.peek(1)

    def identity(self) -> dict:
        """The sha256 of the bytes read so far, how many they were, and the file's size and mtime."""
        return {"sha256": self.digest.hexdigest(), "bytes_read": self.bytes_read,
                "size": self.size, "mtime_ns": self.mtime_ns}


def file_identity(path: str | os.PathLike, head_bytes: int = READ_BYTES) -> dict:
    """A cheap identity of a corpus file: the sha256 of its first `head_bytes` bytes (the
    least that tokenising it reads), with its size and mtime; never a read of a whole
    large file.  Windows record the same identity, over the bytes they read."""
    with _CorpusFile(corpus_path(os.fspath(path))) as file:
        file.read(head_bytes, whole_lines=False)
        return file.identity()


class _Text:
    """One document, handed out in pieces that end at line ends where they can."""

    ended = False

    def next(self, size: int) -> str:
        raise NotImplementedError

    def rest_non_blank(self) -> bool:
        """Whether what has not been handed out yet holds anything but whitespace (reads it all)."""
        while not self.ended:
            if _NON_BLANK.search(self.next(READ_BYTES)):
                return True
        return False

    def read_all(self) -> str:
        pieces = []
        while not self.ended:
            pieces.append(self.next(READ_BYTES))
        return "".join(pieces)


class _StringText(_Text):
    def __init__(self, text: str):
        self.text, self.position = text, 0
        self.ended = not text

    def next(self, size: int) -> str:
        start, end = self.position, min(len(self.text), self.position + size)
        if end < len(self.text):
            newline = self.text.find("\n", end, end + size)
            end = newline + 1 if newline != -1 else min(len(self.text), end + size)
        self.position = end
        self.ended = end >= len(self.text)
        return self.text[start:end]

    def rest_non_blank(self) -> bool:
        return _NON_BLANK.search(self.text, self.position) is not None


class _FileText(_Text):
    """A .txt file as text: UTF-8, with universal newlines as `Path.read_text` reads it."""

    def __init__(self, file: _CorpusFile):
        self.file = file
        self.decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)

    def next(self, size: int) -> str:
        start = self.file.bytes_read
        data = self.file.read(size)
        final = self.file.at_end()
        try:
            text = self.decoder.decode(data, final=final)
        except UnicodeDecodeError as err:
            held = len(err.object) - len(data)  # bytes of a character begun in the last piece
            raise UserError(f"corpus file {self.file.path} is not UTF-8 (byte {start - held + err.start})") from None
        self.ended = final
        return text


def _jsonl_texts(file: _CorpusFile) -> Iterator[_Text]:
    path = file.path
    number = 0
    while True:
        line = file.readline(MAX_JSONL_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_JSONL_LINE_BYTES:
            raise UserError(f"{path}:{number} is longer than {MAX_JSONL_LINE_BYTES // 2**20} MiB; "
                            "split the record into shorter ones")
        try:
            line_text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path}:{number} is not UTF-8 (byte {err.start} of the line)") from None
        if not line_text.strip():
            continue
        try:
            record = json.loads(line_text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number} is not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number} has no string field 'text'")
        text = record["text"]
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise UserError(f"{path}:{number} has a lone surrogate \\u{ord(text[err.start]):04x} in 'text', "
                            "which is not text") from None
        yield _StringText(text)


class _Corpus:
    """The documents of a corpus source, each as a `_Text`; files are opened and checked here."""

    def __init__(self, source: str):
        self.source = source
        self.file: _CorpusFile | None = None
        self.docs: list[str] = []
        if source == STDLIB:
            self.docs = list(stdlib_docstrings())
        elif source.startswith(LITERAL_PREFIX):
            self.docs = [source[len(LITERAL_PREFIX):]]
        else:
            self.file = _CorpusFile(corpus_path(source))

    def __enter__(self) -> "_Corpus":
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.__exit__(*exc)

    def texts(self) -> Iterator[_Text]:
        if self.file is None:
            yield from (_StringText(doc) for doc in self.docs)
        elif self.file.path.suffix == ".jsonl":
            yield from _jsonl_texts(self.file)
        else:
            yield _FileText(self.file)

    def identity(self) -> tuple[str, dict | None]:
        """The hash to record: of the documents held in memory, or of the bytes read of a file
        (then with the file's identity)."""
        if self.file is None:
            return corpus_hash([d for d in self.docs if d.strip()]), None
        identity = self.file.identity()
        return identity["sha256"], identity


def documents(source: str) -> list[str]:
    """The documents of a corpus source: 'stdlib', a .txt or .jsonl path, or 'text:...'.

    Reads a whole file; `token_windows` reads only what its budget needs."""
    with _Corpus(source) as corpus:
        docs = [text for text in (t.read_all() for t in corpus.texts()) if text.strip()]
    if not docs:
        raise UserError(f"corpus {CorpusSpec(source).describe()!r} is empty")
    return docs


def _leading_tokens(text: _Text, tokenizer, needed: int) -> tuple[list[int], bool, bool]:
    """The first `needed` tokens of a document, the same as tokenising it whole (all its
    tokens when it was read to its end); whether it was read to its end; and whether it
    holds any text besides whitespace.

    Reads pieces until the tokens pass `needed` by MARGIN_TOKENS and tokenises what was
    read so far each time; each read is as large as the characters per token so far say is
    missing, and at least doubles the text, so the tokenising costs at most about twice
    one pass over the text kept."""
    so_far = ""
    size = max(READ_BYTES, FIRST_READ_BYTES_PER_TOKEN * (needed + MARGIN_TOKENS))
    while True:
        so_far += text.next(size)
        ids = tokenizer(so_far, add_special_tokens=False)["input_ids"]
        if text.ended:
            return ids, True, _NON_BLANK.search(so_far) is not None
        if len(ids) >= needed + MARGIN_TOKENS:
            return ids[:needed], False, _NON_BLANK.search(so_far) is not None or text.rest_non_blank()
        if not ids and _NON_BLANK.search(so_far) is None:
            so_far = ""  # whitespace this tokenizer drops: no need to keep it
            continue
        chars_per_token = len(so_far) / max(1, len(ids))
        size = max(len(so_far), int(1.25 * chars_per_token * (needed + MARGIN_TOKENS - len(ids))))


def corpus_hash(docs: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


@dataclass
class TokenWindows:
    """A corpus cut into windows; iterate it for [batch, pos] token batches."""

    spec: CorpusSpec
    input_ids: Int[torch.Tensor, "window pos"]
    corpus_sha256: str
    first_position: str
    corpus_file: dict | None = None  # a file's size, mtime and how many bytes were read (and hashed)
    separator: str = "eos"

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def __iter__(self) -> Iterator[Int[torch.Tensor, "batch pos"]]:
        yield from self.input_ids.split(self.spec.batch_size)

    def __len__(self) -> int:
        return -(-self.input_ids.shape[0] // self.spec.batch_size)

    def head(self, max_tokens: int) -> "TokenWindows":
        """The first windows holding at most `max_tokens` tokens (at least one window)."""
        keep = max(1, max_tokens // self.input_ids.shape[1])
        return replace(self, input_ids=self.input_ids[:keep])

    def manifest(self) -> dict:
        manifest = {
            **asdict(self.spec),
            "source": self.spec.describe(),
            "corpus_sha256": self.corpus_sha256,
            "windows": self.input_ids.shape[0],
            "tokens": self.n_tokens,
            "first_position": self.first_position,
            "python": sys.version.split()[0],
        }
        if self.separator != "eos":  # EOS joined every run before the choice existed
            manifest["separator"] = self.separator
        if self.corpus_file is not None:
            manifest["corpus_file"] = self.corpus_file
        return manifest


DOCUMENT_SEPARATORS = ("eos", "blank-line")


def separator_ids(tokenizer, separator: str) -> list[int]:
    """The tokens put between two documents: EOS (none when the tokenizer has no EOS) or a blank line."""
    if separator == "eos":
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if separator == "blank-line":
        return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])
    raise UserError(f"separator must be one of {', '.join(DOCUMENT_SEPARATORS)}, got {separator!r}")


def token_windows(spec: CorpusSpec, tokenizer, bos_token_id: int | None, max_context: int,
                  skip_windows: int = 0, separator: str = "eos") -> TokenWindows:
    """Tokenise a corpus into `seq_len`-token windows, each starting with BOS when the family has one.

    Documents are joined with EOS (when the tokenizer has one), or with a blank line for
    `separator="blank-line"`, and cut in order, so the same spec always gives the same
    windows.  A blank line keeps document starts out of the middle of windows, where a
    model may treat the token after EOS as a second BOS.  `skip_windows` drops that many windows
    first, which gives disjoint train and evaluation splits of one corpus.

    A .txt or .jsonl file is read in pieces and only as far as the windows need, so memory
    stays flat whatever the file's size; `corpus_sha256` is then the hash of the bytes
    read, and `corpus_file` gives their count with the file's size and mtime.
    """
    if spec.max_tokens <= 0:
        raise UserError(f"max_tokens must be positive, got {spec.max_tokens}")
    if spec.seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {spec.seq_len}")
    if spec.seq_len > max_context:
        raise UserError(f"seq_len {spec.seq_len} is above the model's context of {max_context} tokens")
    if spec.batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {spec.batch_size}")
    if spec.max_tokens < spec.seq_len:
        raise UserError(f"max_tokens {spec.max_tokens} is less than one window of seq_len {spec.seq_len} tokens; "
                        f"raise max_tokens to at least {spec.seq_len} or lower seq_len")
    body = spec.seq_len - (1 if bos_token_id is not None else 0)
    n_windows = spec.max_tokens // spec.seq_len
    wanted = (n_windows + skip_windows) * body
    stream: list[int] = []
    between = separator_ids(tokenizer, separator)
    any_text = False
    with _Corpus(spec.source) as corpus:
        for text in corpus.texts():
            ids, whole, non_blank = _leading_tokens(text, tokenizer, wanted - len(stream))
            if not non_blank:
                continue
            any_text = True
            stream += ids + (between if whole else [])
            if len(stream) >= wanted:
                break
        corpus_sha256, corpus_file = corpus.identity()
    if not any_text:
        raise UserError(f"corpus {spec.describe()!r} is empty")
    available = len(stream) // body - skip_windows
    if available < 1:
        raise UserError(f"corpus {spec.describe()!r} has {len(stream)} tokens, fewer than one window "
                        f"of {spec.seq_len} (after skipping {skip_windows} windows)")
    n_windows = min(n_windows, available)
    ids = torch.tensor(stream[skip_windows * body:(skip_windows + n_windows) * body]).view(n_windows, body)
    if bos_token_id is not None:
        ids = torch.cat([torch.full((n_windows, 1), bos_token_id), ids], dim=1)
        first = f"BOS token {bos_token_id} at position 0 of every window"
    else:
        first = "no BOS: position 0 is an ordinary corpus token"
    return TokenWindows(spec, ids, corpus_sha256, first, corpus_file, separator)

